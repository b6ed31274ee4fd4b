"""The global prefix-cache directory as a Ray actor: detached, named, restartable, wrapping
``PrefixIndex``.

Workers call ``heartbeat(worker_id, identity)`` every few seconds (well inside ``lease_s``) and,
whenever it returns True, re-publish every block they hold; in between they ``publish(worker_id,
events)`` the batches drained from their engine (``engine.drain_cache_events()``). The router
computes block hashes with ``block_hash.py`` and asks ``longest_prefix(root, hashes)``. A restart
loses the table by design (it is advisory); the next heartbeat of each worker says "unknown,
re-publish" and it fills again.

The directory exports its size as Ray metrics (``baton_prefix_directory_entries``,
``baton_prefix_directory_bytes``) at most once per ``sweep_interval_s``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import ray
from baton.cluster.prefix_index import DirectoryConfig, ModelIdentity, PrefixIndex
from baton.workers.cache_events import CacheEvent
from ray.util import metrics as ray_metrics

__all__ = [
    "DirectoryConfig",
    "ModelIdentity",
    "PrefixDirectoryActor",
    "PrefixIndex",
    "admin_purge",
    "get_directory",
    "get_or_create_directory",
]


class PrefixDirectoryActor:
    """Thin shell: each call sweeps expired leases (once per interval at most), then asks."""

    def __init__(self, config: DirectoryConfig) -> None:
        self._index = PrefixIndex(config, clock=time.monotonic)
        self._started = time.time()
        self._entries_gauge = ray_metrics.Gauge(
            "baton_prefix_directory_entries",
            description="Block entries held by the global prefix directory, per tenant namespace.",
            tag_keys=("tenant",),
        )
        self._bytes_gauge = ray_metrics.Gauge(
            "baton_prefix_directory_bytes",
            description="Approximate memory of the global prefix directory's tables.",
        )
        self._purged_gauge = ray_metrics.Gauge(
            "baton_prefix_directory_purged_total",
            description="Entries purged by reason (admin, identity_change, lease_expired, ...).",
            tag_keys=("reason",),
        )
        self._last_export = 0.0
        self._exported_tenants: set[str] = set()
        # Long-lived server: move everything imported so far out of the cyclic GC's sight, so full
        # collections (triggered by the event objects each publish deserializes) stay short.
        gc.freeze()

    def _tick(self) -> None:
        now = time.monotonic()
        self._index.maybe_sweep(now)
        if now - self._last_export >= self._index.config.sweep_interval_s:
            self._export(now)

    def _export(self, now: float) -> None:
        self._last_export = now
        stats = self._index.stats(now)
        tenants: dict[str, int] = stats["tenants"]  # type: ignore[assignment]
        for name in self._exported_tenants - tenants.keys():
            self._entries_gauge.set(0, tags={"tenant": name})
        for name, count in tenants.items():
            self._entries_gauge.set(count, tags={"tenant": name})
        self._exported_tenants = set(tenants)
        self._bytes_gauge.set(stats["approx_bytes"])  # type: ignore[arg-type]
        for key, value in self._index.counters.items():
            if key.startswith("purged_"):
                self._purged_gauge.set(value, tags={"reason": key.removeprefix("purged_")})

    def heartbeat(self, worker_id: str, identity: ModelIdentity) -> bool:
        self._tick()
        return self._index.heartbeat(worker_id, identity)

    def publish(self, worker_id: str, events: Sequence[CacheEvent]) -> int:
        self._tick()
        return self._index.publish(worker_id, events)

    def longest_prefix(self, root: bytes, block_hashes: Sequence[bytes]) -> dict[str, int]:
        self._tick()
        return self._index.longest_prefix(root, block_hashes)

    def lookup(self, root: bytes, block_hash: bytes) -> dict[str, tuple[str, float]]:
        self._tick()
        return self._index.lookup(root, block_hash)

    def purge(self, namespace: str | None = None, identity_root: bytes | None = None) -> int:
        removed = self._index.purge(namespace=namespace, identity_root=identity_root)
        self._export(time.monotonic())
        return removed

    def sweep(self) -> int:
        return self._index.sweep()

    def stats(self) -> dict[str, Any]:
        self._tick()
        stats = self._index.stats()
        stats["started_unix"] = self._started
        return stats


def get_directory(config: DirectoryConfig | None = None) -> Any:
    """Handle of the running directory; ValueError when there is none (Ray must be initialized)."""
    config = config or DirectoryConfig()
    try:
        return ray.get_actor(config.name, namespace=config.ray_namespace)
    except ValueError as exc:
        raise ValueError(
            f"no prefix directory named {config.name!r} in Ray namespace {config.ray_namespace!r}"
        ) from exc


def get_or_create_directory(config: DirectoryConfig | None = None) -> Any:
    """Handle of the named detached directory actor, creating it on first use (race-free:
    get_if_exists)."""
    config = config or DirectoryConfig()
    actor_cls = ray.remote(PrefixDirectoryActor)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=config.name,
        namespace=config.ray_namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=config.max_restarts,
        num_cpus=0,
    ).remote(config)


def admin_purge(tenant: str | None, *, config: DirectoryConfig | None = None) -> Any:
    """Purge one tenant's entries (``tenant=None``: all); returns an ObjectRef of the count removed,
    so sync callers ``ray.get`` it and async ones (the HTTP admin endpoint) ``await`` it."""
    return get_directory(config).purge.remote(namespace=tenant)
