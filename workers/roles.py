"""Worker roles: plain classes that drive one ``EngineCore`` from one background thread (no Ray, no gRPC).

The engine is single-threaded, so every role funnels its work through an ``EngineLoop``: callers on any thread
post closures to a queue; the loop thread runs them, steps the engine while it has work, and hands each
``RequestOutput`` to the sink registered for its request. Roles differ by what they register, not by engine:

- ``PrefillRole``: prefill-only requests. The step that samples the first token exports the prompt's KV into one
  contiguous buffer (eagerly, so a pull never waits for an engine step), checksums it and returns a
  ``PrefillResult`` with a ``KVHandle``. Blocks and buffer are held until ``ack`` or the lease expires (the lease
  clock is injectable, expiry runs on the loop thread).
- ``DecodeRole``: inserts a request with its fetched KV (``add_prefilled_request``), or without it (the engine then
  recomputes the prefill: conditional disaggregation, transfer failure, resume after a dead decode worker), and
  streams ``GenerateDelta``s through a thread-safe queue per request. ``abort`` frees at once.
- ``ColocatedRole``: both over one engine (small deployments, benchmark baseline).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from baton.workers.engine import EngineCore
from baton.workers.kv_handle import (
    KV_LAYOUT,
    ExportAlloc,
    KVHandle,
    default_algo,
    dtype_name,
    kv_checksum,
)
from baton.workers.messages import GenerateDelta
from baton.workers.outputs import RequestOutput, TokenLogprob
from baton.workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class WorkerStats:
    """One worker's load and transfer counters, as the router and the benchmarks read them."""

    worker_id: str
    role: str
    kv_usage: float
    num_running: int
    num_waiting: int
    num_held: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    prompt_tokens_computed: int  # everything the engine prefilled here
    conditional_prompt_tokens: int  # prompts sent here on purpose (short/uncached, or colocated)
    recomputed_prompt_tokens: int  # prefills redone here after a failed transfer or a resume
    kv_bytes_received: int
    kv_bytes_sent: int
    transfers_ok: int
    transfer_failures: int
    leases_expired: int
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    transfer_buckets: tuple[int, ...] = ()  # per TRANSFER_BUCKETS (+Inf last), not cumulative
    transfer_seconds_sum: float = 0.0
    transfer_bytes: int = 0
    transfer_failure_reasons: tuple[tuple[str, int], ...] = ()


TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TransferTally:
    """A decode worker's KV pulls: latency histogram, bytes and failures by reason. Kept here as plain
    counts (no metrics library in workers/); the router exports them from ``WorkerStats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.buckets = [0] * (len(TRANSFER_BUCKETS) + 1)
        self.seconds_sum = 0.0
        self.bytes = 0
        self.failures: dict[str, int] = {}

    def observe(self, seconds: float, nbytes: int) -> None:
        i = next((i for i, b in enumerate(TRANSFER_BUCKETS) if seconds <= b), len(TRANSFER_BUCKETS))
        with self._lock:
            self.buckets[i] += 1
            self.seconds_sum += seconds
            self.bytes += nbytes

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1


@dataclass(frozen=True)
class PrefillResult:
    """The outcome of a prefill: the first token and a handle on the held KV, or a final delta when the request
    already ended at its first token (stop, length or error; then nothing is held)."""

    request_id: str
    first_token_id: int | None
    first_logprob: TokenLogprob | None
    handle: KVHandle | None
    final: GenerateDelta | None
    num_cached_tokens: int = 0
    metrics: dict[str, float] | None = None  # the engine's monotonic timestamps (tracing)
    prefill_chunks: tuple[tuple[float, int], ...] = ()  # (monotonic end, tokens) per chunk
    # The first token's text as this worker's detokenizer produced it ("" while a stop string may
    # still match): the caller can stream the first token before the KV reaches a decode worker.
    first_text: str = ""


def to_delta(
    out: RequestOutput, worker_id: str, prefix: Sequence[int] = (), prefix_lp: Sequence = ()
) -> GenerateDelta:
    comp = out.outputs[0]
    lps = comp.delta_logprobs
    logprobs = None if lps is None else tuple(prefix_lp) + tuple(lps)
    return GenerateDelta(
        request_id=out.request_id,
        token_ids=tuple(prefix) + tuple(comp.delta_token_ids),
        text=comp.delta_text,
        logprobs=logprobs,
        finish_reason=comp.finish_reason if out.finished else None,
        stop_reason=comp.stop_reason,
        num_prompt_tokens=len(out.prompt_token_ids),
        num_cached_tokens=out.num_cached_tokens,
        error=out.error,
        num_preemptions=out.num_preemptions,
        worker_id=worker_id,
    )


class EngineLoop:
    """Owns the engine's thread. ``call(fn)`` runs ``fn(engine)`` there and returns a ``Future``."""

    def __init__(self, engine: EngineCore, *, idle_wait_s: float = 0.02) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._tickers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{engine.worker_id}", daemon=True
        )
        self._thread.start()

    def add_ticker(self, fn: Callable[[], None]) -> None:
        """``fn`` runs on the loop thread at least every ``idle_wait_s`` (lease expiry and the like)."""
        self._tickers.append(fn)

    def call(self, fn: Callable[[EngineCore], object]) -> Future:
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine loop is stopped"))
        else:
            self._cmds.put(run)
        return fut

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def register(self, request_id: str, sink: Sink) -> None:
        """Route this request's outputs to ``sink`` (loop thread only; dropped after the finished one)."""
        self._sinks[request_id] = sink

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            try:  # idle: sleep on the queue; busy: only take what is already there
                wait = None if eng.has_unfinished_requests() else self.idle_wait_s
                cmd = self._cmds.get(timeout=wait) if wait else self._cmds.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            for tick in self._tickers:
                tick()
            if eng.has_unfinished_requests():
                try:
                    outputs = eng.step()
                except Exception as exc:  # noqa: BLE001 - the loop must survive and fail requests once
                    log.exception("engine %s step failed", eng.worker_id)
                    self._fail_all(f"engine step failed: {exc}")
                    continue
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
                    if sink is not None:
                        sink(out)

    def _fail_all(self, message: str) -> None:
        for rid in list(self._sinks):
            self.engine.abort_request(rid)
        for out in self.engine.step() if self.engine.has_unfinished_requests() else []:
            sink = self._sinks.pop(out.request_id, None)
            if sink is not None:
                out.error = message
                out.outputs[0].finish_reason = "error"
                sink(out)


