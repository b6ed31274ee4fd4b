"""The prefix directory as a real detached Ray actor: two workers publish, a routed query finds A's
blocks, A's entries vanish within its lease once it stops heart-beating, a model update purges and
is counted, an admin purge works, and a restarted directory asks workers to re-publish."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from baton.cluster.prefix_directory import (  # noqa: E402
    DirectoryConfig,
    ModelIdentity,
    admin_purge,
    get_directory,
    get_or_create_directory,
)
from baton.workers.block_hash import block_hashes  # noqa: E402
from baton.workers.cache_events import CacheEvent  # noqa: E402

LEASE_S = 1.5
CONFIG = DirectoryConfig(
    name="baton-prefix-directory-test", lease_s=LEASE_S, sweep_interval_s=0.2, max_restarts=1
)
V1 = ModelIdentity("tok", "model-v1", "bfloat16")
V2 = ModelIdentity("tok", "model-v2", "bfloat16")
TIMEOUT = 60


@pytest.fixture(scope="module")
def directory() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    handle = get_or_create_directory(CONFIG)
    try:
        yield handle
    finally:
        ray.kill(handle)
        ray.shutdown()


def call(ref: Any) -> Any:
    return ray.get(ref, timeout=TIMEOUT)


def stored(ns: str, hashes: list[bytes]) -> list[CacheEvent]:
    return [CacheEvent("stored", h, ns) for h in hashes]


def test_publish_query_lease_and_identity(directory: Any) -> None:
    assert get_or_create_directory(CONFIG)._actor_id == directory._actor_id  # named, shared
    prompt = list(range(100, 100 + 16 * 8))
    root = V1.root("acme")
    hashes = block_hashes(V1.cache_identity("acme"), prompt, 16)
    assert call(directory.heartbeat.remote("A", V1)) is True
    assert call(directory.heartbeat.remote("B", V1)) is True
    assert call(directory.publish.remote("A", stored("acme", hashes))) == 8
    assert call(directory.publish.remote("B", stored("acme", hashes[:3]))) == 3
    # A routed request for the same prompt: A has all 8 blocks, B the first 3.
    assert call(directory.longest_prefix.remote(root, hashes)) == {"A": 8, "B": 3}

    # A dies (stops heart-beating); B stays alive. A must disappear within its lease.
    start = time.monotonic()
    while True:
        call(directory.heartbeat.remote("B", V1))
        answer = call(directory.longest_prefix.remote(root, hashes))
        if "A" not in answer:
            break
        assert time.monotonic() - start < LEASE_S + 1.0, "A outlived its lease"
        time.sleep(0.1)
    assert answer == {"B": 3}
    assert time.monotonic() - start <= LEASE_S + 1.0

    # Rolling update: B loads model v2. Its v1 blocks are purged (and counted); v2 shares nothing
    # with v1.
    stats = call(directory.stats.remote())
    assert call(directory.heartbeat.remote("B", V2)) is True
    after = call(directory.stats.remote())
    assert after["counters"]["purged_identity_change"] == 3
    assert after["counters"].get("identity_changes") == 1
    assert call(directory.longest_prefix.remote(root, hashes)) == {}
    new_hashes = block_hashes(V2.cache_identity("acme"), prompt, 16)
    call(directory.publish.remote("B", stored("acme", new_hashes[:2])))
    assert call(directory.longest_prefix.remote(V2.root("acme"), new_hashes)) == {"B": 2}
    assert call(directory.longest_prefix.remote(root, hashes)) == {}
    assert stats["entries"] >= after["entries"]


def test_admin_purge_and_restart(directory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from baton.cluster.cli import main

    call(directory.heartbeat.remote("C", V1))
    hashes = block_hashes(V1.cache_identity("t1"), list(range(64)), 16)
    call(directory.publish.remote("C", stored("t1", hashes) + stored("t2", hashes[:1])))
    assert call(admin_purge("t1", config=CONFIG)) == 4
    stats = call(directory.stats.remote())
    assert "t1" not in stats["tenants"] and stats["counters"]["purged_admin"] == 4
    # The CLI against the same running cluster.
    assert main(["cache", "purge", "--tenant", "t2", "--name", CONFIG.name]) == 0
    assert "purged 1 entries (tenant 't2')" in capsys.readouterr().out
    assert "t2" not in call(directory.stats.remote())["tenants"]
    assert get_directory(CONFIG)._actor_id == directory._actor_id

    # A crash restarts the actor (max_restarts=1) with an empty table: the next heartbeat asks to
    # re-publish.
    started = call(directory.stats.remote())["started_unix"]
    ray.kill(directory, no_restart=False)
    deadline = time.monotonic() + TIMEOUT
    while True:  # the kill is asynchronous: wait for the new incarnation
        try:
            if call(directory.stats.remote())["started_unix"] != started:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "directory did not restart"
        time.sleep(0.2)
    assert call(directory.heartbeat.remote("C", V1)) is True  # unknown again: re-publish
    assert call(directory.stats.remote())["entries"] == 0
