"""The global prefix-cache directory's data structure, plain Python (the Ray actor in
``prefix_directory.py`` wraps it; tests and the benchmark use it directly).

Contract:
- Per tenant namespace, block hash -> {worker: (tier, last_use)}. Block hashes come from
  ``block_hash.py``: each chain starts at ``CacheIdentity(namespace, tokenizer_hash,
  model_fingerprint, kv_dtype, cache_salt).root()``, so a hash already names its tenant and model
  version. On top of that the index keeps one table per tenant and resolves a query's root to
  exactly one tenant's table: a query can only ever see its own tenant's entries, so one tenant's
  cache hits are not observable by another (no shared table, no shared LRU, separate quotas).
- Advisory: a wrong answer costs the router a worse placement and the worker a recompute, never a
  wrong token (workers re-check hashes and token ids before reuse). That is what allows the keys to
  be a 16-byte prefix of the SHA-256 (``key_bytes``), and why each entry also records its identity
  root (a mismatch reads as a miss).
- Workers hold leases (``heartbeat``). Entries of a worker whose lease ran out are invisible to
  queries at once and removed by ``sweep``. A worker that heartbeats a different ``ModelIdentity``
  (new weights or tokenizer) loses all its old entries first: mixed versions during a rollout never
  share blocks.
- Bounded: ``max_entries`` overall and a quota per tenant, LRU within a tenant; over the global cap
  the tenant furthest over its fair share (entries / quota) gives back its least recently used
  entries.

Entry layout: one Python int per block, whatever the number of holders, so every per-tenant table is
a plain ``dict[bytes, int]`` that CPython's cyclic GC never tracks (an OrderedDict or tuple values
would make each full collection walk all 1M entries: multi-millisecond pauses). Insertion order is
the LRU order (touch = pop and re-insert; evict = the first key)::

    value = root_idx : 20  |  slot_0 << 20  |  slot_1 << 84  |  ...   (one 64-bit slot per holder)
    slot  = present : 1 | tier : 3 | worker_idx : 24 | last_use_ms : 36
            (last_use_ms: since the index's epoch, saturating)
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from baton.workers.block_hash import CacheIdentity
from baton.workers.cache_events import TIERS, CacheEvent

_ROOT_BITS = 20
_ROOT_MASK = (1 << _ROOT_BITS) - 1
_SLOT_BITS = 64
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_TIER_SHIFT, _WORKER_SHIFT, _TIME_SHIFT = 1, 4, 28
_TIER_MASK = 0b111
_WORKER_MASK = (1 << 24) - 1
_TIME_MAX = (1 << 36) - 1
_SINGLE_LIMIT = 1 << (_ROOT_BITS + _SLOT_BITS)  # values below it have exactly one holder
_TIER_INDEX = {name: i for i, name in enumerate(TIERS)}
# Approximate CPython cost of one entry's value int (3 digits, allocator-rounded) for
# ``approx_bytes``.
_INT_BYTES = 40
_EXTRA_HOLDER_BYTES = 8  # each further 64-bit slot grows the int by ~2 digits


def _slot(last_use_ms: int, worker_idx: int, tier: int) -> int:
    return (
        (min(last_use_ms, _TIME_MAX) << _TIME_SHIFT)
        | (worker_idx << _WORKER_SHIFT)
        | (tier << _TIER_SHIFT)
        | 1
    )


def _slots(value: int) -> list[int]:
    rest, out = value >> _ROOT_BITS, []
    while rest:
        out.append(rest & _SLOT_MASK)
        rest >>= _SLOT_BITS
    return out


def _join(root_idx: int, slots: Sequence[int]) -> int:
    value = 0
    for slot in reversed(slots):
        value = (value << _SLOT_BITS) | slot
    return (value << _ROOT_BITS) | root_idx


def _worker(slot: int) -> int:
    return (slot >> _WORKER_SHIFT) & _WORKER_MASK


@dataclass(frozen=True)
class ModelIdentity:
    """What a worker serves, apart from the tenant: together with a namespace it gives a
    ``CacheIdentity``."""

    tokenizer_hash: str
    model_fingerprint: str
    kv_dtype: str
    cache_salt: str = ""

    def cache_identity(self, namespace: str) -> CacheIdentity:
        return CacheIdentity(
            namespace, self.tokenizer_hash, self.model_fingerprint, self.kv_dtype, self.cache_salt
        )

    def root(self, namespace: str) -> bytes:
        return self.cache_identity(namespace).root()


@dataclass(frozen=True)
class DirectoryConfig:
    """Sizing and naming of the prefix directory; validated here so a bad value names its field."""

    name: str = "baton-prefix-directory"
    ray_namespace: str = "baton"
    lease_s: float = 10.0
    sweep_interval_s: float = 1.0
    max_entries: int = 1_000_000
    default_tenant_quota: int = 200_000
    tenant_quotas: Mapping[str, int] = field(default_factory=dict)
    key_bytes: int = 16
    max_restarts: int = -1

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"invalid DirectoryConfig.{name}={getattr(self, name)!r}: {why}")

        require(bool(self.name), "name", "must be non-empty")
        require(self.lease_s > 0, "lease_s", "must be > 0")
        require(self.sweep_interval_s > 0, "sweep_interval_s", "must be > 0")
        require(self.max_entries >= 1, "max_entries", "must be >= 1")
        require(self.default_tenant_quota >= 1, "default_tenant_quota", "must be >= 1")
        require(
            all(q >= 1 for q in self.tenant_quotas.values()), "tenant_quotas", "all must be >= 1"
        )
        require(8 <= self.key_bytes <= 32, "key_bytes", "must be in [8, 32]")
        require(self.max_restarts >= -1, "max_restarts", "must be >= -1 (-1: unlimited)")

    def quota(self, tenant: str) -> int:
        return self.tenant_quotas.get(tenant, self.default_tenant_quota)


class _Tenant:
    __slots__ = ("name", "quota", "entries", "held")

    def __init__(self, name: str, quota: int) -> None:
        self.name = name
        self.quota = quota
        self.entries: dict[bytes, int] = {}  # insertion order = LRU order, least recent first
        self.held: Counter[int] = Counter()  # worker_idx -> entries it holds here


class _Worker:
    __slots__ = ("worker_id", "idx", "identity", "deadline", "roots")

    def __init__(self, worker_id: str, idx: int, identity: ModelIdentity, deadline: float) -> None:
        self.worker_id = worker_id
        self.idx = idx
        self.identity = identity
        self.deadline = deadline
        self.roots: dict[str, int] = {}  # namespace -> root_idx


class PrefixIndex:
    """See the module docstring. Not thread-safe: the actor serializes calls."""

    def __init__(
        self, config: DirectoryConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._epoch = clock()
        self._kb = config.key_bytes
        self._tenants: dict[str, _Tenant] = {}
        self._roots: dict[bytes, tuple[int, str]] = {}  # root -> (root_idx, tenant)
        self._next_root = 0
        self._workers: dict[str, _Worker] = {}
        self._by_idx: dict[int, _Worker] = {}
        self._deadlines: dict[
            int, float
        ] = {}  # worker_idx -> lease deadline (only registered ones)
        self._next_worker = 0
        self._entries = 0
        self._holder_records = 0
        self._last_sweep = self._epoch
        self.counters: Counter[str] = Counter()

    # -- workers ---------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, identity: ModelIdentity, now: float | None = None) -> bool:
        """Renew ``worker_id``'s lease. Returns True when the worker must re-publish all its blocks:
        it was unknown (new, lease lapsed, or the directory restarted) or its identity changed (old
        entries purged)."""
        now = self._clock() if now is None else now
        worker = self._workers.get(worker_id)
        if worker is not None and worker.deadline <= now:
            self.counters["purged_lease_expired"] += self._drop_workers({worker.idx})
            self._forget_worker(worker)
            worker = None
        if worker is None:
            self._register(worker_id, identity, now)
            return True
        worker.deadline = self._deadlines[worker.idx] = now + self.config.lease_s
        if worker.identity != identity:
            self.counters["purged_identity_change"] += self._drop_workers({worker.idx})
            self.counters["identity_changes"] += 1
            worker.identity = identity
            worker.roots.clear()
            return True
        return False

    def _register(self, worker_id: str, identity: ModelIdentity, now: float) -> _Worker:
        if self._next_worker > _WORKER_MASK:
            raise RuntimeError("prefix directory ran out of worker indices; restart it")
        worker = _Worker(worker_id, self._next_worker, identity, now + self.config.lease_s)
        self._next_worker += 1
        self._workers[worker_id] = worker
        self._by_idx[worker.idx] = worker
        self._deadlines[worker.idx] = worker.deadline
        return worker

    def _forget_worker(self, worker: _Worker) -> None:
        del self._workers[worker.worker_id]
        del self._by_idx[worker.idx]
        del self._deadlines[worker.idx]

    def _root_idx(self, worker: _Worker, namespace: str) -> int:
        idx = worker.roots.get(namespace)
        if idx is None:
            root = worker.identity.root(namespace)
            known = self._roots.get(root)
            if known is None:
                if self._next_root > _ROOT_MASK:
                    raise RuntimeError("prefix directory ran out of root indices; restart it")
                known = (self._next_root, namespace)
                self._next_root += 1
                self._roots[root] = known
            idx = worker.roots[namespace] = known[0]
        return idx

    def _tenant(self, name: str) -> _Tenant:
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = self._tenants[name] = _Tenant(name, self.config.quota(name))
        return tenant

    # -- publishing ------------------------------------------------------------------------------
    def publish(
        self, worker_id: str, events: Iterable[CacheEvent], now: float | None = None
    ) -> int:
        """Apply a batch of a worker's cache events; returns how many were applied. Events of a
        worker without a live lease are rejected (it must heartbeat first, then re-publish)."""
        now = self._clock() if now is None else now
        worker = self._workers.get(worker_id)
        events = list(events)
        if worker is None or worker.deadline <= now:
            self.counters["rejected_events"] += len(events)
            return 0
        now_ms = max(0, int((now - self._epoch) * 1000))
        applied = 0
        for ev in events:
            if ev.kind == "stored" and ev.block_hash is not None:
                tier = _TIER_INDEX.get(ev.tier)
                if tier is None:
                    self.counters["rejected_events"] += 1
                    continue
                self._store(worker, ev.namespace, ev.block_hash, tier, now_ms)
            elif ev.kind == "evicted" and ev.block_hash is not None:
                self._retract(worker.idx, ev.namespace, ev.block_hash)
            elif ev.kind == "cleared":
                names = [ev.namespace] if ev.namespace else list(self._tenants)
                dropped = 0
                for name in names:
                    if name in self._tenants:
                        dropped += self._drop_in_tenant(self._tenants[name], {worker.idx})
                self.counters["purged_worker_cleared"] += dropped
            else:
                self.counters["rejected_events"] += 1
                continue
            applied += 1
        if self._entries > self.config.max_entries:
            self._enforce_global_cap()
        return applied

    def _store(
        self, worker: _Worker, namespace: str, block_hash: bytes, tier: int, now_ms: int
    ) -> None:
        root_idx = self._root_idx(worker, namespace)
        tenant = self._tenant(namespace)
        entries = tenant.entries
        key = block_hash[: self._kb]
        slot = _slot(now_ms, worker.idx, tier)
        value = entries.pop(key, None)
        if value is None:
            entries[key] = (slot << _ROOT_BITS) | root_idx
            tenant.held[worker.idx] += 1
            self._entries += 1
            self._holder_records += 1
            if len(entries) > tenant.quota:
                self._evict_lru(tenant, 1, "evicted_quota")
            return
        slots = _slots(value)
        if value & _ROOT_MASK != root_idx:  # a key collision across roots: the newcomer wins
            self._release(tenant, slots)
            slots = []
        kept = [s for s in slots if _worker(s) != worker.idx]
        if len(kept) == len(slots):
            tenant.held[worker.idx] += 1
            self._holder_records += 1
        kept.append(slot)
        entries[key] = _join(root_idx, kept)  # re-inserted: most recently used

    def _retract(self, worker_idx: int, namespace: str, block_hash: bytes) -> None:
        tenant = self._tenants.get(namespace)
        if tenant is None:
            return
        key = block_hash[: self._kb]
        value = tenant.entries.get(key)
        if value is None:
            return
        slots = _slots(value)
        kept = [s for s in slots if _worker(s) != worker_idx]
        if len(kept) == len(slots):
            return
        self._dec_held(tenant, worker_idx)
        self._holder_records -= 1
        if not kept:
            del tenant.entries[key]
            self._entries -= 1
        else:
            tenant.entries[key] = _join(value & _ROOT_MASK, kept)  # keeps its LRU position

    def _dec_held(self, tenant: _Tenant, worker_idx: int) -> None:
        n = tenant.held[worker_idx] - 1
        if n:
            tenant.held[worker_idx] = n
        else:
            del tenant.held[worker_idx]

    def _release(self, tenant: _Tenant, slots: Sequence[int]) -> None:
        for slot in slots:
            self._dec_held(tenant, _worker(slot))
        self._holder_records -= len(slots)

    # -- eviction and invalidation ---------------------------------------------------------------
    def _evict_lru(self, tenant: _Tenant, count: int, reason: str) -> None:
        entries = tenant.entries
        count = min(count, len(entries))
        for _ in range(count):
            key = next(iter(entries))
            self._release(tenant, _slots(entries.pop(key)))
            self._entries -= 1
        self.counters[reason] += count

    def _enforce_global_cap(self) -> None:
        """Take the excess from the tenants furthest over their share, largest ratio first."""
        excess = self._entries - self.config.max_entries
        heap = [(-len(t.entries) / t.quota, name) for name, t in self._tenants.items() if t.entries]
        heapq.heapify(heap)
        while excess > 0 and heap:
            _, name = heapq.heappop(heap)
            tenant = self._tenants[name]
            # Evict in small steps so the ratio order stays roughly fair across tenants.
            step = min(excess, max(1, len(tenant.entries) // 64))
            self._evict_lru(tenant, step, "evicted_global_cap")
            excess -= step
            if tenant.entries:
                heapq.heappush(heap, (-len(tenant.entries) / tenant.quota, name))

    def _drop_in_tenant(
        self, tenant: _Tenant, worker_idxs: set[int], root_idx: int | None = None
    ) -> int:
        """Remove the given workers as holders (all holders when ``worker_idxs`` is empty and a root
        is given, restricted to that root when given); returns holder records removed."""
        if worker_idxs and not any(tenant.held.get(w) for w in worker_idxs):
            return 0
        removed = 0
        entries = tenant.entries
        for key, value in list(entries.items()):
            if root_idx is not None and value & _ROOT_MASK != root_idx:
                continue
            slots = _slots(value)
            kept = [s for s in slots if _worker(s) not in worker_idxs] if worker_idxs else []
            if len(kept) == len(slots):
                continue
            self._release(tenant, [s for s in slots if s not in kept])
            removed += len(slots) - len(kept)
            if kept:
                entries[key] = _join(value & _ROOT_MASK, kept)
            else:
                del entries[key]
                self._entries -= 1
        return removed

    def _drop_workers(self, worker_idxs: set[int]) -> int:
        return sum(self._drop_in_tenant(t, worker_idxs) for t in list(self._tenants.values()))

    def sweep(self, now: float | None = None) -> int:
        """Remove the entries of every worker whose lease ran out; returns records removed."""
        now = self._clock() if now is None else now
        self._last_sweep = now
        dead = [w for w in self._workers.values() if w.deadline <= now]
        if not dead:
            return 0
        removed = self._drop_workers({w.idx for w in dead})
        for worker in dead:
            self._forget_worker(worker)
        self.counters["purged_lease_expired"] += removed
        self.counters["workers_expired"] += len(dead)
        return removed

    def maybe_sweep(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        if now - self._last_sweep < self.config.sweep_interval_s:
            return 0
        return self.sweep(now)

    def purge(self, namespace: str | None = None, identity_root: bytes | None = None) -> int:
        """Admin invalidation: everything (no arguments), one tenant, or one identity root (which
        names its tenant). Returns holder records removed; workers keep their leases."""
        removed = 0
        if identity_root is not None:
            known = self._roots.get(identity_root)
            if known is not None and (namespace is None or known[1] == namespace):
                root_idx, name = known
                tenant = self._tenants.get(name)
                if tenant is not None:
                    removed = self._drop_in_tenant(tenant, set(), root_idx=root_idx)
        elif namespace is not None:
            tenant = self._tenants.pop(namespace, None)
            if tenant is not None:
                removed = sum(tenant.held.values())
                self._entries -= len(tenant.entries)
                self._holder_records -= removed
        else:
            removed = self._holder_records
            self._tenants.clear()
            self._entries = self._holder_records = 0
        self.counters["purged_admin"] += removed
        return removed

    # -- queries ---------------------------------------------------------------------------------
    def longest_prefix(
        self,
        root: bytes,
        block_hashes: Sequence[bytes],
        now: float | None = None,
        *,
        touch: bool = True,
    ) -> dict[str, int]:
        """worker_id -> number of leading blocks of ``block_hashes`` (a chain from ``root``) that
        the worker holds. Workers whose lease ran out are skipped. ``touch`` marks the matched
        blocks recently used."""
        known = self._roots.get(root)
        if known is None:
            return {}
        root_idx, name = known
        tenant = self._tenants.get(name)
        if tenant is None:
            return {}
        now = self._clock() if now is None else now
        entries, kb, deadlines = tenant.entries, self._kb, self._deadlines
        get, shift = entries.get, _ROOT_BITS + _WORKER_SHIFT
        result: dict[int, int] = {}
        candidates: set[int] | None = None  # workers holding every block so far
        sole = -1  # when >= 0: candidates == {sole}, already checked alive
        keys: list[bytes] = []  # matched blocks, root first
        for i, block_hash in enumerate(block_hashes):
            key = block_hash[:kb]
            value = get(key)
            if value is None or value & _ROOT_MASK != root_idx:
                break
            if value < _SINGLE_LIMIT:  # the common case: one holder, no allocation
                widx = (value >> shift) & _WORKER_MASK
                if widx != sole:
                    if deadlines.get(widx, 0.0) <= now:
                        break
                    if candidates is None:
                        candidates = {widx}
                    elif widx not in candidates:
                        break
                    elif len(candidates) > 1:
                        for other in candidates - {widx}:
                            result[other] = i
                        candidates = {widx}
                    sole = widx
            else:
                sole = -1
                holders = {
                    _worker(s) for s in _slots(value) if deadlines.get(_worker(s), 0.0) > now
                }
                if candidates is None:
                    candidates = holders
                elif not holders >= candidates:
                    for other in candidates - holders:
                        result[other] = i
                    candidates &= holders
                if not candidates:
                    break
            keys.append(key)
        for widx in candidates or ():
            result[widx] = len(keys)
        if touch:
            # Deepest first, so ancestors end up more recent than descendants: LRU eviction then
            # takes a chain from its leaf end and never strands a tail behind an evicted root.
            for key in reversed(keys):
                entries[key] = entries.pop(key)
        self.counters["queries"] += 1
        return {self._by_idx[w].worker_id: n for w, n in result.items() if n > 0}

    def lookup(self, root: bytes, block_hash: bytes) -> dict[str, tuple[str, float]]:
        """worker_id -> (tier, last_use seconds on the index clock) for one block; for tests and
        debugging."""
        known = self._roots.get(root)
        tenant = self._tenants.get(known[1]) if known else None
        value = tenant.entries.get(block_hash[: self._kb]) if tenant else None
        out: dict[str, tuple[str, float]] = {}
        if value is None or known is None or value & _ROOT_MASK != known[0]:
            return out
        for slot in _slots(value):
            worker = self._by_idx.get(_worker(slot))
            if worker is not None:
                last_use = self._epoch + (slot >> _TIME_SHIFT) / 1000.0
                out[worker.worker_id] = (TIERS[(slot >> _TIER_SHIFT) & _TIER_MASK], last_use)
        return out

    # -- introspection ---------------------------------------------------------------------------
    def approx_bytes(self) -> int:
        key_obj = sys.getsizeof(b"\0" * self._kb)
        key_obj += -key_obj % 8
        tables = sum(sys.getsizeof(t.entries) for t in self._tenants.values())
        extra = self._holder_records - self._entries
        return tables + self._entries * (key_obj + _INT_BYTES) + extra * _EXTRA_HOLDER_BYTES

    def stats(self, now: float | None = None) -> dict[str, object]:
        now = self._clock() if now is None else now
        return {
            "entries": self._entries,
            "holder_records": self._holder_records,
            "max_entries": self.config.max_entries,
            "tenants": {name: len(t.entries) for name, t in self._tenants.items() if t.entries},
            "workers_alive": sum(1 for w in self._workers.values() if w.deadline > now),
            "roots": len(self._roots),
            "approx_bytes": self.approx_bytes(),
            "counters": dict(self.counters),
        }

    def check_integrity(self) -> None:
        """Recount everything from the tables; raises AssertionError on drift (run by tests)."""
        entries = holders = 0
        for tenant in self._tenants.values():
            assert len(tenant.entries) <= tenant.quota, f"tenant {tenant.name} over quota"
            held: Counter[int] = Counter()
            for value in tenant.entries.values():
                slots = _slots(value)
                assert slots, "entry without holders"
                assert all(s & 1 for s in slots), "slot without its presence bit"
                workers = [_worker(s) for s in slots]
                assert len(set(workers)) == len(workers), "a worker listed twice"
                held.update(workers)
                holders += len(slots)
            entries += len(tenant.entries)
            assert held == +tenant.held, f"tenant {tenant.name} held counts drifted"
        assert entries == self._entries, (entries, self._entries)
        assert holders == self._holder_records, (holders, self._holder_records)
        assert entries <= self.config.max_entries
