"""The Serve router replica killed under load, in disaggregated mode (the pools are detached Ray
actors and outlive the replica): every in-flight request (HTTP SSE and gRPC streams) either
finishes with the fault-free greedy tokens or ends with exactly one terminal error, none hangs;
Serve starts a new replica that reuses the same pools, and new requests (HTTP and gRPC) succeed
with the same tokens; the orphaned sequences end on the workers, which return to zero used blocks
and zero live sequences, and drop the orphans' undelivered streams once nobody has polled them for
``orphan_timeout_s`` (shortened here; live streams, polled every 0.5 s, are never dropped).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))

from baton.protos.build import ensure_generated  # noqa: E402
from serve_harness import router_args, serve_router  # noqa: E402

ensure_generated()
from baton.protos.baton.v1 import generation_pb2 as pb  # noqa: E402
from baton.protos.baton.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 160
N_HTTP, N_GRPC = 6, 3
ORPHAN_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    pool = {"replicas": 1, "num_cpus": 0.25}
    args = router_args(
        tiny_model_dir,
        pools={
            "mode": "disaggregated",
            "transport": "gloo",
            "prefill": pool,
            "decode": pool,
            "orphan_timeout_s": ORPHAN_TIMEOUT_S,
        },
    )
    with serve_router(args, grpc=True) as h:
        yield h


def prompt(i: int) -> str:
    return f"Story {i}: once upon a time there was a little robot"


def http_stream(base: str, i: int, out: dict, started: threading.Event) -> None:
    body = {
        "model": "tiny",
        "prompt": prompt(i),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    tokens, finishes, errors = [], [], []
    try:
        with (
            httpx.Client(base_url=base, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            if r.status_code != 200:
                errors.append(f"status {r.status_code}")
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ch = json.loads(line[6:])["choices"][0]
                    tokens += ch.get("token_ids") or []
                    if tokens:
                        started.set()
                    if ch.get("finish_reason"):
                        finishes.append(ch["finish_reason"])
    except httpx.HTTPError as exc:  # the connection dropped with the replica
        errors.append(type(exc).__name__)
    out[("http", i)] = (tokens, finishes, errors)


def grpc_stream(target: str, i: int, out: dict, started: threading.Event) -> None:
    tokens, finishes, errors = [], [], []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(
            model="tiny",
            text=prompt(i),
            params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        )
        try:
            for m in stub.Generate(req, timeout=60):
                tokens += list(m.token_ids)
                if tokens:
                    started.set()
                if m.finish_reason:
                    finishes.append(m.finish_reason)
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
    out[("grpc", i)] = (tokens, finishes, errors)


def fault_free(router) -> dict[int, list[int]]:
    with router.client(timeout=60) as c:
        got = {}
        for i in range(max(N_HTTP, N_GRPC)):
            r = c.post(
                "/v1/completions",
                json={
                    "model": "tiny",
                    "prompt": prompt(i),
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            assert r.status_code == 200, r.text
            got[i] = r.json()["choices"][0]["token_ids"]
        return got


def kill_replica() -> str:
    names = [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and "BatonRouter" in a["name"]
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0][0], namespace=names[0][1]), no_restart=True)
    return names[0][0]


def workers():
    return {
        a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].split("-")[0] in ("prefill", "decode") and a["namespace"] == "baton"
    }


def test_replica_killed_under_load(router) -> None:
    want = fault_free(router)
    out: dict = {}
    started = [threading.Event() for _ in range(N_HTTP + N_GRPC)]
    threads = [
        threading.Thread(target=http_stream, args=(router.base_url, i, out, started[i]))
        for i in range(N_HTTP)
    ]
    threads += [
        threading.Thread(target=grpc_stream, args=(router.grpc_target, i, out, started[N_HTTP + i]))
        for i in range(N_GRPC)
    ]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60), "a stream never started"
    old = kill_replica()
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "a request hung after the replica died"
    n_ok = n_err = 0
    for (kind, i), (tokens, finishes, errors) in out.items():
        assert tokens == want[i][: len(tokens)], (kind, i)  # what arrived was right
        ended = len(finishes) + len(errors)
        assert ended == 1 or (finishes == ["error"] and len(errors) <= 1) and len(finishes) <= 1, (
            kind,
            i,
            finishes,
            errors,
        )  # exactly one terminal outcome
        if finishes and finishes[0] == "length":
            assert tokens == want[i] and not errors, (kind, i)
            n_ok += 1
        else:
            n_err += 1
    assert n_err > 0, "the kill came after everything finished: the test proved nothing"
    # a new replica comes up on the same pools; new requests succeed with the same tokens
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(router.base_url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no healthy replica 120 s after the kill"
        time.sleep(0.5)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA")
    ]
    assert old not in names
    assert fault_free(router) == want
    out.clear()
    grpc_stream(router.grpc_target, 0, out, threading.Event())
    tokens, finishes, errors = out[("grpc", 0)]
    assert tokens == want[0] and finishes == ["length"] and not errors
    # the orphaned sequences end; nothing stays allocated on the surviving workers
    wait_workers_idle(
        lambda s, streams: (
            s.num_free_blocks != s.num_total_blocks or s.num_running or s.num_waiting or s.num_held
        )
    )


def wait_workers_idle(busy_if, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy = {}
        for name, actor in workers().items():
            s = ray.get(actor.stats.remote(), timeout=30)
            streams = ray.get(
                actor.__ray_call__.remote(lambda self: len(self._streams)), timeout=30
            )
            if busy_if(s, streams):
                busy[name] = (s, streams)
        if not busy:
            break
        assert time.monotonic() < deadline, f"workers kept orphaned requests: {busy}"
        time.sleep(0.5)
    for actor in workers().values():
        ray.get(actor.check_integrity.remote(), timeout=30)


def test_orphaned_streams_are_dropped(router) -> None:
    """Runs after the kill above: nobody polls the dead replica's streams, so the reaper drops them
    (and the new replica's own finished streams are gone already)."""
    wait_workers_idle(lambda s, streams: streams > 0, timeout=ORPHAN_TIMEOUT_S + 10)
    reaped = [
        ray.get(a.__ray_call__.remote(lambda self: self.orphans_reaped), timeout=30)
        for a in workers().values()
    ]
    assert sum(reaped) > 0, "no orphan was reaped: the kill left nothing to prove"
