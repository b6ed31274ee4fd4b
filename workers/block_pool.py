"""The one owner of KV blocks: refcounts, the LRU free queue, and the content-addressed prefix cache.

Block 0 is the null block: never handed out, used as padding in block tables and as the write target of
padded (CUDA-graph) slots. A freed full block keeps its hash and stays findable until the free queue hands it
out again (LRU eviction of unreferenced cached blocks); a hit compares stored token ids before reuse, so a
hash collision or a stale answer from the directory costs a recompute, never a wrong token.

Invariant (``check_integrity``): every usable block is either free (ref 0, in the free queue) or referenced
(ref > 0, not in the queue); each hash maps to exactly one block that carries that hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from baton.workers.cache_events import CacheEvent

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free (the scheduler checks first)."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None
    namespace: str = ""


@dataclass
class BlockPoolStats:
    num_blocks: int
    num_free: int
    num_cached: int
    num_used: int
    prefix_queries: int
    prefix_hits: int


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    enable_caching: bool = True
    blocks: list[Block] = field(init=False)
    _free: OrderedDict[int, None] = field(init=False)
    _cached: dict[bytes, int] = field(init=False)
    _events: list[CacheEvent] = field(init=False)
    prefix_queries: int = 0  # tokens looked up
    prefix_hits: int = 0  # tokens found

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks}: need at least 2 (block 0 is reserved)")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free = OrderedDict((i, None) for i in range(1, self.num_blocks))
        self._cached = {}
        self._events = []

    # -- capacity -------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (unreferenced, cached or not)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_usable

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; tail blocks are queued first so they are evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def fork(self, block_ids: Sequence[int]) -> list[int]:
        """Share blocks with a second owner (refcount +1 each); writers must ``copy_on_write`` first."""
        for block_id in block_ids:
            self.blocks[block_id].ref_count += 1
        return list(block_ids)

    def needs_copy_on_write(self, block_id: int) -> bool:
        block = self.blocks[block_id]
        return block.ref_count > 1 or block.block_hash is not None

    def copy_on_write(self, block_id: int) -> int:
        """Give the caller a private block to write in place of a shared one (caller copies the data)."""
        new_id = self.allocate(1)[0]
        self.free([block_id])
        return new_id

    # -- prefix cache ---------------------------------------------------------------------------
    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> int | None:
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        if self.blocks[block_id].token_ids != tuple(token_ids):
            return None  # collision or stale identity: never reuse a block whose tokens differ
        return block_id

    def acquire_cached(self, block_ids: Iterable[int]) -> None:
        """Take a reference on blocks found by ``lookup`` (pulls unreferenced ones out of the free queue)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def cache_full_block(
        self, block_id: int, block_hash: bytes, token_ids: Sequence[int], namespace: str
    ) -> None:
        """Publish a block that just became full; an existing block with the same hash keeps the entry."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        block.namespace = namespace
        self._cached[block_hash] = block_id
        self._events.append(CacheEvent("stored", block_hash, namespace))

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        self._events.append(CacheEvent("evicted", block.block_hash, block.namespace))
        block.block_hash = None
        block.token_ids = None
        block.namespace = ""

    def reset_prefix_cache(self, namespace: str | None = None) -> int:
        """Forget cached hashes (all, or one namespace's); referenced blocks keep running, unpublished."""
        dropped = 0
        for block in self.blocks:
            if block.block_hash is None or (namespace is not None and block.namespace != namespace):
                continue
            self._cached.pop(block.block_hash, None)
            block.block_hash = None
            block.token_ids = None
            block.namespace = ""
            dropped += 1
        self._events.append(CacheEvent("cleared", None, namespace or ""))
        return dropped

    def drain_events(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events

    # -- checks ---------------------------------------------------------------------------------
    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            num_blocks=self.num_usable,
            num_free=self.num_free,
            num_cached=len(self._cached),
            num_used=self.num_used,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """free + used == total; no block both free and referenced; optional exact refcounts."""
        if NULL_BLOCK in self._free or self.blocks[NULL_BLOCK].ref_count != 0:
            raise AssertionError("null block was handed out")
        for block in self.blocks[1:]:
            in_free = block.block_id in self._free
            if in_free == (block.ref_count > 0):
                raise AssertionError(
                    f"block {block.block_id}: ref_count={block.ref_count} but in_free_queue={in_free}"
                )
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id}: negative ref_count")
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise AssertionError(f"cache entry points at block {block_id} with another hash")
        if expected_refs is not None:
            for block in self.blocks[1:]:
                want = expected_refs.get(block.block_id, 0)
                if block.ref_count != want:
                    raise AssertionError(
                        f"block {block.block_id}: ref_count={block.ref_count}, references={want}"
                    )
