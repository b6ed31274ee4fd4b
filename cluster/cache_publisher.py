"""A pool worker's link to the global prefix directory: lease heartbeats and cache-event batches.

Runs as one asyncio task on the worker actor's event loop and never blocks it (engine access goes
through the ``EngineLoop``; Ray calls are awaited with timeouts). Every ``publish_interval_s`` it
drains the engine's cache events into a bounded buffer and ships them in batches; every
``heartbeat_interval_s`` (well inside the directory's lease) it renews the lease with the engine's
exact ``ModelIdentity``. When the heartbeat answers True (new worker, lapsed lease, directory
restarted, identity changed) the buffer is thrown away and a snapshot of every cached block is
published instead.

The directory is advisory, so it being absent or down never stops serving: calls fail, the buffer
keeps at most ``max_pending_events`` (older events are dropped and the next successful heartbeat
re-publishes a snapshot), and the handle is looked up again after ``retry_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baton.cluster.prefix_index import DirectoryConfig, ModelIdentity
from baton.workers.block_hash import CacheIdentity
from baton.workers.cache_events import CacheEvent
from baton.workers.engine import EngineCore
from baton.workers.roles import EngineLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublisherConfig:
    heartbeat_interval_s: float = 2.0  # must stay well under DirectoryConfig.lease_s
    publish_interval_s: float = 0.2
    max_pending_events: int = 100_000  # bound while the directory is unreachable
    max_batch: int = 8192
    call_timeout_s: float = 2.0
    retry_interval_s: float = 2.0  # between look-ups of a missing directory

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval_s",
            "publish_interval_s",
            "call_timeout_s",
            "retry_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid PublisherConfig.{name}={getattr(self, name)!r}: > 0")
        for name in ("max_pending_events", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid PublisherConfig.{name}={getattr(self, name)!r}: >= 1")


def model_identity(identity: CacheIdentity) -> ModelIdentity:
    """The engine's identity minus the tenant: exactly what its block-hash roots are built from."""
    return ModelIdentity(
        identity.tokenizer_hash, identity.model_fingerprint, identity.kv_dtype, identity.cache_salt
    )


def snapshot(engine: EngineCore) -> list[CacheEvent]:
    """Every block the engine holds under a hash, as ``stored`` events (run on the loop thread;
    pending events are drained with it, the snapshot supersedes them)."""
    engine.drain_cache_events()
    return [
        CacheEvent("stored", b.block_hash, b.namespace)
        for b in engine.pool.blocks
        if b.block_hash is not None
    ]


def _lookup(config: DirectoryConfig) -> Any:
    from baton.cluster.prefix_directory import get_directory

    return get_directory(config)


class CachePublisher:
    def __init__(
        self,
        worker_id: str,
        loop: EngineLoop,
        directory: DirectoryConfig,
        config: PublisherConfig | None = None,
        *,
        locate: Callable[[DirectoryConfig], Any] = _lookup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.directory = directory
        self.config = config or PublisherConfig()
        self._locate = locate
        self._clock = clock
        self._actor: Any | None = None
        self._next_lookup = 0.0
        self._next_heartbeat = 0.0
        self._registered = False  # a heartbeat has succeeded since the last failure
        self._stale = False  # events were dropped: the next heartbeat re-publishes everything
        self._pending: deque[CacheEvent] = deque()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0
        self.republished = 0
        self.failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background task on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never let the link take the worker down
                log.exception("%s: prefix directory publisher tick failed", self.worker_id)
            await asyncio.sleep(self.config.publish_interval_s)

    # -- one round ---------------------------------------------------------------------------------
    async def _engine(self, fn: Callable[[EngineCore], Any]) -> Any:
        return await asyncio.wrap_future(self.loop.call(fn))

    def _buffer(self, events: list[CacheEvent]) -> None:
        self._pending.extend(events)
        over = len(self._pending) - self.config.max_pending_events
        if over > 0:
            for _ in range(over):
                self._pending.popleft()
            self.dropped += over
            self._stale = True

    async def _handle(self) -> Any | None:
        if self._actor is None and self._clock() >= self._next_lookup:
            self._next_lookup = self._clock() + self.config.retry_interval_s
            try:
                self._actor = await asyncio.to_thread(self._locate, self.directory)
            except Exception:  # noqa: BLE001 - no directory (yet): serve on, look again later
                self._actor = None
        return self._actor

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if self._registered:
            log.warning(
                "%s: prefix directory %s failed (%s: %s); retrying",
                self.worker_id,
                what,
                type(exc).__name__,
                exc,
            )
        self._registered = False
        self._actor = None  # look it up again (it may have been re-created under the same name)
        self._next_heartbeat = 0.0

    async def tick(self) -> int:
        """Drain, heartbeat when due, publish; returns how many events the directory accepted."""
        self._buffer(await self._engine(lambda eng: eng.drain_cache_events()))
        actor = await self._handle()
        if actor is None:
            return 0
        timeout = self.config.call_timeout_s
        if not self._registered or self._clock() >= self._next_heartbeat:
            ident = model_identity(self.loop.engine.identity)
            try:
                republish = await asyncio.wait_for(
                    actor.heartbeat.remote(self.worker_id, ident), timeout
                )
            except Exception as exc:  # noqa: BLE001
                self._failed("heartbeat", exc)
                return 0
            self._registered = True
            self._next_heartbeat = self._clock() + self.config.heartbeat_interval_s
            if republish or self._stale:
                self._pending = deque(await self._engine(snapshot))
                self._stale = False
                self.republished += 1
        sent = 0
        while self._pending:
            n = min(len(self._pending), self.config.max_batch)
            batch = [self._pending[i] for i in range(n)]
            try:
                sent += int(
                    await asyncio.wait_for(actor.publish.remote(self.worker_id, batch), timeout)
                )
            except Exception as exc:  # noqa: BLE001 - keep the batch, try again next round
                self._failed("publish", exc)
                break
            for _ in range(n):
                self._pending.popleft()
        self.published += sent
        return sent
