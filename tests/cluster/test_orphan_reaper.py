"""Decode workers drop streams nobody polls any more (their router replica died): the reaper aborts
them (blocks freed at once), forgets them, and answers a late poll with one final ``abort`` delta;
a stream polled within ``orphan_timeout_s`` is never touched. The actor class runs here without
Ray, on one event loop; idleness is simulated by backdating the last-poll stamps (the clock edge).
"""

from __future__ import annotations

import asyncio

import pytest
from baton.cluster import actors
from baton.cluster.actors import DecodeWorker
from baton.cluster.pool_config import PoolConfig
from baton.workers.config import CacheConfig, EngineConfig
from baton.workers.messages import GenerateRequest
from baton.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
PROMPT = tuple((7 * j) % 300 + 5 for j in range(20))
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch) -> None:
    """Outside an actor, asking Ray for the node would start a local Ray instance."""
    monkeypatch.setattr(actors, "_node_id", lambda: "local")
    monkeypatch.setattr(actors, "_node_ip", lambda: "127.0.0.1")


def make_worker(model_dir) -> DecodeWorker:
    engine = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=32),
    )
    cfg = PoolConfig(
        engine=engine,
        num_prefill=0,
        num_decode=1,
        transport="gloo",
        poll_wait_s=0.1,
        orphan_timeout_s=2.0,
        prefix_directory=None,
    )
    return DecodeWorker("decode-orphans", cfg, "gloo")


def backdate(w: DecodeWorker, rid: str, seconds: float) -> None:
    w._polled[rid] -= seconds


async def until_idle(w: DecodeWorker) -> None:
    for _ in range(200):
        s = await w.stats()
        if s.num_free_blocks == s.num_total_blocks and not s.num_running and not s.num_waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"blocks still used: {s}")


def test_orphans_are_reaped_and_live_streams_are_not(tiny_model_dir) -> None:
    async def scenario() -> None:
        w = make_worker(tiny_model_dir)
        try:
            await w.start(GenerateRequest("orphan", PROMPT, LONG), conditional=True)
            await w.start(GenerateRequest("live", PROMPT, LONG), conditional=True)
            assert await w.poll("orphan", 0.5)
            first = await w.poll("live", 0.5)
            assert first
            assert (await w.stats()).num_free_blocks < (await w.stats()).num_total_blocks
            backdate(w, "orphan", 2.5)  # idle past the timeout
            backdate(w, "live", 1.5)  # slow, but within it
            assert await w.reap_orphans() == 1
            assert set(w._streams) == {"live"} and w.orphans_reaped == 1
            late = await w.poll("orphan", 0.1)  # a late caller learns why, once
            assert len(late) == 1 and late[0].finish_reason == "abort"
            assert "orphan_timeout_s" in (late[0].error or "")
            with pytest.raises(KeyError):
                await w.poll("orphan", 0.1)
            tokens = [t for d in first for t in d.token_ids]
            for _ in range(400):
                ds = await w.poll("live", 0.5)
                tokens += [t for d in ds for t in d.token_ids]
                if ds and ds[-1].finish_reason:
                    assert ds[-1].finish_reason == "length"
                    break
            assert len(tokens) == LONG.max_tokens  # the slow live stream ran to its end
            assert w._streams == {} and w._polled == {}
            await until_idle(w)
            await w.check_integrity()
        finally:
            await w.shutdown()

    asyncio.run(scenario())


def test_finished_but_undelivered_stream_is_forgotten(tiny_model_dir) -> None:
    """An orphan that already ran to its end holds no blocks, but its buffered deltas would stay
    in ``_streams`` for ever: the reaper forgets it too."""

    async def scenario() -> None:
        w = make_worker(tiny_model_dir)
        try:
            short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            await w.start(GenerateRequest("done", PROMPT, short), conditional=True)
            await until_idle(w)
            backdate(w, "done", 3.0)
            assert await w.reap_orphans() == 1 and w._streams == {}
            await w.check_integrity()
        finally:
            await w.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("timeout", [0.0, 1.0, 4.9])
def test_orphan_timeout_must_be_many_polls_long(timeout: float) -> None:
    with pytest.raises(ValueError, match="orphan_timeout_s"):
        PoolConfig(poll_wait_s=0.5, orphan_timeout_s=timeout)
    PoolConfig(poll_wait_s=0.5, orphan_timeout_s=5.0)
