"""PrefixIndex without Ray: LRU, quotas, leases on a fake clock, purges, identity changes, isolation
between tenants, and a reference-model property test."""

from __future__ import annotations

import pytest
from baton.cluster.prefix_index import DirectoryConfig, ModelIdentity, PrefixIndex
from baton.workers.block_hash import block_hashes
from baton.workers.cache_events import CacheEvent
from hypothesis import given, settings
from hypothesis import strategies as st

BLOCK = 16
V1 = ModelIdentity("tok-a", "model-v1", "bfloat16")
V2 = ModelIdentity("tok-a", "model-v2", "bfloat16")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**overrides: object) -> tuple[PrefixIndex, FakeClock]:
    clock = FakeClock()
    cfg = DirectoryConfig(lease_s=10.0, sweep_interval_s=1.0, **overrides)  # type: ignore[arg-type]
    return PrefixIndex(cfg, clock=clock), clock


def chain(identity: ModelIdentity, ns: str, tokens: list[int]) -> tuple[bytes, list[bytes]]:
    return identity.root(ns), block_hashes(identity.cache_identity(ns), tokens, BLOCK)


def stored(ns: str, hashes: list[bytes], tier: str = "device") -> list[CacheEvent]:
    return [CacheEvent("stored", h, ns, tier) for h in hashes]


def test_longest_prefix_per_worker() -> None:
    index, _ = make()
    root, hashes = chain(V1, "acme", list(range(16 * 8)))
    for w in ("A", "B"):
        assert index.heartbeat(w, V1) is True  # new: publish everything
    assert index.publish("A", stored("acme", hashes[:6])) == 6
    assert index.publish("B", stored("acme", hashes[:2] + hashes[3:5])) == 4
    assert index.longest_prefix(root, hashes) == {"A": 6, "B": 2}
    # A request that diverges after block 1 matches at most 1 block anywhere.
    _, other = chain(V1, "acme", list(range(16)) + [999] * 16 * 4)
    assert index.longest_prefix(root, other) == {"A": 1, "B": 1}
    index.publish("A", [CacheEvent("evicted", hashes[0], "acme")])
    assert index.longest_prefix(root, hashes) == {"B": 2}  # a gap at block 0 ends A's prefix
    assert index.stats()["entries"] == 6
    index.check_integrity()


def test_many_holders_of_one_block() -> None:
    index, _ = make()
    root, hashes = chain(V1, "acme", list(range(16 * 2)))
    for w in "ABCD":
        index.heartbeat(w, V1)
        index.publish(w, stored("acme", hashes))
    index.publish("B", [CacheEvent("evicted", hashes[1], "acme")])
    assert index.longest_prefix(root, hashes) == {"A": 2, "B": 1, "C": 2, "D": 2}
    index.publish("C", [CacheEvent("cleared", None, "")])
    assert index.longest_prefix(root, hashes) == {"A": 2, "B": 1, "D": 2}
    assert set(index.lookup(root, hashes[1])) == {"A", "D"}
    index.check_integrity()


def test_lookup_reports_tier_and_last_use() -> None:
    index, clock = make()
    root, hashes = chain(V1, "acme", list(range(32)))
    index.heartbeat("A", V1)
    index.heartbeat("B", V1)
    index.publish("A", stored("acme", hashes[:1]))
    clock.now += 2.5
    index.publish("B", stored("acme", hashes[:1], tier="host"))
    got = index.lookup(root, hashes[0])
    assert got["A"] == ("device", pytest.approx(1000.0))
    assert got["B"] == ("host", pytest.approx(1002.5))


