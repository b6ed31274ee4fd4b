"""A worker's directory link without Ray: the directory (a real ``PrefixIndex`` behind a stand-in
for the actor handle, the edge of the world) is down, then up, then the worker's model changes.
Serving never waits on it, events stay bounded while it is down, a re-registration publishes a
snapshot, and a new model fingerprint purges the old identity's entries."""

from __future__ import annotations

import asyncio

import pytest
from baton.cluster.cache_publisher import CachePublisher, PublisherConfig, model_identity
from baton.cluster.prefix_index import DirectoryConfig, PrefixIndex
from baton.workers.block_hash import block_hashes
from baton.workers.config import CacheConfig, EngineConfig
from baton.workers.engine import EngineCore
from baton.workers.roles import DecodeRole, EngineLoop
from baton.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
PROMPT = list(range(5, 45))  # 2 full blocks of 16
NS = "tenant-a"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Method:
    def __init__(self, owner: FakeDirectory, name: str) -> None:
        self.owner, self.name = owner, name

    def remote(self, *args):
        async def call():
            if self.owner.down:
                raise ConnectionError("directory unreachable")
            return getattr(self.owner.index, self.name)(*args)

        return call()


class FakeDirectory:
    """The actor handle's shape (``x.method.remote(...)`` awaitable) over a real index."""

    def __init__(self, clock: Clock) -> None:
        self.index = PrefixIndex(DirectoryConfig(lease_s=10.0), clock=clock)
        self.down = False

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def loop_for(model_dir) -> EngineLoop:
    cfg = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=32),
    )
    return EngineLoop(EngineCore(cfg, worker_id="decode-0"))


def serve_one(loop: EngineLoop, rid: str) -> None:
    stream = DecodeRole(loop).start(
        rid, PROMPT, SamplingParams(max_tokens=2, temperature=0.0), namespace=NS
    )
    for _ in range(200):
        if any(d.finish_reason for d in stream.poll(1.0)):
            return
    raise AssertionError("request did not finish")


def test_down_up_and_identity_change(tiny_model_dir, tiny_model_factory) -> None:
    clock = Clock()
    directory = FakeDirectory(clock)
    directory.down = True
    loop = loop_for(tiny_model_dir)
    pub = CachePublisher(
        "decode-0",
        loop,
        DirectoryConfig(),
        PublisherConfig(max_pending_events=1, retry_interval_s=1.0),
        locate=lambda _cfg: directory,
        clock=clock,
    )
    try:
        serve_one(loop, "r1")  # the worker serves although the directory is down
        assert asyncio.run(pub.tick()) == 0
        assert pub.failures == 1 and pub.dropped >= 1 and len(pub._pending) == 1  # bounded

        directory.down = False
        clock.now += 1.0  # past retry_interval_s: look the directory up again
        assert asyncio.run(pub.tick()) == 2  # registered, dropped events: snapshot instead
        old = model_identity(loop.engine.identity)
        root = old.root(NS)
        hashes = block_hashes(root, PROMPT, 16)
        assert directory.index.longest_prefix(root, hashes) == {"decode-0": 2}
        assert pub.republished == 1

        serve_one(loop, "r2")  # same prefix again: nothing new to say, lease renewed on time
        clock.now += 3.0
        asyncio.run(pub.tick())
        assert pub.republished == 1 and directory.index.counters["identity_changes"] == 0

        # The worker loads another model (new fingerprint): the engine is rebuilt, the old blocks
        # are gone with it and the next heartbeat makes the directory purge the old identity.
        loop.stop()
        loop = pub.loop = loop_for(tiny_model_factory("llama", seed=7))
        new = model_identity(loop.engine.identity)
        assert new.model_fingerprint != old.model_fingerprint
        serve_one(loop, "r3")
        clock.now += 3.0
        asyncio.run(pub.tick())
        assert directory.index.counters["identity_changes"] == 1
        assert directory.index.counters["purged_identity_change"] >= 2
        assert directory.index.longest_prefix(root, hashes) == {}
        new_root = new.root(NS)
        assert directory.index.longest_prefix(new_root, block_hashes(new_root, PROMPT, 16)) == {
            "decode-0": 2
        }
    finally:
        loop.stop()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        PublisherConfig(heartbeat_interval_s=0)
    with pytest.raises(ValueError, match="max_pending_events"):
        PublisherConfig(max_pending_events=0)
