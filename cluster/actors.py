"""Ray actor shells around the worker roles: ``PrefillWorker``, ``DecodeWorker``, ``ColocatedWorker``.

All methods are ``async`` (the actor's event loop never blocks: engine work runs on the role's thread, blocking
transport calls in worker threads, Ray calls are awaited). Streaming is a poll API: ``poll(request_id, max_wait_s)``
returns the deltas ready, waiting at most ``max_wait_s`` for the first, so every wait of the caller is bounded and
a dead worker shows up as an exception on the next poll.

The decode side drives the KV pull (``start`` with a ``PrefillOffer``): for pair-group transports it opens the
pair once (both ends at the same time) and asks the source to ``send_kv`` while it receives; otherwise it pulls
from the source's endpoint or opens the exported payload. The checksum is verified on receipt, once
(``receive_verified``: cuda_ipc checksums while it copies). Any failure (timeout, dead source, expired
lease, bad bytes) makes it recompute the prefill locally, exactly once; the source is acked in every
case so its blocks are freed before the lease runs out.

Orphans: a stream whose caller died (a router replica killed mid-request) is never polled again. A
reaper task aborts (blocks freed now) and forgets every stream not polled for ``orphan_timeout_s``;
a later poll of a reaped stream gets one final ``abort`` delta naming why, not a ``KeyError``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from baton.cluster import tracing
from baton.cluster.cache_publisher import CachePublisher
from baton.cluster.pool_config import PoolConfig
from baton.cluster.transfer import TransferError, make_transport
from baton.cluster.transfer.base import ChecksumMismatch
from baton.cluster.worker_telemetry import DecodeTrace, failure_reason, record_prefill
from baton.workers.engine import EngineCore
from baton.workers.messages import GenerateDelta, GenerateRequest
from baton.workers.roles import (
    DecodeRole,
    DeltaStream,
    EngineLoop,
    PrefillResult,
    PrefillRole,
    WorkerStats,
    role_stats,
)

log = logging.getLogger(__name__)
_MAX_TOMBSTONES = 4096  # reaped ids remembered so a late poll gets a final delta, not a KeyError


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    kind: str  # prefill | decode | colocated
    node_id: str
    endpoint: str  # transport endpoint served by prefill-capable workers ("" if none)
    transport: str
    device: str
    block_size: int
    pid: int
    config_tag: str = ""  # what ensure_pools created it for (a changed config replaces it)


@dataclass(frozen=True)
class PrefillOffer:
    """What a prefill returns to the orchestrator: the role's result plus the transport payload (if any)."""

    result: PrefillResult
    payload: bytes = b""


@dataclass(frozen=True)
class SourceRef:
    """How a decode worker reaches the prefill worker that holds a handle."""

    worker_id: str
    actor: Any  # ray.actor.ActorHandle of the prefill-capable worker
    endpoint: str


@dataclass(frozen=True)
class StartResult:
    placed: bool  # the transferred KV was used (False: prefill computed here)
    transfer_error: str | None = None


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the plain class)
        return "local"


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