class PrefillRole:
    def __init__(
        self,
        loop: EngineLoop,
        *,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        export_alloc: ExportAlloc | None = None,
    ) -> None:
        self.loop = loop
        self.worker_id = loop.engine.worker_id
        self.lease_s = lease_s
        self.clock = clock
        self.export_alloc = export_alloc
        self._lock = threading.Lock()
        self._held: dict[str, tuple[KVHandle, torch.Tensor]] = {}
        # Frees of held exports that live in export_alloc's memory (on ack, abort, lease expiry).
        self._release: dict[str, Callable[[], None]] = {}
        self.kv_bytes_sent = 0
        self.leases_expired = 0
        loop.add_ticker(self._expire)

    def prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        namespace: str | None = None,
    ) -> Future:
        """``Future[PrefillResult]``; validation errors surface as the future's exception."""
        result: Future = Future()

        def sink(out: RequestOutput) -> None:
            try:
                result.set_result(self._result(out))
            except Exception as exc:  # noqa: BLE001 - export failure: the caller recomputes
                self.loop.engine.release_request(out.request_id)
                result.set_exception(exc)

        def add(eng: EngineCore) -> None:
            eng.add_request(
                request_id, prompt_token_ids, params, namespace=namespace, prefill_only=True
            )
            self.loop.register(request_id, sink)

        added = self.loop.call(add)
        added.add_done_callback(lambda f: f.exception() and result.set_exception(f.exception()))
        return result

    def _result(self, out: RequestOutput) -> PrefillResult:
        comp = out.outputs[0]
        first = comp.token_ids[0] if comp.token_ids else None
        first_lp = comp.logprobs[0] if comp.logprobs else None
        if (
            out.finished and comp.finish_reason is not None
        ):  # ended at its first token, or error/abort
            return PrefillResult(
                out.request_id,
                first,
                first_lp,
                None,
                to_delta(out, self.worker_id),
                out.num_cached_tokens,
                dict(out.metrics),
                tuple(out.prefill_chunks),
            )
        eng = self.loop.engine
        blocks = eng.held_blocks(out.request_id)
        slot, release = self._export_slot(eng, len(blocks))
        try:
            buffer = eng.export_kv(out.request_id, out=slot)  # [L, 2, n, bs, H, D]
            handle = KVHandle(
                worker_id=self.worker_id,
                request_id=out.request_id,
                block_ids=tuple(blocks),
                shape=tuple(buffer.shape),
                dtype=dtype_name(buffer.dtype),
                layout=KV_LAYOUT,
                checksum=kv_checksum(buffer),
                checksum_algo=default_algo(buffer),
                lease_deadline=self.clock() + self.lease_s,
                num_prompt_tokens=len(out.prompt_token_ids),
                num_cached_tokens=out.num_cached_tokens,
            )
        except BaseException:
            if release is not None:
                release()
            raise
        with self._lock:
            self._held[out.request_id] = (handle, buffer)
            if release is not None:
                self._release[out.request_id] = release
        return PrefillResult(
            out.request_id,
            first,
            first_lp,
            handle,
            None,
            out.num_cached_tokens,
            dict(out.metrics),
            tuple(out.prefill_chunks),
            comp.delta_text,
        )

    def _export_slot(
        self, eng: EngineCore, n_blocks: int
    ) -> tuple[torch.Tensor | None, Callable[[], None] | None]:
        """Where to gather the export: ``export_alloc``'s memory, or (None, None): a fresh buffer."""
        if self.export_alloc is None:
            return None, None
        cache = eng.runner.kv_cache  # [L, 2, N, bs, H, D]
        got = self.export_alloc((cache.shape[0], 2, n_blocks, *cache.shape[3:]), cache.dtype)
        return got if got is not None else (None, None)

    def buffer_for(self, request_id: str) -> tuple[KVHandle, torch.Tensor] | None:
        """The held export if its lease is still valid (any thread; transports call this)."""
        with self._lock:
            held = self._held.get(request_id)
        if held is None or self.clock() >= held[0].lease_deadline:
            return None
        return held

    def note_sent(self, nbytes: int) -> None:
        with self._lock:
            self.kv_bytes_sent += nbytes

    def ack(self, request_id: str) -> bool:
        """Decode has the KV (or gave up on it): free blocks and buffer now."""
        with self._lock:
            held = self._held.pop(request_id, None)
            release = self._release.pop(request_id, None)
        if release is not None:
            release()
        if held is None:
            return False
        self.loop.call(lambda eng: eng.release_request(request_id))
        return True

    def abort(self, request_id: str) -> bool:
        if self.ack(request_id):
            return True
        return bool(self.loop.call(lambda eng: eng.abort_request(request_id)).result(30))

    def num_held(self) -> int:
        with self._lock:
            return len(self._held)

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            gone = [rid for rid, (h, _) in self._held.items() if now >= h.lease_deadline]
            releases = [self._release.pop(rid, None) for rid in gone]
            for rid in gone:
                del self._held[rid]
        for release in releases:
            if release is not None:
                release()
        for rid in gone:
            self.leases_expired += 1
            self.loop.engine.release_request(rid)  # we are on the loop thread
            log.info("%s: lease of %s expired, blocks freed", self.worker_id, rid)


