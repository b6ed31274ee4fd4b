"""Acceptance 2: transfer faults on a real local Ray cluster (gloo; 1 prefill + 2 decode workers). A prefill
worker killed between prefill and pull, one corrupted byte in transit, a transfer delayed past the lease, a decode
worker killed mid-stream: every request ends with the offline engine's greedy tokens, or (no decode worker left)
with one terminal error; no worker leaks a block; nothing hangs."""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from baton.cluster.actors import SourceRef  # noqa: E402
from baton.cluster.client import RoutingHint  # noqa: E402
from baton.cluster.pool_config import PoolConfig  # noqa: E402
from baton.cluster.pools import start_pools  # noqa: E402
from baton.workers.config import CacheConfig, EngineConfig  # noqa: E402
from baton.workers.llm import LLM  # noqa: E402
from baton.workers.messages import GenerateRequest  # noqa: E402
from baton.workers.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPT = tuple((5 * j) % 300 + 7 for j in range(40))


@pytest.fixture(scope="module")
def pools(tiny_model_dir):
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="baton-faults",
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}},
    )
    engine = EngineConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=48),
    )
    cfg = PoolConfig(
        engine=engine,
        num_prefill=1,
        num_decode=2,
        transport="gloo",
        disagg_threshold_tokens=8,
        num_cpus_per_worker=0.5,
        lease_s=3.0,
        transfer_timeout_s=2.0,
        ray_namespace="baton-faults",
    )
    p = start_pools(cfg)
    try:
        yield p
    finally:
        p.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def want(tiny_model_dir) -> list[int]:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=48)
    return list(llm.generate([list(PROMPT)], GREEDY)[0].outputs[0].token_ids)


async def collect(client, rid: str, hint: RoutingHint | None = None, on_first=None):
    tokens, deltas = [], []
    async for d in client.generate(GenerateRequest(rid, PROMPT, GREEDY), hint):
        if not deltas and on_first is not None:
            on_first()
        deltas.append(d)
        tokens += d.token_ids
    return tokens, deltas


def decode_ids(pools) -> list[str]:
    return sorted(w for w, e in pools.workers.items() if e.info.kind == "decode")


def assert_no_leaks(pools) -> None:
    for wid, e in pools.workers.items():
        s = ray.get(e.actor.stats.remote(), timeout=30)
        assert s.num_free_blocks == s.num_total_blocks, wid
        assert s.num_held == 0 and s.num_running == 0 and s.num_waiting == 0, wid
        ray.get(e.actor.check_integrity.remote(), timeout=30)


def stats_of(pools, wid: str):
    return ray.get(pools.workers[wid].actor.stats.remote(), timeout=30)


def test_corrupt_byte_in_transit_recomputes_once(pools, want):
    did = decode_ids(pools)[0]
    ray.get(pools.workers[did].actor.set_faults.remote(corrupt_next=1), timeout=10)
    before = stats_of(pools, did)
    tokens, deltas = asyncio.run(collect(pools.client(), "corrupt", RoutingHint(decode_worker=did)))
    assert tokens == want and deltas[-1].finish_reason == "length"
    after = stats_of(pools, did)
    assert after.transfer_failures == before.transfer_failures + 1
    assert after.recomputed_prompt_tokens - before.recomputed_prompt_tokens == len(PROMPT)
    assert after.kv_bytes_received == before.kv_bytes_received  # the bad copy was never placed
    assert_no_leaks(pools)


def test_delay_past_lease_recomputes(pools, want):
    did = decode_ids(pools)[1]
    ray.get(pools.workers[did].actor.set_faults.remote(delay_s=3.5), timeout=10)
    try:
        t0, first_at = time.monotonic(), []
        tokens, deltas = asyncio.run(
            collect(
                pools.client(),
                "late",
                RoutingHint(decode_worker=did),
                on_first=lambda: first_at.append(time.monotonic()),
            )
        )
        assert time.monotonic() - t0 < 30
        # The first token is streamed from the prefill offer, not after the stalled transfer.
        assert deltas[0].token_ids == (want[0],) and first_at[0] - t0 < 3.0
    finally:
        ray.get(pools.workers[did].actor.set_faults.remote(), timeout=10)
    assert tokens == want
    assert stats_of(pools, did).transfer_failures >= 1
    time.sleep(0.5)  # the source's expiry tick
    assert_no_leaks(pools)


def test_prefill_killed_between_prefill_and_pull(pools, want):
    pid = next(w for w, e in pools.workers.items() if e.info.kind == "prefill")
    pre, did = pools.workers[pid], decode_ids(pools)[0]
    dec = pools.workers[did].actor
    req = GenerateRequest("orphan", PROMPT, GREEDY)
    offer = ray.get(pre.actor.prefill.remote(req), timeout=60)
    assert offer.result.handle is not None
    ray.kill(pre.actor, no_restart=True)
    started = ray.get(
        dec.start.remote(req, offer=offer, source=SourceRef(pid, pre.actor, pre.info.endpoint)),
        timeout=30,
    )
    assert started.placed is False and started.transfer_error
    tokens = []
    for _ in range(200):
        deltas = ray.get(dec.poll.remote("orphan", 0.5), timeout=30)
        tokens += [t for d in deltas for t in d.token_ids]
        if deltas and deltas[-1].finish_reason:
            break
    assert tokens == want
    client = pools.client()  # still lists the dead prefill worker: the client falls back too
    tokens, _ = asyncio.run(collect(client, "after-kill"))
    assert tokens == want and client.num_prefill_fallbacks == 1
    pools.remove(pid)
    pools.resize(num_prefill=1)
    assert_no_leaks(pools)


def test_decode_killed_mid_stream_resumes_then_errors_when_none_left(pools, want):
    client = pools.client()
    first, second = decode_ids(pools)

    def kill_first():
        ray.kill(pools.workers[first].actor, no_restart=True)

    tokens, deltas = asyncio.run(
        collect(client, "resume", RoutingHint(decode_worker=first), on_first=kill_first)
    )
    assert tokens == want and deltas[-1].finish_reason == "length"
    assert client.num_resumes == 1 and deltas[-1].worker_id == second
    pools.workers.pop(first)

    def kill_second():
        ray.kill(pools.workers[second].actor, no_restart=True)

    tokens, deltas = asyncio.run(
        collect(client, "orphaned", RoutingHint(decode_worker=second), on_first=kill_second)
    )
    errors = [d for d in deltas if d.finish_reason == "error"]
    assert (
        len(errors) == 1 and deltas[-1] is errors[0] and "no other decode worker" in errors[0].error
    )
    assert tokens == want[: len(tokens)]
    pools.workers.pop(second)
    pools.resize(num_decode=1)
    tokens, _ = asyncio.run(collect(pools.client(), "healed"))
    assert tokens == want
    assert_no_leaks(pools)
