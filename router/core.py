"""``RouterCore``: everything between a parsed request and the engine client, shared by HTTP and
gRPC.

Order of a request (DESIGN.md, "The request path"): authenticate → model check → tokenize → explicit
context check (400 with the three numbers; truncation only when asked) → admission
(``AdmissionController``) → replica choice (``PrefixRouter``) → ``EngineClient.generate``.
``open_stream`` returns a stream whose first delta has already arrived, so every refusal an engine
can still raise becomes a status code before any byte is sent. Closing a stream early (client
disconnect, gRPC cancel) aborts the request on the workers and releases its admission ticket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from baton.cluster.serve_config import ServeConfig
from baton.router.admission import AdmissionController, Ticket, route_key
from baton.router.auth import Authenticator, Tenant
from baton.router.client_protocol import EngineClient, WorkerLoad
from baton.router.errors import (
    APIError,
    bad_request,
    context_overflow,
    model_not_found,
    unauthorized,
)
from baton.router.metrics import RouterMetrics
from baton.router.monitors import DriftMonitor, FinishRatio, InjectionDetector, StreamScanner
from baton.router.routing import PrefixRouter
from baton.router.tracing import RequestTrace, setup_tracing
from baton.workers.block_hash import CacheIdentity
from baton.workers.messages import GenerateDelta, GenerateRequest
from baton.workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_PARAM_RE = re.compile(r"invalid sampling parameter (\w+)=")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass(frozen=True)
class ModelInfo:
    """What the router must know about the served model without running it."""

    name: str
    aliases: tuple[str, ...]
    tokenizer: Any
    max_model_len: int
    block_size: int
    identity: CacheIdentity  # namespace field unused (the router sets it per tenant)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @classmethod
    def from_engine(cls, engine: Any, config: ServeConfig) -> ModelInfo:
        return cls(
            config.model.served_name(),
            config.model.aliases,
            engine.tokenizer,
            engine.max_model_len,
            engine.pool.block_size,
            engine.identity,
        )

    @classmethod
    def load(cls, config: ServeConfig) -> ModelInfo:
        """Tokenizer, context length and cache identity from the model directory (cluster mode)."""
        import torch
        from baton.workers import identity
        from baton.workers.engine import resolve_device
        from baton.workers.model_loader import load_config, resolve_dtype
        from baton.workers.model_runner import kv_cache_dtype_for
        from transformers import AutoTokenizer

        path = config.model.path
        if path is None:
            from baton.workers.default_model import default_model_path

            path = str(default_model_path())
        model_dir, hf_config = load_config(path)
        tok = AutoTokenizer.from_pretrained(config.model.tokenizer or str(model_dir))
        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
        max_len = min(config.engine.max_model_len or max_pos, max_pos)
        device = resolve_device(config.engine.device)
        if config.pools.decode.num_gpus > 0 and torch.cuda.is_available() is False:
            device = torch.device("cuda")  # the workers have GPUs even if the router does not
        model_dtype = resolve_dtype(config.engine.dtype, hf_config, device)
        kv = kv_cache_dtype_for(config.engine.kv_cache_dtype, model_dtype)
        ident = CacheIdentity(
            "",
            identity.tokenizer_hash(tok),
            identity.model_fingerprint(
                str(model_dir),
                dummy_seed=config.engine.seed if config.engine.load_format == "dummy" else None,
            ),
            str(kv).removeprefix("torch."),
        )
        return cls(
            config.model.served_name(),
            config.model.aliases,
            tok,
            max_len,
            config.engine.block_size,
            ident,
        )


@dataclass(frozen=True)
class Submission:
    """One sequence ready to run: tokenized, checked, with its sampling parameters."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    truncated: bool
    route: str  # "chat" | "completions" | "grpc" (predictor key)