class DeltaStream:
    """A request's deltas, produced on the loop thread and consumed from any thread."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: queue.SimpleQueue[GenerateDelta] = queue.SimpleQueue()
        self.placed: Future = Future()  # True when the fetched KV was placed, False when recomputed
        self.on_put: Callable[[], None] | None = None  # called on the loop thread after each delta

    def put(self, delta: GenerateDelta) -> None:
        self.queue.put(delta)
        if self.on_put is not None:
            self.on_put()

    def poll(self, max_wait_s: float) -> list[GenerateDelta]:
        """Whatever is ready, waiting at most ``max_wait_s`` for the first delta."""
        try:
            items = [
                self.queue.get(timeout=max_wait_s) if max_wait_s > 0 else self.queue.get_nowait()
            ]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items


class DecodeRole:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.worker_id = loop.engine.worker_id
        self._streams: dict[str, DeltaStream] = {}
        self._lock = threading.Lock()
        self.conditional_prompt_tokens = 0
        self.recomputed_prompt_tokens = 0
        self.transfers_ok = 0
        self.transfer_failures = 0
        self.transfers = TransferTally()

    def start(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        namespace: str | None = None,
        output_token_ids: Sequence[int] = (),
        kv: torch.Tensor | None = None,
        emit_prefix: Sequence[int] = (),
        emit_prefix_logprobs: Sequence[TokenLogprob] = (),
        num_cached_tokens: int = 0,
        conditional: bool = False,
    ) -> DeltaStream:
        """Insert a request. Without ``output_token_ids`` it is a plain local generate (conditional
        disaggregation). With them, ``kv`` (or None: recompute) covers the prompt; ``emit_prefix`` are tokens the
        caller has not streamed yet (the prefill's first token), prepended to the first delta."""
        stream = DeltaStream(request_id)
        pending = [list(emit_prefix), list(emit_prefix_logprobs)]

        def sink(out: RequestOutput) -> None:
            stream.put(to_delta(out, self.worker_id, pending[0], pending[1]))
            pending[0], pending[1] = [], []
            if out.finished:
                with self._lock:
                    self._streams.pop(request_id, None)

        def add(eng: EngineCore) -> bool:
            if output_token_ids:
                placed = eng.add_prefilled_request(
                    request_id,
                    prompt_token_ids,
                    output_token_ids,
                    params,
                    kv,
                    namespace=namespace,
                    num_cached_tokens=num_cached_tokens,
                )
            else:
                eng.add_request(request_id, prompt_token_ids, params, namespace=namespace)
                placed = False
            self.loop.register(request_id, sink)
            n = len(prompt_token_ids)
            if conditional:
                self.conditional_prompt_tokens += n
            elif not placed:
                self.recomputed_prompt_tokens += n + max(0, len(output_token_ids) - 1)
            return placed

        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r} is already running on {self.worker_id}")
            self._streams[request_id] = stream
        added = self.loop.call(add)

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                with self._lock:
                    self._streams.pop(request_id, None)
                stream.placed.set_exception(exc)
            else:
                stream.placed.set_result(f.result())

        added.add_done_callback(done)
        return stream

    def stream(self, request_id: str) -> DeltaStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Free the request's blocks now; its stream gets a final ``abort`` delta."""
        return bool(self.loop.call(lambda eng: eng.abort_request(request_id)).result(30))


class ColocatedRole:
    """Prefill and decode on one engine: ``prefill``/``ack`` and ``start``/``abort`` share its blocks."""

    def __init__(
        self, loop: EngineLoop, *, lease_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.loop = loop
        self.prefill_role = PrefillRole(loop, lease_s=lease_s, clock=clock)
        self.decode_role = DecodeRole(loop)
        self.prefill = self.prefill_role.prefill
        self.ack = self.prefill_role.ack
        self.buffer_for = self.prefill_role.buffer_for
        self.start = self.decode_role.start
        self.stream = self.decode_role.stream

    def abort(self, request_id: str) -> bool:
        if self.prefill_role.ack(request_id):
            return True
        return self.decode_role.abort(request_id)


def role_stats(
    loop: EngineLoop,
    role: str,
    prefill: PrefillRole | None,
    decode: DecodeRole | None,
    timeout: float = 30.0,
) -> WorkerStats:
    """A consistent snapshot, taken on the loop thread."""
    s = loop.call(lambda eng: eng.stats()).result(timeout)
    sch = s.scheduler
    tally = decode.transfers if decode else TransferTally()
    with tally._lock:
        buckets, secs, nbytes = tuple(tally.buckets), tally.seconds_sum, tally.bytes
        reasons = tuple(sorted(tally.failures.items()))
    return WorkerStats(
        worker_id=loop.engine.worker_id,
        role=role,
        kv_usage=sch.kv_usage,
        num_running=sch.num_running,
        num_waiting=sch.num_waiting,
        num_held=sch.num_held,
        num_free_blocks=sch.num_free_blocks,
        num_total_blocks=sch.num_total_blocks,
        block_size=s.block_size,
        prompt_tokens_computed=s.prompt_tokens_computed,
        conditional_prompt_tokens=decode.conditional_prompt_tokens if decode else 0,
        recomputed_prompt_tokens=decode.recomputed_prompt_tokens if decode else 0,
        kv_bytes_received=s.kv_bytes_received,
        kv_bytes_sent=prefill.kv_bytes_sent if prefill else 0,
        transfers_ok=decode.transfers_ok if decode else 0,
        transfer_failures=decode.transfer_failures if decode else 0,
        leases_expired=prefill.leases_expired if prefill else 0,
        num_preemptions=sch.num_preemptions,
        prefix_queries=s.prefix_queries,
        prefix_hits=s.prefix_hits,
        transfer_buckets=buckets,
        transfer_seconds_sum=secs,
        transfer_bytes=nbytes,
        transfer_failure_reasons=reasons,
    )