def test_tenants_never_see_each_other() -> None:
    """The side channel: same text and model, different tenants -> no hash, no answer in common."""
    index, _ = make()
    tokens = list(range(5, 5 + 16 * 14))  # a 220-ish token shared system prompt
    root_a, ha = chain(V1, "tenant-a", tokens)
    root_b, hb = chain(V1, "tenant-b", tokens)
    assert not set(ha) & set(hb)
    index.heartbeat("A", V1)
    index.publish("A", stored("tenant-a", ha))
    assert index.longest_prefix(root_a, ha) == {"A": len(ha)}
    assert index.longest_prefix(root_b, hb) == {}
    assert index.longest_prefix(root_b, ha) == {}  # even replaying the other tenant's hashes
    assert index.stats()["tenants"] == {"tenant-a": len(ha)}


def test_lru_within_tenant_quota() -> None:
    index, _ = make(default_tenant_quota=4, tenant_quotas={"big": 8})
    index.heartbeat("A", V1)
    root, hashes = chain(V1, "small", list(range(16 * 6)))
    index.publish("A", stored("small", hashes[:4]))
    # Touch block 0..1 by a query, then add two more: blocks 2 and 3 are the LRU victims.
    assert index.longest_prefix(root, hashes[:2]) == {"A": 2}
    index.publish("A", stored("small", hashes[4:6]))
    assert index.lookup(root, hashes[2]) == {} and index.lookup(root, hashes[3]) == {}
    assert set(index.lookup(root, hashes[0])) == {"A"}
    assert index.stats()["tenants"]["small"] == 4
    assert index.counters["evicted_quota"] == 2
    # Another tenant's quota is its own.
    _, big = chain(V1, "big", list(range(16 * 10)))
    index.publish("A", stored("big", big))
    assert index.stats()["tenants"] == {"small": 4, "big": 8}
    index.check_integrity()


def test_query_touch_makes_eviction_take_chains_from_the_leaf_end() -> None:
    index, _ = make(default_tenant_quota=6)
    index.heartbeat("A", V1)
    root, hashes = chain(V1, "t", list(range(16 * 4)))
    _, other = chain(V1, "t", list(range(1000, 1000 + 16 * 2)))
    index.publish("A", stored("t", hashes))
    index.publish("A", stored("t", other))
    assert index.longest_prefix(root, hashes) == {"A": 4}  # touches all four
    _, newer = chain(V1, "t", list(range(2000, 2000 + 16 * 4)))
    index.publish("A", stored("t", newer))  # 4 over quota: `other` (2) and then the leaf end
    assert index.longest_prefix(root, hashes, touch=False) == {"A": 2}
    assert index.lookup(root, hashes[3]) == {} and index.lookup(root, hashes[2]) == {}
    index.check_integrity()


def test_global_cap_takes_from_tenant_furthest_over_share() -> None:
    index, _ = make(max_entries=10, default_tenant_quota=100)
    index.heartbeat("A", V1)
    _, hog = chain(V1, "hog", list(range(16 * 9)))
    _, small = chain(V1, "small", list(range(16 * 3)))
    index.publish("A", stored("hog", hog))
    index.publish("A", stored("small", small))
    stats = index.stats()
    assert stats["entries"] == 10
    assert stats["tenants"] == {"hog": 7, "small": 3}
    assert index.counters["evicted_global_cap"] == 2
    index.check_integrity()


def test_lease_expiry_hides_then_sweeps() -> None:
    index, clock = make()
    root, hashes = chain(V1, "acme", list(range(16 * 4)))
    index.heartbeat("A", V1)
    index.heartbeat("B", V1)
    index.publish("A", stored("acme", hashes))
    index.publish("B", stored("acme", hashes[:2]))
    clock.now += 6
    assert index.heartbeat("B", V1) is False  # renewed, nothing to re-publish
    clock.now += 5  # A's lease (10 s) ran out, B's did not
    assert index.longest_prefix(root, hashes) == {"B": 2}
    assert index.stats()["entries"] == 4  # hidden but not yet swept
    assert index.maybe_sweep() == 4
    assert index.stats()["entries"] == 2 and index.counters["purged_lease_expired"] == 4
    assert index.publish("A", stored("acme", hashes)) == 0  # no lease: rejected
    assert index.counters["rejected_events"] == 4
    assert index.heartbeat("A", V1) is True  # comes back: must re-publish
    index.check_integrity()


