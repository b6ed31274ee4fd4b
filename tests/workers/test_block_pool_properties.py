"""Block-pool invariants under random operation sequences (hypothesis), and scheduler-level leak checks."""

from __future__ import annotations

import hashlib

from baton.workers.block_pool import BlockPool
from hypothesis import given, settings
from hypothesis import strategies as st

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 4)),
        st.tuples(st.just("free"), st.integers(0, 50)),
        st.tuples(st.just("cache"), st.integers(0, 50), st.integers(0, 5)),
        st.tuples(st.just("hit"), st.integers(0, 5)),
        st.tuples(st.just("fork"), st.integers(0, 50)),
    ),
    max_size=80,
)


def _h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_pool_invariants(ops) -> None:
    pool = BlockPool(num_blocks=12, block_size=4)
    owners: list[list[int]] = []  # each owner holds one reference to each of its blocks
    for op in ops:
        kind = op[0]
        if kind == "alloc":
            if op[1] <= pool.num_free:
                owners.append(pool.allocate(op[1]))
        elif kind == "free" and owners:
            pool.free(owners.pop(op[1] % len(owners)))
        elif kind == "cache" and owners:
            blocks = owners[op[1] % len(owners)]
            pool.cache_full_block(blocks[0], _h(op[2]), (op[2],) * 4, "ns")
        elif kind == "hit":
            found = pool.lookup(_h(op[1]), (op[1],) * 4)
            if found is not None:
                pool.acquire_cached([found])
                owners.append([found])
            assert pool.lookup(_h(op[1]), (op[1] + 1,) * 4) is None  # token ids must match
        elif kind == "fork" and owners:
            owners.append(pool.fork(owners[op[1] % len(owners)]))
        refs: dict[int, int] = {}
        for blocks in owners:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        pool.check_integrity(refs)
        assert pool.num_free + len(refs) == pool.num_usable
    for blocks in owners:
        pool.free(blocks)
    pool.check_integrity({})
    assert pool.num_free == pool.num_usable


def test_copy_on_write_gives_private_block() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    (a,) = pool.allocate(1)
    pool.fork([a])
    assert pool.needs_copy_on_write(a)
    b = pool.copy_on_write(a)
    assert b != a and pool.blocks[a].ref_count == 1 and pool.blocks[b].ref_count == 1
    pool.check_integrity({a: 1, b: 1})


def test_freed_cached_block_hits_until_reused() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    (a,) = pool.allocate(1)
    pool.cache_full_block(a, _h(1), (1, 1), "ns")
    pool.free([a])
    assert pool.lookup(_h(1), (1, 1)) == a
    pool.allocate(2)  # LRU hands out every free block, evicting the cached one last
    assert pool.lookup(_h(1), (1, 1)) is None
    assert [e.kind for e in pool.drain_events()] == ["stored", "evicted"]