def new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def trace_context(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The caller's W3C trace context if valid (it parents the ``request`` span), else empty."""
    if not (traceparent and _TRACEPARENT_RE.match(traceparent)):
        return {}
    ctx = {"traceparent": traceparent}
    if tracestate:
        ctx["tracestate"] = tracestate[:512]
    return ctx


class OpenStream:
    """A running request: iterate for deltas (the first already received); ``aclose`` aborts if unfinished."""

    def __init__(
        self,
        core: RouterCore,
        rid: str,
        ticket: Ticket,
        agen: AsyncIterator[GenerateDelta],
        first: GenerateDelta,
        arrival: float,
        tenant: Tenant,
        client_rid: str | None,
        route: str = "",
        trace: RequestTrace | None = None,
    ) -> None:
        self.core, self.request_id, self.ticket = core, rid, ticket
        self._agen, self._first, self._arrival = agen, first, arrival
        self.tenant, self.client_rid = tenant, client_rid
        self.route, self.trace = route, trace
        self.done = False
        self._last_token_t: float | None = None
        self.token_ids: list[int] = []
        self.prompt_tokens = self.cached_tokens = 0
        self.error: str | None = None
        self.scanner = core._stream_scanner()

    def __aiter__(self) -> OpenStream:
        return self

    async def __anext__(self) -> GenerateDelta:
        if self.done:
            raise StopAsyncIteration
        if self._first is not None:
            delta, self._first = self._first, None
        else:
            try:
                delta = await self._agen.__anext__()
            except StopAsyncIteration:
                delta = GenerateDelta(
                    self.request_id,
                    (),
                    "",
                    finish_reason="error",
                    error="the worker stream ended without a finish reason",
                )
        self.core._on_delta(self, delta)
        if delta.finish_reason is not None:
            self.done = True
            self.core._finish(self, delta.finish_reason)
        return delta

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.core._finish(self, None)
        close = getattr(self._agen, "aclose", None)
        if close is not None:
            self.core._background(close())


class RouterCore:
    def __init__(
        self,
        config: ServeConfig,
        client: EngineClient,
        model: ModelInfo,
        auth: Authenticator,
        *,
        directory: Any | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.model = model
        self.auth = auth
        obs = config.observability
        setup_tracing(obs.service_name, endpoint=obs.otlp_endpoint)  # once per process
        self.metrics = metrics or RouterMetrics(model.name, tenants=auth.tenant_names)
        self.injection = InjectionDetector(obs.injection_patterns, obs.injection_heuristics)
        self.finish_ratio = FinishRatio(obs.finish_ratio_window)
        self.drift = DriftMonitor(
            obs.drift_recent, obs.drift_baseline_alpha, min_samples=obs.drift_min_samples
        )
        self._refreshes = 0
        total = config.admission.kv_blocks_override or 1
        self.admission = AdmissionController(
            config.admission, total_blocks=total, block_size=model.block_size
        )
        self.router = PrefixRouter(model.identity, model.block_size, directory=directory)
        self.directory = directory
        self.loads: list[WorkerLoad] = []
        self._live: dict[tuple[str, str], str] = {}  # (tenant, client request id) -> internal id
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self.refresh_interval_s = 0.5

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh_loads()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh_loads()
            except Exception:  # noqa: BLE001 - keep the last view; /health reports the failure
                log.exception("refreshing pool stats failed")

    async def refresh_loads(self) -> list[WorkerLoad]:
        loads = await self.client.stats()
        self.loads = loads
        decode = [w for w in loads if w.serves_decode and w.ready]
        if decode and self.config.admission.kv_blocks_override is None:
            self.admission.set_capacity(
                sum(w.num_total_blocks for w in decode), decode[0].block_size
            )
        self.metrics.observe_loads(loads)
        self._refreshes += 1
        if self.directory is not None and self._refreshes % 10 == 1:
            try:
                stats = await asyncio.wait_for(self.directory.stats.remote(), 2.0)
                self.metrics.observe_directory(stats)
            except Exception as exc:  # noqa: BLE001 - advisory: keep serving without it
                log.debug("prefix directory stats failed: %s", exc)
        return loads

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.client.close()

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- checks -----------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Tenant:
        tenant = self.auth.authenticate(key)
        if tenant is None or (tenant.admin and not self.auth.dev_mode):
            raise unauthorized()
        return tenant

    def authenticate_admin(self, key: str | None) -> Tenant:
        tenant = self.auth.authenticate(key)
        if tenant is None or not tenant.admin:
            raise unauthorized()
        return tenant

    def check_model(self, name: str) -> None:
        if name not in self.model.names:
            raise model_not_found(name, list(self.model.names))

    def encode(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", param)
            return list(self.model.tokenizer.encode(prompt, add_special_tokens=True))
        ids = [int(t) for t in prompt]
        if not ids:
            raise bad_request("prompt must not be empty", param)
        vocab = len(self.model.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param)
        return ids

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            ids = self.model.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # noqa: BLE001 - a template error is the caller's input problem
            raise bad_request(
                f"messages could not be rendered with the chat template: {exc}", "messages"
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    @staticmethod
    def sampling_params(**kw: Any) -> SamplingParams:
        try:
            return SamplingParams(**{k: v for k, v in kw.items() if v is not None})
        except ValueError as exc:
            m = _PARAM_RE.search(str(exc))
            raise bad_request(str(exc), m.group(1) if m else None) from None

    def fit_context(
        self, ids: list[int], params: SamplingParams, truncate_prompt_tokens: int | None
    ) -> tuple[list[int], bool]:
        """Explicit context check. ``truncate_prompt_tokens=k`` keeps the last k prompt tokens (-1:
        as many as fit beside max_tokens); without it an overflow is a 400 with the three
        numbers."""
        limit = self.model.max_model_len
        if params.max_tokens >= limit:
            raise context_overflow(len(ids), params.max_tokens, limit)
        truncated = False
        if truncate_prompt_tokens is not None:
            keep = (
                limit - params.max_tokens
                if truncate_prompt_tokens == -1
                else truncate_prompt_tokens
            )
            if len(ids) > keep:
                ids, truncated = ids[-keep:], True
        if len(ids) + params.max_tokens > limit:
            raise context_overflow(len(ids), params.max_tokens, limit)
        return ids, truncated

    # -- running ----------------------------------------------------------------------------------
    async def open_stream(
        self,
        tenant: Tenant,
        sub: Submission,
        *,
        arrival: float,
        trace: dict[str, str] | None = None,
        client_request_id: str | None = None,
    ) -> OpenStream:
        rid = f"{tenant.name}-{uuid.uuid4().hex}"
        if client_request_id is not None:
            if (tenant.name, client_request_id) in self._live:
                raise bad_request(
                    f"request_id {client_request_id!r} is already running", "request_id"
                )
        key = route_key(tenant.namespace, sub.route)
        span = RequestTrace.open(
            trace,
            model=self.model.name,
            tenant=tenant.name,
            route=sub.route,
            request_id=rid,
            prompt_tokens=len(sub.prompt_ids),
            params=sub.params,
            block_size=self.model.block_size,
        )
        if span is not None:
            span.admission_started()
        try:
            ticket = await self.admission.acquire(
                rid, tenant.name, key, len(sub.prompt_ids), sub.params.max_tokens
            )
        except APIError as exc:
            self.metrics.rejections.labels(
                self.model.name, exc.code or "rejected", self.metrics.tenant(tenant.name)
            ).inc()
            if span is not None:
                span.failed(exc)
            raise
        except BaseException as exc:
            if span is not None:
                span.failed(exc)
            raise
        if span is not None:
            span.admission_done(ticket.queue_time_s, ticket.predicted)
        self.metrics.queue_time.labels(self.model.name).observe(ticket.queue_time_s)
        self._gauges()
        try:
            route = await self.router.pick(
                sub.prompt_ids,
                tenant.namespace,
                self.loads,
                short_prompt_tokens=self.config.pools.short_prompt_tokens,
            )
            if span is not None:
                span.routed(
                    getattr(route, "prefill_worker", None),
                    getattr(route, "decode_worker", None),
                    int(getattr(route, "num_cached_tokens", 0) or 0),
                )
            carry = (
                span.carry() if span is not None else (trace or {"traceparent": new_traceparent()})
            )
            req = GenerateRequest(
                rid,
                sub.prompt_ids,
                sub.params,
                namespace=tenant.namespace,
                tenant=tenant.name,
                trace_context=carry,
                deadline_s=self.config.server.request_timeout_s,
            )
            self.metrics.router_overhead.labels(self.model.name).observe(
                time.monotonic() - arrival - ticket.queue_time_s
            )
            agen = self.client.generate(req, route)
            first = await agen.__anext__()
        except BaseException as exc:
            self.admission.release(ticket, None)
            self._gauges()
            self._background(self.client.abort(rid))
            if span is not None:
                span.failed(exc)
            if isinstance(exc, APIError):
                raise
            if isinstance(exc, ValueError):  # engine-side validation (context, KV capacity, vocab)
                d = {
                    k: getattr(exc, k)
                    for k in ("prompt_tokens", "max_tokens", "max_model_len")
                    if hasattr(exc, k)
                }
                if d:
                    raise context_overflow(
                        d["prompt_tokens"], d["max_tokens"], d["max_model_len"]
                    ) from None
                raise bad_request(str(exc)) from None
            if isinstance(exc, StopAsyncIteration):
                raise APIError(503, "the worker closed the stream before answering") from None
            raise
        stream = OpenStream(
            self, rid, ticket, agen, first, arrival, tenant, client_request_id, sub.route, span
        )
        if client_request_id is not None:
            self._live[(tenant.name, client_request_id)] = rid
        return stream

    def _stream_scanner(self) -> StreamScanner | None:
        return StreamScanner(self.injection) if self.config.observability.scan_outputs else None

    def inspect_prompt(self, texts: Sequence[str]) -> set[str]:
        """Count prompt-injection indicators in a request's user-supplied text (labels only)."""
        hits: set[str] = set()
        for text in texts:
            if text:
                hits |= self.injection.scan(text)
        for name in hits:
            self.metrics.injection.labels(self.model.name, "prompt", name).inc()
        return hits

    def _on_delta(self, s: OpenStream, d: GenerateDelta) -> None:
        n = len(d.token_ids)
        if d.num_prompt_tokens:
            s.prompt_tokens = d.num_prompt_tokens
        if d.error:
            s.error = d.error
        if n:
            now = time.monotonic()
            m = self.model.name
            if s._last_token_t is None:
                self.metrics.ttft.labels(m).observe(now - s._arrival)
                self.metrics.prompt_tokens.labels(m).inc(d.num_prompt_tokens)
                self.metrics.cached_tokens.labels(m).inc(d.num_cached_tokens)
                s.cached_tokens = d.num_cached_tokens
                if s.trace is not None:
                    s.trace.first_token()
            else:
                self.metrics.itl.labels(m).observe((now - s._last_token_t) / n)
            s._last_token_t = now
            s.token_ids.extend(d.token_ids)
            self.metrics.generation_tokens.labels(m).inc(n)
            self.metrics.tenant_tokens.labels(m, self.metrics.tenant(s.tenant.name)).inc(n)
            self.admission.progress(s.ticket, n)
        if s.scanner is not None and d.text:
            for name in s.scanner.feed(d.text):
                self.metrics.injection.labels(self.model.name, "output", name).inc()

    def _finish(self, s: OpenStream, reason: str | None) -> None:
        m = self.model.name
        self.admission.release(s.ticket, reason)
        if s.client_rid is not None:
            self._live.pop((s.tenant.name, s.client_rid), None)
        if reason is None:  # closed early: the client went away
            self._background(self.client.abort(s.request_id))
            reason = "abort"
        self.metrics.requests.labels(m, reason).inc()
        self.metrics.tenant_requests.labels(m, self.metrics.tenant(s.tenant.name), reason).inc()
        self.metrics.e2e.labels(m).observe(time.monotonic() - s._arrival)
        if reason in ("stop", "length"):
            self.metrics.prediction_error.labels(m).observe(s.ticket.generated - s.ticket.predicted)
            self.drift.observe(s.route, s.token_ids)
            r = self.drift.reading(s.route)
            if r is not None:
                self.metrics.drift_score.labels(m, s.route).set(r.score)
                self.metrics.token_js.labels(m, s.route).set(r.token_js)
                self.metrics.output_length.labels(m, s.route, "recent").set(r.recent_mean_tokens)
                self.metrics.output_length.labels(m, s.route, "baseline").set(
                    r.baseline_mean_tokens
                )
        if reason != "abort":
            self.metrics.finish_length_ratio.labels(m).set(self.finish_ratio.observe(reason))
        if s.trace is not None:
            s.trace.finish(
                reason,
                prompt_tokens=s.prompt_tokens,
                cached_tokens=s.cached_tokens,
                output_tokens=len(s.token_ids),
                error=s.error,
            )
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.router_admitted.labels(self.model.name).set(self.admission.num_admitted)
        self.metrics.router_queued.labels(self.model.name).set(self.admission.num_queued)

    async def abort(self, tenant: Tenant, client_request_id: str) -> bool:
        rid = self._live.get((tenant.name, client_request_id))
        if rid is None:
            return False
        await self.client.abort(rid)
        return True

    async def health(self) -> tuple[bool, list[WorkerLoad]]:
        """Healthy only when every pool has a ready worker (and the client says so)."""
        try:
            ok = await self.client.health()
            loads = await self.refresh_loads()
        except Exception as exc:  # noqa: BLE001 - unhealthy, with the reason logged
            log.warning("health check failed: %s", exc)
            return False, []
        roles = {w.role for w in loads}
        pools_ok = all(any(w.ready and w.role == r for w in loads) for r in roles) and any(
            w.ready and w.serves_decode for w in loads
        )
        return ok and pools_ok, loads

    async def purge_prefix_cache(self, namespace: str | None) -> dict[str, Any]:
        """Admin purge: the directory's entries (when it runs) and the workers' cached blocks."""
        result: dict[str, Any] = {"namespace": namespace}
        try:
            from baton.cluster.prefix_directory import admin_purge
        except ImportError:
            admin_purge = None  # type: ignore[assignment]
        if admin_purge is not None and self.directory is not None:
            try:
                result["directory_entries_removed"] = int(await admin_purge(namespace))
            except ValueError as exc:  # no directory running after all
                result["directory_error"] = str(exc)
        result["worker_blocks_reset"] = int(await self.client.reset_prefix_cache(namespace))
        return result