def test_late_heartbeat_after_expiry_drops_old_entries() -> None:
    index, clock = make()
    root, hashes = chain(V1, "acme", list(range(16 * 3)))
    index.heartbeat("A", V1)
    index.publish("A", stored("acme", hashes))
    clock.now += 11  # expired, never swept
    assert index.heartbeat("A", V1) is True
    assert index.longest_prefix(root, hashes) == {}  # the restarted worker's old blocks are gone
    assert index.counters["purged_lease_expired"] == 3


def test_identity_change_purges_and_never_mixes_versions() -> None:
    index, _ = make()
    tokens = list(range(16 * 5))
    root1, h1 = chain(V1, "acme", tokens)
    root2, h2 = chain(V2, "acme", tokens)
    assert not set(h1) & set(h2)
    for w in ("A", "B"):
        index.heartbeat(w, V1)
        index.publish(w, stored("acme", h1))
    assert index.heartbeat("A", V2) is True  # rolling update reached A
    assert index.counters["purged_identity_change"] == 5
    assert index.longest_prefix(root1, h1) == {"B": 5}
    index.publish("A", stored("acme", h2[:3]))
    assert index.longest_prefix(root2, h2) == {"A": 3}
    assert index.longest_prefix(root2, h1) == {}  # old hashes under the new root: nothing
    # A new-version request never lands on B's old blocks, even if it replayed old hashes.
    assert index.longest_prefix(root1, h2) == {}
    index.check_integrity()


def test_admin_purge_tenant_root_and_all() -> None:
    index, _ = make()
    index.heartbeat("A", V1)
    index.heartbeat("B", V2)
    root_a1, a1 = chain(V1, "a", list(range(32)))
    root_a2, a2 = chain(V2, "a", list(range(32)))
    root_b, b = chain(V1, "b", list(range(48)))
    index.publish("A", stored("a", a1) + stored("b", b))
    index.publish("B", stored("a", a2))
    assert index.purge(identity_root=root_a2) == 2
    assert index.longest_prefix(root_a2, a2) == {} and index.longest_prefix(root_a1, a1) == {"A": 2}
    assert index.purge(namespace="a") == 2
    assert index.stats()["tenants"] == {"b": 3}
    assert index.purge() == 3
    assert index.stats()["entries"] == 0 and index.counters["purged_admin"] == 7
    assert index.longest_prefix(root_b, b) == {}
    index.check_integrity()


def test_cleared_event_drops_one_namespace_or_all() -> None:
    index, _ = make()
    index.heartbeat("A", V1)
    index.heartbeat("B", V1)
    root_x, x = chain(V1, "x", list(range(32)))
    root_y, y = chain(V1, "y", list(range(32)))
    index.publish("A", stored("x", x) + stored("y", y))
    index.publish("B", stored("x", x))
    index.publish("A", [CacheEvent("cleared", None, "x")])
    assert index.longest_prefix(root_x, x) == {"B": 2}
    assert index.longest_prefix(root_y, y) == {"A": 2}
    index.publish("A", [CacheEvent("cleared", None, "")])
    assert index.longest_prefix(root_y, y) == {}
    assert index.counters["purged_worker_cleared"] == 4
    index.check_integrity()


