"""The router's spans of one sequence: ``request`` (kind SERVER, the trace's entry), ``admission``
and the admission ``queue`` wait as its children; the workers add ``prefill``, ``kv_transfer`` and
``decode`` under ``request`` through the carried ``traceparent`` (``baton.cluster.tracing``).

A client's valid ``traceparent`` (HTTP header or gRPC metadata) becomes the parent of ``request``.
Attributes follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``) plus Baton's own
(``baton.tenant``, ``baton.prefix.cached_tokens``, ``baton.kv.blocks``). Never the API key, never
prompt or completion text.
"""

from __future__ import annotations

import time
from typing import Any

from baton.cluster import tracing
from baton.cluster.tracing import setup_tracing  # noqa: F401 - the router's entry point too
from baton.workers.sampling_params import SamplingParams
from opentelemetry.trace import SpanKind

OPERATION = {"chat": "chat", "completions": "text_completion", "grpc": "text_completion"}


class RequestTrace:
    """Spans of one admitted-or-refused sequence; ``open`` gives None when tracing is off."""

    def __init__(
        self,
        incoming: dict[str, str],
        model: str,
        tenant: str,
        route: str,
        request_id: str,
        prompt_tokens: int,
        params: SamplingParams,
        block_size: int,
    ) -> None:
        self._t = tracing.tracer()
        self.block_size = block_size
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION.get(route, route),
            "gen_ai.system": "baton",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": float(params.temperature),
            "gen_ai.request.top_p": float(params.top_p),
            "gen_ai.response.id": request_id,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "baton.tenant": tenant,
            "baton.route": route,
        }
        if params.seed is not None:
            attrs["gen_ai.request.seed"] = int(params.seed)
        self.span = self._t.start_span(
            "request", context=tracing.extract(incoming), kind=SpanKind.SERVER, attributes=attrs
        )
        self.ctx = tracing.context_with(self.span)
        self._admission: Any | None = None
        self._ended = False

    @classmethod
    def open(cls, incoming: dict[str, str] | None, **kw: Any) -> RequestTrace | None:
        return cls(incoming or {}, **kw) if tracing.enabled() else None

    def carry(self) -> dict[str, str]:
        """The W3C context the workers parent their spans on."""
        return tracing.inject(self.ctx)

    def admission_started(self) -> None:
        self._admission = self._t.start_span("admission", context=self.ctx)

    def admission_done(
        self, queue_time_s: float, predicted: int | None, error: BaseException | None = None
    ) -> None:
        span = self._admission
        if span is None:
            return
        now = time.time_ns()
        if queue_time_s > 0:
            q = self._t.start_span(
                "queue",
                context=tracing.context_with(span),
                start_time=now - int(queue_time_s * 1e9),
                attributes={"baton.queue": "router_admission"},
            )
            q.end(end_time=now)
        span.set_attribute("baton.admission.queue_seconds", queue_time_s)
        if predicted is not None:
            span.set_attribute("baton.admission.predicted_output_tokens", predicted)
        if error is not None:
            code = getattr(error, "code", None) or type(error).__name__
            span.set_attribute("baton.admission.rejected", str(code))
            tracing.fail(span, str(code))
        span.end(end_time=now)
        self._admission = None

    def routed(self, prefill: str | None, decode: str | None, cached_tokens: int) -> None:
        self.span.set_attribute("baton.route.prefill_worker", prefill or "")
        self.span.set_attribute("baton.route.decode_worker", decode or "")
        if cached_tokens:
            self.span.set_attribute("baton.prefix.expected_cached_tokens", cached_tokens)

    def first_token(self) -> None:
        self.span.add_event("first_token")

    def finish(
        self,
        reason: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        output_tokens: int,
        error: str | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        s = self.span
        s.set_attribute("gen_ai.response.finish_reasons", (reason,))
        s.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if prompt_tokens:
            s.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        s.set_attribute("baton.prefix.cached_tokens", cached_tokens)
        total = prompt_tokens + output_tokens
        s.set_attribute("baton.kv.blocks", -(-total // self.block_size) if total else 0)
        if error:
            tracing.fail(s, error)
        s.end()

    def failed(self, exc: BaseException) -> None:
        if self._ended:
            return
        self._ended = True
        if self._admission is not None:
            self.admission_done(0.0, None, exc)
        status = getattr(exc, "status", None)
        if status is not None:
            self.span.set_attribute("http.response.status_code", int(status))
        tracing.fail(self.span, getattr(exc, "code", None) or type(exc).__name__)
        self.span.end()
