"""Pressure on a real Ray Serve router (colocated engine, 32 KV blocks), through its HTTP proxy and
its gRPC server:

- a 10x burst (HTTP, SSE and gRPC mixed) whose outputs outgrow the learned prediction: no 5xx, no
  request aborted or errored for memory, the excess queued or 429, preemptions counted, and KV
  usage sampled every 50 ms never above the pool (used <= total blocks, usage <= 1); the admission
  commitment may pass its budget here, by design: it grows with the outputs that outgrew their
  prediction, and the engine absorbs that by preempting;
- requests cancelled at random points (HTTP client disconnects mid-stream, gRPC cancels, gRPC
  ``Abort`` by id): afterwards zero used blocks and zero live sequences, and the replica's RSS grows
  by less than ``RSS_BOUND_MB`` over the run after a warm-up. CI runs ``LEAK_N`` requests; the
  ``slow`` variant runs 10,000 (``pytest -m slow tests/faults/test_serve_pressure.py``).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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

BLOCKS = 32
PREDICTED, ACTUAL = 8, 160
BURST = 40  # a sequence needs 11 blocks at its end: 2 fit at once; the burst is >10x
LEAK_N = 300
RSS_BOUND_MB = 64.0


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    args = router_args(
        tiny_model_dir,
        engine={"num_kv_blocks": BLOCKS},
        admission={"min_samples": 8, "max_queue_per_tenant": 16, "queue_timeout_s": 120},
    )
    with serve_router(args, grpc=True) as h:
        yield h


@pytest.fixture(scope="module")
def stub(router):
    ch = grpc.insecure_channel(router.grpc_target)
    grpc.channel_ready_future(ch).result(timeout=30)
    yield pb_grpc.GenerationStub(ch)
    ch.close()


def replica_rss_mb() -> float:
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(p.info.get("cmdline") or []) + " " + (p.info.get("name") or "")
        if "ServeReplica:baton:BatonRouter" in title:
            return p.memory_info().rss / 2**20
    raise AssertionError("no Serve replica process found")


def replicas() -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA")
    }


class Sampler(threading.Thread):
    """Polls /admin/stats every 50 ms while the burst runs."""

    def __init__(self, router) -> None:
        super().__init__(daemon=True)
        self.router, self.samples, self.stop = router, [], threading.Event()

    def run(self) -> None:
        with self.router.client(timeout=10) as c:
            while not self.stop.is_set():
                r = c.get("/admin/stats")
                if r.status_code == 200:
                    self.samples.append(r.json())
                time.sleep(0.05)


def _http(c: httpx.Client, i: int, max_tokens: int, stream: bool) -> tuple[int, str | None]:
    body = {
        "model": "tiny",
        "prompt": f"Request {i}: the quick brown fox jumps",
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if not stream:
        r = c.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, None
        ch = r.json()["choices"][0]
        assert r.json()["usage"]["completion_tokens"] == max_tokens, r.text
        return 200, ch["finish_reason"]
    finish = None
    with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                ch = json.loads(line[6:])["choices"]
                if ch and ch[0].get("finish_reason"):
                    assert finish is None, "two terminal chunks"
                    finish = ch[0]["finish_reason"]
    return 200, finish


def _grpc(stub, i: int, max_tokens: int) -> tuple[int, str | None]:
    req = pb.GenerateRequest(
        model="tiny",
        text=f"Request {i}: the quick brown fox jumps",
        params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    try:
        msgs = list(stub.Generate(req, timeout=180))
    except grpc.RpcError as exc:
        return {grpc.StatusCode.RESOURCE_EXHAUSTED: 429}.get(exc.code(), 500), None
    finals = [m for m in msgs if m.finish_reason]
    assert len(finals) == 1 and finals[0] is msgs[-1]
    assert sum(len(m.token_ids) for m in msgs) == max_tokens
    return 200, finals[0].finish_reason


@pytest.mark.timeout(300)
def test_burst_never_exceeds_kv_budget(router, stub) -> None:
    def warm(i: int) -> tuple[int, str | None]:
        with router.client(timeout=180) as c:
            return _http(c, i, PREDICTED, False)

    # The predictors (router and engine) learn "8 tokens" from 48 samples, so that the burst's
    # first completions cannot lift their 0.9 quantile before the first wave is admitted.
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(warm, range(48))) == {(200, "length")}
    before = replicas()
    sampler = Sampler(router)
    sampler.start()

    go = threading.Barrier(BURST)  # one wave: the first admissions all rest on the old guess

    def one(i: int) -> tuple[int, str | None]:
        if i % 4 == 3:
            go.wait(60)
            return _grpc(stub, i, ACTUAL)
        with router.client(timeout=180) as c:
            go.wait(60)
            return _http(c, i, ACTUAL, stream=i % 2 == 0)

    try:
        with ThreadPoolExecutor(BURST) as pool:
            results = list(pool.map(one, range(BURST)))
    finally:
        sampler.stop.set()
        sampler.join(10)
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses  # no 5xx
    assert replicas() == before, "a replica crashed and was replaced during the burst"
    assert all(f == "length" for s, f in results if s == 200), results  # never aborted for memory
    assert 0 < statuses.count(429) and statuses.count(200) >= 16, statuses
    assert len(sampler.samples) > 10, "the sampler saw nothing"
    for st in sampler.samples:
        for w in st["workers"]:
            assert 0 <= w["num_free_blocks"] <= w["num_total_blocks"] == BLOCKS, w
            assert w["kv_usage"] <= 1.0, w
    peak = max(BLOCKS - w["num_free_blocks"] for st in sampler.samples for w in st["workers"])
    assert peak > BLOCKS // 2, f"the burst never loaded the KV cache (peak {peak} blocks)"
    st = router.assert_no_leak()
    preempted = sum(w["num_preemptions"] for w in st["workers"])
    with router.client() as c:
        metrics = c.get("/metrics").text
    assert 'finished_reason="error"' not in metrics and 'finished_reason="abort"' not in metrics
    # Preemptions are counted where operators look: /metrics agrees with the workers' own count.
    exported = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:num_preemptions") and not line.startswith("#")
    )
    assert exported == preempted, (exported, preempted)
    # Whether this wave preempts depends on how fast the router admits it on a loaded 2-core box
    # (it admits on live KV usage too); that outgrown predictions preempt rather than abort is
    # pinned deterministically by tests/workers/test_engine_vs_hf.py (preemptions > 0 asserted).
    if preempted == 0:
        print(f"[burst] no preemption this run (peak {peak}/{BLOCKS} blocks)")


def _cancel_http(router, i: int, at: int, rng: random.Random) -> None:
    body = {
        "model": "tiny",
        "prompt": f"Leak {i} once upon a time",
        "max_tokens": 32,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with router.client(timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            assert r.status_code == 429, r.text
            return
        for n, _ in enumerate(r.iter_lines()):
            if n >= at:
                break  # leaving the block closes the connection mid-stream: a client disconnect


def _cancel_grpc(stub, i: int, at: int, by_abort: bool) -> None:
    rid = f"leak-{i}"
    call = stub.Generate(
        pb.GenerateRequest(
            model="tiny",
            text=f"Leak {i} once upon a time",
            request_id=rid,
            params=pb.SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
        ),
        timeout=60,
    )
    finals = []
    try:
        for n, m in enumerate(call):
            if m.finish_reason:
                finals.append(m.finish_reason)
            if n == at:
                if by_abort:
                    stub.Abort(pb.AbortRequest(request_id=rid), timeout=30)
                else:
                    call.cancel()
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
    if by_abort:
        assert len(finals) <= 1  # an aborted stream still ends exactly once
        assert not finals or finals[0] in ("abort", "length"), finals


def _cancel_many(router, stub, n: int, seed: int) -> None:
    rng = random.Random(seed)
    plan = [
        (i, rng.choice(["http", "grpc_cancel", "grpc_abort"]), rng.randrange(0, 20))
        for i in range(n)
    ]

    def run(item) -> None:
        i, how, at = item
        if how == "http":
            _cancel_http(router, i, at, rng)
        else:
            _cancel_grpc(stub, i, at, how == "grpc_abort")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, plan))


def _leak_check(router, stub, n: int) -> None:
    _cancel_many(router, stub, min(100, n // 3), seed=1)  # warm-up: allocator, caches, pools
    router.assert_no_leak()
    rss0 = replica_rss_mb()
    _cancel_many(router, stub, n, seed=2)
    st = router.assert_no_leak()
    grew = replica_rss_mb() - rss0
    print(f"replica RSS {rss0:.0f} MB -> +{grew:.1f} MB over {n} cancelled requests")
    assert grew < RSS_BOUND_MB, f"replica RSS grew by {grew:.1f} MB over {n} cancelled requests"
    for w in st["workers"]:
        assert w["num_free_blocks"] == w["num_total_blocks"] and not w["num_running"]
    # and the router still answers normally
    with router.client(timeout=60) as c:
        assert _http(c, 0, 4, False) == (200, "length")


@pytest.mark.timeout(300)
def test_cancelled_requests_leave_nothing_behind(router, stub) -> None:
    _leak_check(router, stub, LEAK_N)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cancelled_requests_soak(router, stub) -> None:
    _leak_check(router, stub, 10_000)