class _Worker:
    kind: ClassVar[str] = ""

    def __init__(
        self, worker_id: str, config: PoolConfig, transport: str, config_tag: str = ""
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        tracing.setup_tracing(f"baton-{self.kind}")
        self.worker_id = worker_id
        self.config = config
        engine_config = config.engine
        if self.kind == "prefill":  # never runs a decode step: no decode graphs to capture at start
            engine_config = replace(engine_config, enforce_eager=True)
        engine = EngineCore(engine_config, worker_id=worker_id)
        self.loop = EngineLoop(engine)
        self.transport = make_transport(
            transport,
            worker_id=worker_id,
            device=engine.device,
            host=_node_ip(),
            timeout_s=config.transfer_timeout_s,
            export_arena_bytes=config.ipc_arena_mib << 20,
        )
        self.prefill_role = (
            PrefillRole(
                self.loop,
                lease_s=config.lease_s,
                export_alloc=self.transport.export_allocator(),
            )
            if self.kind != "decode"
            else None
        )
        self.decode_role = DecodeRole(self.loop) if self.kind != "prefill" else None
        self.endpoint = ""
        if self.prefill_role is not None:
            self.endpoint = self.transport.serve(
                self.prefill_role.buffer_for, self.prefill_role.note_sent
            )
        self._streams: dict[str, DeltaStream] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._traces: dict[str, DecodeTrace] = {}
        self._pair_locks: dict[str, asyncio.Lock] = {}
        self._polled: dict[str, float] = {}  # stream -> last poll (monotonic); set once started
        self._reaped: OrderedDict[str, float] = OrderedDict()  # bounded tombstones of orphans
        self._reaper: asyncio.Task[None] | None = None
        self.orphans_reaped = 0
        self._ids = itertools.count(1)
        self._info = WorkerInfo(
            worker_id,
            self.kind,
            _node_id(),
            self.endpoint,
            transport,
            str(engine.device),
            engine.pool.block_size,
            os.getpid(),
            config_tag,
        )
        self.publisher = (
            CachePublisher(worker_id, self.loop, config.prefix_directory)
            if config.prefix_directory is not None
            else None
        )

    async def info(self) -> WorkerInfo:
        if self.publisher is not None:  # first async call: the actor's event loop is running
            self.publisher.start()
        return self._info

    # -- prefill side -----------------------------------------------------------------------------
    def _need_prefill(self) -> PrefillRole:
        if self.prefill_role is None:
            raise RuntimeError(f"{self.worker_id} is a {self.kind} worker: it does not prefill")
        return self.prefill_role

    async def prefill(self, req: GenerateRequest) -> PrefillOffer:
        role = self._need_prefill()
        fut = role.prefill(
            req.request_id, req.prompt_token_ids, req.params, namespace=req.namespace
        )
        res: PrefillResult = await asyncio.wrap_future(fut)
        record_prefill(req, res, self.worker_id)
        payload = b""
        if res.handle is not None and self.transport.caps.exports_payload:
            held = role.buffer_for(req.request_id)
            if held is not None:
                payload = self.transport.export_payload(*held)
        return PrefillOffer(res, payload)

    async def open_pair(self, peer_id: str, generation: int) -> None:
        await asyncio.to_thread(self.transport.open_pair, peer_id, "", 0, generation)

    async def send_kv(self, request_id: str, peer_id: str, transfer_id: int) -> int:
        try:
            return await asyncio.to_thread(self.transport.send, request_id, peer_id, transfer_id)
        except Exception:
            self.transport.drop_pair(peer_id)
            raise

    async def ack(self, request_id: str) -> bool:
        return self._need_prefill().ack(request_id)

    # -- decode side ------------------------------------------------------------------------------
    def _need_decode(self) -> DecodeRole:
        if self.decode_role is None:
            raise RuntimeError(f"{self.worker_id} is a prefill worker: it does not decode")
        return self.decode_role

    async def start(
        self,
        req: GenerateRequest,
        offer: PrefillOffer | None = None,
        source: SourceRef | None = None,
        resume_tokens: tuple[int, ...] = (),
        unsent_from: int = 0,
        conditional: bool = False,
        first_sent: bool = False,
    ) -> StartResult:
        """Begin decoding. With an ``offer``: pull its KV from ``source`` (recompute on any failure);
        ``first_sent``: the caller already streamed the offer's first token, so it is not emitted
        again. With ``resume_tokens``: continue after tokens produced elsewhere (those from
        ``unsent_from`` on were not streamed yet). Neither: prefill here (``conditional``, or a
        recompute after a failed prefill)."""
        role = self._need_decode()
        kv, err, tokens, emit = None, None, resume_tokens, resume_tokens[unsent_from:]
        lps: tuple = ()
        trace = DecodeTrace.open(req, self.worker_id, self._info.transport)
        if offer is not None and offer.result.handle is not None:
            res = offer.result
            tokens, emit = (res.first_token_id,), (res.first_token_id,)
            lps = (res.first_logprob,) if res.first_logprob is not None else ()
            if first_sent:
                emit, lps = (), ()
            t0 = time.monotonic()
            try:
                kv = await self._pull(offer, source)
                role.transfers_ok += 1
                role.transfers.observe(time.monotonic() - t0, int(getattr(kv, "nbytes", 0)))
            except Exception as exc:  # noqa: BLE001 - every failure ends in one local recompute
                err = f"{type(exc).__name__}: {exc}"
                role.transfer_failures += 1
                role.transfers.fail(failure_reason(exc))
                log.warning(
                    "%s: KV pull of %s failed, recomputing: %s", self.worker_id, req.request_id, err
                )
            if source is not None:
                source.actor.ack.remote(
                    req.request_id
                )  # fire and forget: a dead source frees nothing
            if trace is not None:
                trace.transfer(
                    t0, int(getattr(kv, "nbytes", 0)), len(res.handle.block_ids), err, kv is None
                )
        stream = role.start(
            req.request_id,
            req.prompt_token_ids,
            req.params,
            namespace=req.namespace,
            output_token_ids=tokens,
            kv=kv,
            emit_prefix=emit,
            emit_prefix_logprobs=lps,
            num_cached_tokens=offer.result.num_cached_tokens if offer else 0,
            conditional=conditional,
        )
        aio = asyncio.get_running_loop()
        event = asyncio.Event()
        stream.on_put = lambda: aio.call_soon_threadsafe(event.set)
        self._streams[req.request_id] = stream
        self._events[req.request_id] = event
        try:
            placed = await asyncio.wrap_future(stream.placed)
        except Exception:
            self._forget(req.request_id)
            raise
        if trace is not None:
            trace.start_decode(bool(placed), bool(resume_tokens), len(tokens) - len(emit))
            self._traces[req.request_id] = trace
        if req.request_id in self._streams:  # the idle clock starts once the caller can poll
            self._polled[req.request_id] = time.monotonic()
            self._ensure_reaper()
        return StartResult(bool(placed), err)

    async def _pull(self, offer: PrefillOffer, source: SourceRef | None):
        handle = offer.result.handle
        assert handle is not None
        if time.time() >= handle.lease_deadline:
            raise TransferError(f"lease of {handle.request_id!r} expired before the pull")
        caps = self.transport.caps
        timeout = self.config.transfer_timeout_s
        if caps.needs_pair_group:
            if source is None:
                raise TransferError("a pair-group transfer needs its source")
            kv = await self._pair_transfer(handle, source)
        else:
            kv = await asyncio.wait_for(
                asyncio.to_thread(
                    self.transport.receive_verified,
                    handle,
                    endpoint=source.endpoint if source else "",
                    payload=offer.payload,
                    peer_id=handle.worker_id,
                ),
                timeout + 1.0,
            )
        return kv

    async def _pair_transfer(self, handle, source: SourceRef):
        timeout = self.config.transfer_timeout_s + 1.0
        lock = self._pair_locks.setdefault(source.worker_id, asyncio.Lock())
        async with lock:  # one transfer at a time per pair: sends and receives stay in order
            try:
                if not self.transport.has_pair(source.worker_id):
                    gen = next(self._ids)
                    await asyncio.wait_for(
                        asyncio.gather(
                            source.actor.open_pair.remote(self.worker_id, gen),
                            asyncio.to_thread(
                                self.transport.open_pair, source.worker_id, source.endpoint, 1, gen
                            ),
                        ),
                        timeout,
                    )
                tid = next(self._ids)
                send = asyncio.ensure_future(
                    source.actor.send_kv.remote(handle.request_id, self.worker_id, tid)
                )
                recv = asyncio.ensure_future(
                    asyncio.to_thread(
                        self.transport.receive_verified,
                        handle,
                        peer_id=source.worker_id,
                        transfer_id=tid,
                    )
                )
                done, _ = await asyncio.wait(
                    {send, recv}, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
                )
                if send in done and send.exception() is not None:
                    raise TransferError(f"source failed to send: {send.exception()}")
                if recv not in done:
                    recv_done, _ = await asyncio.wait({recv}, timeout=timeout)
                    if not recv_done:
                        raise TransferError("receive timed out")
                return recv.result()
            except ChecksumMismatch:
                raise  # every byte arrived: the pair group is still in step
            except BaseException:
                self.transport.drop_pair(source.worker_id)  # the next transfer opens a fresh group
                raise

    async def poll(self, request_id: str, max_wait_s: float = 0.5) -> list[GenerateDelta]:
        """Deltas ready for ``request_id``; the list ending in a final delta is the last one."""
        stream = self._streams.get(request_id)
        if stream is None:
            idle = self._reaped.pop(request_id, None)
            if idle is not None:
                return [
                    GenerateDelta(
                        request_id,
                        (),
                        "",
                        finish_reason="abort",
                        error=(
                            f"{self.worker_id} dropped the stream: not polled for {idle:.0f} s "
                            f"(orphan_timeout_s={self.config.orphan_timeout_s:g})"
                        ),
                    )
                ]
            raise KeyError(f"{self.worker_id} has no stream {request_id!r}")
        self._polled[request_id] = time.monotonic()
        items = stream.poll(0)
        if not items:
            event = self._events[request_id]
            event.clear()
            items = stream.poll(0)
            if not items:
                try:
                    await asyncio.wait_for(event.wait(), max_wait_s)
                except asyncio.TimeoutError:
                    pass
                items = stream.poll(0)
        if request_id in self._polled:  # a long wait is not idleness
            self._polled[request_id] = time.monotonic()
        trace = self._traces.get(request_id)
        if trace is not None and items:
            trace.observe(items)
        if items and items[-1].finish_reason is not None:
            self._forget(request_id)
        return items

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._events.pop(request_id, None)
        self._polled.pop(request_id, None)
        trace = self._traces.pop(request_id, None)
        if trace is not None:
            trace.close()

    async def abort(self, request_id: str) -> bool:
        hit = False
        if self.prefill_role is not None:
            hit = self.prefill_role.ack(request_id)
        if self.decode_role is not None and request_id in self._streams:
            hit = await asyncio.to_thread(self.decode_role.abort, request_id) or hit
        return hit

    # -- orphans ----------------------------------------------------------------------------------
    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        period = min(5.0, self.config.orphan_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.reap_orphans()
            except Exception:  # noqa: BLE001 - keep reaping; the next round retries
                log.exception("%s: reaping orphaned streams failed", self.worker_id)

    async def reap_orphans(self) -> int:
        """Abort and forget every started stream not polled for ``orphan_timeout_s``: its caller is
        gone (the router polls at least every ``poll_wait_s`` while it lives). Returns how many."""
        now = time.monotonic()
        limit = self.config.orphan_timeout_s
        stale = [(rid, now - t) for rid, t in self._polled.items() if now - t > limit]
        for rid, idle in stale:
            if self._polled.get(rid) is None or now - self._polled[rid] <= limit:
                continue  # polled (or finished) while an earlier abort ran
            if self.decode_role is not None:
                await asyncio.to_thread(self.decode_role.abort, rid)
            self._forget(rid)
            self._reaped[rid] = idle
            while len(self._reaped) > _MAX_TOMBSTONES:
                self._reaped.popitem(last=False)
            self.orphans_reaped += 1
            log.info(
                "%s: dropped orphaned stream %s (not polled for %.1f s)", self.worker_id, rid, idle
            )
        return len(stale)

    # -- introspection and tests ------------------------------------------------------------------
    async def stats(self) -> WorkerStats:
        return await asyncio.to_thread(
            role_stats, self.loop, self.kind, self.prefill_role, self.decode_role
        )

    async def reset_prefix_cache(self, namespace: str | None = None) -> int:
        """Forget cached blocks (one tenant namespace, or all); the directory hears a ``cleared``
        event on the next publish. Returns how many blocks were dropped."""
        return int(
            await asyncio.wrap_future(self.loop.call(lambda eng: eng.reset_prefix_cache(namespace)))
        )

    async def check_integrity(self) -> None:
        await asyncio.wrap_future(self.loop.call(lambda eng: eng.check_integrity()))

    async def set_faults(
        self,
        corrupt_next: int = 0,
        delay_s: float = 0.0,
        fail_next: int = 0,
        drop_stream_next: int = 0,
        drop_stream_mode: str = "abort",
    ) -> None:
        f = self.transport.faults
        f.corrupt_next, f.delay_s, f.fail_next = corrupt_next, delay_s, fail_next
        f.drop_stream_next, f.drop_stream_mode = drop_stream_next, drop_stream_mode

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self.publisher is not None:
            await self.publisher.stop()
        self.loop.stop()
        self.transport.close()


class PrefillWorker(_Worker):
    kind = "prefill"


class DecodeWorker(_Worker):
    kind = "decode"


class ColocatedWorker(_Worker):
    kind = "colocated"


WORKER_CLASSES: dict[str, type[_Worker]] = {
    "prefill": PrefillWorker,
    "decode": DecodeWorker,
    "colocated": ColocatedWorker,
}