def test_seed_003_shared_system_prompt() -> None:
    """Two products of one namespace share a 220-token system prompt and hit; tenant 3 misses."""
    index, _ = make()
    system = [(7 * i + 3) % 5000 for i in range(220)]
    product_1 = system + [11, 12, 13] * 10
    product_2 = system + [21, 22, 23] * 10
    index.heartbeat("prefill-0", V1)
    index.heartbeat("prefill-1", V1)
    root, h1 = chain(V1, "shop", product_1)
    index.publish("prefill-0", stored("shop", h1))
    _, h2 = chain(V1, "shop", product_2)
    assert index.longest_prefix(root, h2) == {"prefill-0": 220 // BLOCK}
    root_other, h3 = chain(V1, "other-co", product_1)
    assert index.longest_prefix(root_other, h3) == {}


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        DirectoryConfig(lease_s=0)
    with pytest.raises(ValueError, match="tenant_quotas"):
        DirectoryConfig(tenant_quotas={"t": 0})
    with pytest.raises(ValueError, match="key_bytes"):
        DirectoryConfig(key_bytes=4)


def test_tables_stay_invisible_to_the_cyclic_gc() -> None:
    """Query latency needs it: each full collection would walk a GC-tracked 1M-entry table."""
    import gc

    index, _ = make()
    _, hashes = chain(V1, "acme", list(range(16 * 4)))
    for w in ("A", "B"):
        index.heartbeat(w, V1)
        index.publish(w, stored("acme", hashes))  # multi-holder entries too
    index.publish("A", [CacheEvent("evicted", hashes[0], "acme")])
    gc.collect()
    assert not any(gc.is_tracked(t.entries) for t in index._tenants.values())


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["store", "evict", "clear", "beat", "upgrade", "tick", "query"]),
            st.sampled_from(["A", "B", "C"]),
            st.sampled_from(["x", "y"]),
            st.integers(0, 2),  # block depth
            st.sampled_from(["device", "host"]),
        ),
        max_size=60,
    )
)
def test_matches_a_reference_model(ops: list[tuple[str, str, str, int, str]]) -> None:
    """Random op sequences against a dict-of-sets reference (quotas too large to evict)."""
    index, clock = make()
    identity = {w: V1 for w in "ABC"}
    deadline = {w: clock.now + 10 for w in "ABC"}
    for w in "ABC":
        index.heartbeat(w, V1)
    ref: dict[tuple[str, str, bytes], set[str]] = {}  # (fingerprint, ns, hash) -> holders
    hashes = {
        (fp.model_fingerprint, ns): chain(fp, ns, list(range(16 * 6)))
        for fp in (V1, V2)
        for ns in ("x", "y")
    }
    for op, w, ns, depth, tier in ops:
        alive = deadline[w] > clock.now
        fp = identity[w].model_fingerprint
        _, hs = hashes[(fp, ns)]
        if op == "store":
            applied = index.publish(w, [CacheEvent("stored", hs[depth], ns, tier)])
            assert applied == int(alive)
            if alive:
                ref.setdefault((fp, ns, hs[depth]), set()).add(w)
        elif op == "evict" and alive:
            index.publish(w, [CacheEvent("evicted", hs[depth], ns)])
            ref.get((fp, ns, hs[depth]), set()).discard(w)
        elif op == "clear" and alive:
            index.publish(w, [CacheEvent("cleared", None, ns if depth % 2 else "")])
            for key, holders in ref.items():
                if depth % 2 == 0 or key[1] == ns:
                    holders.discard(w)
        elif op in ("beat", "upgrade"):
            new = (V2 if identity[w] == V1 else V1) if op == "upgrade" else identity[w]
            if not alive or new != identity[w]:
                for holders in ref.values():
                    holders.discard(w)
            index.heartbeat(w, new)
            identity[w], deadline[w] = new, clock.now + 10
        elif op == "tick":
            clock.now += 2.5
            index.maybe_sweep()
        for (fp_, ns_), (root, chain_hashes) in hashes.items():
            expect: dict[str, int] = {}
            for worker in "ABC":
                if deadline[worker] <= clock.now:
                    continue
                n = 0
                while n < len(chain_hashes) and worker in ref.get((fp_, ns_, chain_hashes[n]), ()):
                    n += 1
                if n:
                    expect[worker] = n
            assert index.longest_prefix(root, chain_hashes, touch=op == "query") == expect
        index.check_integrity()
