"""Replica choice: prefix-cache overlap balanced against load, power-of-two-choices when nothing
overlaps.

Overlap comes from the global prefix directory when one runs (``longest_prefix`` over the prompt's
block-hash chain, computed with the workers' own hashing module and identity), else from a local
approximation: a bounded LRU of the block hashes this router recently sent to each worker. Either is
advisory: a wrong guess costs a recompute, never a wrong token. Load is queue length and KV usage
from the pool's last stats.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from baton.router.client_protocol import Route, WorkerLoad
from baton.workers.block_hash import CacheIdentity, block_hashes, namespace_root

log = logging.getLogger(__name__)


class LocalPrefixIndex:
    """block hash -> worker ids that were last sent that block, LRU-bounded (the router's own memory)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._map: OrderedDict[bytes, set[str]] = OrderedDict()

    def record(self, hashes: Sequence[bytes], worker_id: str) -> None:
        for h in hashes:
            holders = self._map.get(h)
            if holders is None:
                self._map[h] = {worker_id}
            else:
                holders.add(worker_id)
                self._map.move_to_end(h)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def overlap(self, hashes: Sequence[bytes]) -> dict[str, int]:
        result: dict[str, int] = {}
        live: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._map.get(h)
            if not holders:
                break
            live = set(holders) if live is None else live & holders
            if not live:
                break
            for w in live:
                result[w] = i + 1
        return result

    def forget_worker(self, worker_id: str) -> None:
        for holders in self._map.values():
            holders.discard(worker_id)


def load_cost(w: WorkerLoad, max_queue: int) -> float:
    """0 for an idle worker; grows with queued/running sequences (relative to the busiest, below 1)
    and KV usage. The ``+ 1`` keeps one running sequence (often just the previous request, seen in
    a stats snapshot up to a refresh old) from cancelling a whole-prompt prefix hit (gain 1)."""
    queue = w.num_running + 2 * w.num_waiting
    return queue / (max_queue + 1) + w.kv_usage


class PrefixRouter:
    def __init__(
        self,
        identity: CacheIdentity,
        block_size: int,
        *,
        directory: Any | None = None,
        directory_timeout_s: float = 0.05,
        prefix_weight: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.identity = identity
        self.block_size = block_size
        self.directory = directory
        self.directory_timeout_s = directory_timeout_s
        self.prefix_weight = prefix_weight
        self.local = LocalPrefixIndex()
        self._rng = random.Random(seed)
        self.directory_errors = 0

    def root(self, namespace: str) -> bytes:
        return namespace_root(self.identity, namespace)

    async def _overlap(self, root: bytes, hashes: list[bytes]) -> dict[str, int]:
        if not hashes:
            return {}
        if self.directory is not None:
            try:
                ref = self.directory.longest_prefix.remote(root, hashes)
                return dict(await asyncio.wait_for(ref, self.directory_timeout_s))
            except Exception as exc:  # noqa: BLE001 - advisory: fall back to the local view
                self.directory_errors += 1
                log.debug("prefix directory lookup failed (%s); using the local index", exc)
        return self.local.overlap(hashes)

    def _choose(
        self, cands: list[WorkerLoad], overlap: dict[str, int], n_blocks: int
    ) -> WorkerLoad:
        if len(cands) == 1:
            return cands[0]
        max_queue = max(w.num_running + 2 * w.num_waiting for w in cands)
        if not any(overlap.get(w.worker_id, 0) for w in cands):
            a, b = self._rng.sample(cands, 2)  # power of two choices
            return a if load_cost(a, max_queue) <= load_cost(b, max_queue) else b
        denom = max(1, n_blocks)

        def score(w: WorkerLoad) -> float:
            gain = self.prefix_weight * overlap.get(w.worker_id, 0) / denom
            return gain - load_cost(w, max_queue)

        return max(cands, key=score)

    async def pick(
        self,
        prompt_ids: Sequence[int],
        namespace: str,
        loads: Sequence[WorkerLoad],
        *,
        short_prompt_tokens: int = 0,
    ) -> Route:
        ready = [w for w in loads if w.ready]
        prefill = [w for w in ready if w.serves_prefill]
        decode = [w for w in ready if w.serves_decode]
        if len(prefill) <= 1 and len(decode) <= 1:
            return Route(
                prefill[0].worker_id if prefill else None, decode[0].worker_id if decode else None
            )
        root = self.root(namespace)
        hashes = block_hashes(root, list(prompt_ids), self.block_size)
        overlap = await self._overlap(root, hashes)
        skip_prefill = len(prompt_ids) <= short_prompt_tokens or not prefill
        d = self._choose(decode, overlap, len(hashes)) if decode else None
        p = None if skip_prefill else self._choose(prefill, overlap, len(hashes))
        chosen = p or d
        if chosen is not None:
            self.local.record(hashes, chosen.worker_id)
        return Route(p.worker_id if p else None, d.worker_id if d else None)
