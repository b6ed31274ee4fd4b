"""The global prefix-cache directory's data structure, plain Python (the Ray actor in ``prefix_directory.py``
wraps it; tests and the benchmark use it directly).

Contract:
- Per tenant namespace, block hash -> {worker: (tier, last_use)}. Block hashes come from ``block_hash.py``: each
  chain starts at ``CacheIdentity(namespace, tokenizer_hash, model_fingerprint, kv_dtype, cache_salt).root()``,
  so a hash already names its tenant and model version. On top of that the index keeps one table per tenant and
  resolves a query's root to exactly one tenant's table: a query can only ever see its own tenant's entries, so
  one tenant's cache hits are not observable by another (no shared table, no shared LRU, separate quotas).
- Advisory: a wrong answer costs the router a worse placement and the worker a recompute, never a wrong token
  (workers re-check hashes and token ids before reuse). That is what allows the keys to be a 16-byte prefix of the
  SHA-256 (``key_bytes``), and why each entry also records its identity root (a mismatch reads as a miss).
- Workers hold leases (``heartbeat``). Entries of a worker whose lease ran out are invisible to queries at once
  and removed by ``sweep``. A worker that heartbeats a different ``ModelIdentity`` (new weights or tokenizer) loses
  all its old entries first: mixed versions during a rollout never share blocks.
- Bounded: ``max_entries`` overall and a quota per tenant, LRU within a tenant; over the global cap the tenant
  furthest over its fair share (entries / quota) gives back its least recently used entries.

Entry layout (one Python int per holder; a tuple of them when several workers hold the block)::

    | last_use_ms (relative to the index's epoch) | root_idx : 20 | worker_idx : 24 | tier : 4 |
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from baton.workers.block_hash import CacheIdentity
from baton.workers.cache_events import TIERS, CacheEvent

_TIER_BITS, _WORKER_BITS, _ROOT_BITS = 4, 24, 20
_WORKER_SHIFT = _TIER_BITS
_ROOT_SHIFT = _TIER_BITS + _WORKER_BITS
_TIME_SHIFT = _ROOT_SHIFT + _ROOT_BITS
_TIER_MASK = (1 << _TIER_BITS) - 1
_WORKER_MASK = (1 << _WORKER_BITS) - 1
_ROOT_MASK = (1 << _ROOT_BITS) - 1
_TIER_INDEX = {name: i for i, name in enumerate(TIERS)}
# Approximate CPython costs behind ``stats()['approx_bytes']`` (the benchmark checks them against RSS).
_INT_BYTES = 40  # a packed holder int (3 digits) incl. allocator rounding
_EXTRA_HOLDER_BYTES = 56  # a tuple slot + the tuple header share when a second worker holds a block


def _pack(last_use_ms: int, root_idx: int, worker_idx: int, tier: int) -> int:
    return (last_use_ms << _TIME_SHIFT) | (root_idx << _ROOT_SHIFT) | (worker_idx << _WORKER_SHIFT) | tier


def _holders(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if type(value) is tuple else (value,)  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelIdentity:
    """What a worker serves, apart from the tenant: together with a namespace it gives a ``CacheIdentity``."""

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
        require(all(q >= 1 for q in self.tenant_quotas.values()), "tenant_quotas", "all must be >= 1")
        require(8 <= self.key_bytes <= 32, "key_bytes", "must be in [8, 32]")
        require(self.max_restarts >= -1, "max_restarts", "must be >= -1 (-1: unlimited)")

    def quota(self, tenant: str) -> int:
        return self.tenant_quotas.get(tenant, self.default_tenant_quota)


class _Tenant:
    __slots__ = ("name", "quota", "entries", "held")

    def __init__(self, name: str, quota: int) -> None:
        self.name = name
        self.quota = quota
        self.entries: OrderedDict[bytes, int | tuple[int, ...]] = OrderedDict()  # LRU first
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

    def __init__(self, config: DirectoryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._epoch = clock()
        self._kb = config.key_bytes
        self._tenants: dict[str, _Tenant] = {}
        self._roots: dict[bytes, tuple[int, str]] = {}  # root -> (root_idx, tenant)
        self._next_root = 0
        self._workers: dict[str, _Worker] = {}
        self._by_idx: dict[int, _Worker] = {}
        self._deadlines: dict[int, float] = {}  # worker_idx -> lease deadline (only registered ones)
        self._next_worker = 0
        self._entries = 0
        self._holder_records = 0
        self._last_sweep = self._epoch
        self.counters: Counter[str] = Counter()

    # -- workers ---------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, identity: ModelIdentity, now: float | None = None) -> bool:
        """Renew ``worker_id``'s lease. Returns True when the worker must re-publish all its blocks: it was
        unknown (new, lease lapsed, or the directory restarted) or its identity changed (old entries purged)."""
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
    def publish(self, worker_id: str, events: Iterable[CacheEvent], now: float | None = None) -> int:
        """Apply a batch of a worker's cache events; returns how many were applied. Events of a worker
        without a live lease are rejected (it must heartbeat first, then re-publish)."""
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

    def _store(self, worker: _Worker, namespace: str, block_hash: bytes, tier: int, now_ms: int) -> None:
        root_idx = self._root_idx(worker, namespace)
        tenant = self._tenant(namespace)
        entries = tenant.entries
        key = block_hash[: self._kb]
        packed = _pack(now_ms, root_idx, worker.idx, tier)
        value = entries.get(key)
        if value is None:
            entries[key] = packed
            tenant.held[worker.idx] += 1
            self._entries += 1
            self._holder_records += 1
            if len(entries) > tenant.quota:
                self._evict_lru(tenant, 1, "evicted_quota")
            return
        holders = _holders(value)
        if (holders[0] >> _ROOT_SHIFT) & _ROOT_MASK != root_idx:  # key collision across roots
            self._release(tenant, holders)
            holders = ()
        kept = tuple(p for p in holders if (p >> _WORKER_SHIFT) & _WORKER_MASK != worker.idx)
        if len(kept) == len(holders):
            tenant.held[worker.idx] += 1
            self._holder_records += 1
        entries[key] = packed if not kept else (*kept, packed)
        entries.move_to_end(key)

    def _retract(self, worker_idx: int, namespace: str, block_hash: bytes) -> None:
        tenant = self._tenants.get(namespace)
        if tenant is None:
            return
        key = block_hash[: self._kb]
        value = tenant.entries.get(key)
        if value is None:
            return
        holders = _holders(value)
        kept = tuple(p for p in holders if (p >> _WORKER_SHIFT) & _WORKER_MASK != worker_idx)
        if len(kept) == len(holders):
            return
        self._dec_held(tenant, worker_idx)
        self._holder_records -= 1
        if not kept:
            del tenant.entries[key]
            self._entries -= 1
        else:
            tenant.entries[key] = kept[0] if len(kept) == 1 else kept

    def _dec_held(self, tenant: _Tenant, worker_idx: int) -> None:
        n = tenant.held[worker_idx] - 1
        if n:
            tenant.held[worker_idx] = n
        else:
            del tenant.held[worker_idx]

    def _release(self, tenant: _Tenant, holders: Sequence[int]) -> None:
        for p in holders:
            self._dec_held(tenant, (p >> _WORKER_SHIFT) & _WORKER_MASK)
        self._holder_records -= len(holders)

    # -- eviction and invalidation ---------------------------------------------------------------
    def _evict_lru(self, tenant: _Tenant, count: int, reason: str) -> None:
        entries = tenant.entries
        for _ in range(min(count, len(entries))):
            _, value = entries.popitem(last=False)
            self._release(tenant, _holders(value))
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
        """Remove the given workers as holders (all holders when ``worker_idxs`` is empty and a root is given,
        restricted to that root when given); returns holder records removed."""
        if worker_idxs and not any(tenant.held.get(w) for w in worker_idxs):
            return 0
        removed = 0
        entries = tenant.entries
        for key, value in list(entries.items()):
            holders = _holders(value)
            if root_idx is not None and (holders[0] >> _ROOT_SHIFT) & _ROOT_MASK != root_idx:
                continue
            if worker_idxs:
                kept = tuple(
                    p for p in holders if (p >> _WORKER_SHIFT) & _WORKER_MASK not in worker_idxs
                )
            else:
                kept = ()
            if len(kept) == len(holders):
                continue
            self._release(tenant, [p for p in holders if p not in kept])
            removed += len(holders) - len(kept)
            if kept:
                entries[key] = kept[0] if len(kept) == 1 else kept
            else:
                del entries[key]
                self._entries -= 1
        return removed

    def _drop_workers(self, worker_idxs: set[int]) -> int:
        return sum(self._drop_in_tenant(t, worker_idxs) for t in list(self._tenants.values()))

    def sweep(self, now: float | None = None) -> int:
        """Remove the entries of every worker whose lease ran out; returns holder records removed."""
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
        """Admin invalidation: everything (no arguments), one tenant, or one identity root (which names its
        tenant). Returns holder records removed; workers keep their leases."""
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
        """worker_id -> number of leading blocks of ``block_hashes`` (a chain from ``root``) that the worker holds.
        Workers whose lease ran out are skipped. ``touch`` marks the matched blocks recently used."""
        known = self._roots.get(root)
        if known is None:
            return {}
        root_idx, name = known
        tenant = self._tenants.get(name)
        if tenant is None:
            return {}
        now = self._clock() if now is None else now
        entries, kb, deadlines = tenant.entries, self._kb, self._deadlines
        result: dict[int, int] = {}
        candidates: set[int] | None = None
        matched = 0
        for i, block_hash in enumerate(block_hashes):
            key = block_hash[:kb]
            value = entries.get(key)
            if value is None:
                break
            holders = set()
            for p in _holders(value):
                widx = (p >> _WORKER_SHIFT) & _WORKER_MASK
                if (p >> _ROOT_SHIFT) & _ROOT_MASK == root_idx and deadlines.get(widx, 0.0) > now:
                    holders.add(widx)
            if candidates is None:
                candidates = holders
            elif not holders >= candidates:
                for widx in candidates - holders:
                    result[widx] = i
                candidates &= holders
            if not candidates:
                break
            if touch:
                entries.move_to_end(key)
            matched = i + 1
        for widx in candidates or ():
            result[widx] = matched
        self.counters["queries"] += 1
        return {self._by_idx[w].worker_id: n for w, n in result.items() if n > 0}

    def lookup(self, root: bytes, block_hash: bytes) -> dict[str, tuple[str, float]]:
        """worker_id -> (tier, last_use seconds on the index clock) for one block; for tests and debugging."""
        known = self._roots.get(root)
        tenant = self._tenants.get(known[1]) if known else None
        value = tenant.entries.get(block_hash[: self._kb]) if tenant else None
        out: dict[str, tuple[str, float]] = {}
        for p in _holders(value) if value is not None else ():
            widx = (p >> _WORKER_SHIFT) & _WORKER_MASK
            if known and (p >> _ROOT_SHIFT) & _ROOT_MASK == known[0] and widx in self._by_idx:
                last_use = self._epoch + (p >> _TIME_SHIFT) / 1000.0
                out[self._by_idx[widx].worker_id] = (TIERS[p & _TIER_MASK], last_use)
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
                hs = _holders(value)
                assert hs, "entry without holders"
                assert len({(p >> _ROOT_SHIFT) & _ROOT_MASK for p in hs}) == 1, "mixed roots"
                for p in hs:
                    held[(p >> _WORKER_SHIFT) & _WORKER_MASK] += 1
                holders += len(hs)
            entries += len(tenant.entries)
            assert held == +tenant.held, f"tenant {tenant.name} held counts drifted"
        assert entries == self._entries, (entries, self._entries)
        assert holders == self._holder_records, (holders, self._holder_records)
        assert entries <= self.config.max_entries
