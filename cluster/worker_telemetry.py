"""What the worker actors record about a request: spans (``queue``, ``prefill``, ``kv_transfer``,
``decode``) and the transfer tallies the router exports as metrics.

Spans are parented on the router's ``request`` span through ``GenerateRequest.trace_context``. The
engine knows nothing of OTel: its ``RequestOutput.metrics`` (monotonic arrival, first-scheduled and
first-token times) and ``prefill_chunks`` come back in the ``PrefillResult``, and the ``prefill``
span is written from them after the fact, each chunk an event. With tracing off every call here
returns at once (``DecodeTrace.open`` gives None).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from baton.cluster import tracing
from baton.workers.messages import GenerateDelta, GenerateRequest
from baton.workers.roles import PrefillResult


def failure_reason(exc: BaseException) -> str:
    """A bounded label for a failed KV pull (``baton:kv_transfer_failures_total{reason}``)."""
    text = str(exc).lower()
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "timed out" in text:
        return "timeout"
    if "checksum" in text:
        return "checksum"
    if "lease" in text:
        return "lease_expired"
    if type(exc).__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
        return "source_dead"
    if "source failed" in text:
        return "source_error"
    return "error"


def record_prefill(req: GenerateRequest, res: PrefillResult, worker_id: str) -> None:
    """``prefill`` (arrival → first token) with a ``queue`` child (arrival → first scheduled)."""
    if not tracing.enabled() or not res.metrics:
        return
    m = res.metrics
    now = time.monotonic()
    arrival = m.get("arrival_time", now)
    scheduled = m.get("first_scheduled_time", arrival)
    first = m.get("first_token_time", now)
    parent = tracing.extract(req.trace_context)
    attrs: dict[str, Any] = {
        "baton.worker": worker_id,
        "baton.tenant": req.tenant,
        "gen_ai.usage.input_tokens": len(req.prompt_token_ids),
        "baton.prefix.cached_tokens": res.num_cached_tokens,
        "baton.prefill.chunks": len(res.prefill_chunks),
    }
    if res.handle is not None:
        attrs["baton.kv.blocks"] = len(res.handle.block_ids)
    t = tracing.tracer()
    span = t.start_span(
        "prefill", context=parent, start_time=tracing.mono_to_ns(arrival), attributes=attrs
    )
    for end, n in res.prefill_chunks:
        span.add_event(
            "prefill_chunk", {"baton.chunk.tokens": n}, timestamp=tracing.mono_to_ns(end)
        )
    if res.final is not None:
        span.set_attribute("gen_ai.response.finish_reasons", (res.final.finish_reason or "",))
    tracing.span_between(
        "queue", tracing.context_with(span), arrival, scheduled, {"baton.worker": worker_id}
    )
    span.end(end_time=tracing.mono_to_ns(first))


class DecodeTrace:
    """One request's spans on a decode worker: ``kv_transfer`` then ``decode`` (until the final
    delta is polled, or the request is aborted)."""

    def __init__(self, req: GenerateRequest, worker_id: str, transport: str) -> None:
        self.parent = tracing.extract(req.trace_context)
        self.worker_id, self.transport = worker_id, transport
        self.tenant = req.tenant
        self.tokens = 0
        self.decode: Any | None = None

    @classmethod
    def open(cls, req: GenerateRequest, worker_id: str, transport: str) -> DecodeTrace | None:
        return cls(req, worker_id, transport) if tracing.enabled() else None

    def transfer(
        self, start_mono: float, nbytes: int, blocks: int, error: str | None, recomputed: bool
    ) -> None:
        attrs = {
            "baton.kv.transport": self.transport,
            "baton.kv.bytes": nbytes,
            "baton.kv.blocks": blocks,
            "baton.kv.retries": 1 if recomputed else 0,
            "baton.worker": self.worker_id,
        }
        span = tracing.tracer().start_span(
            "kv_transfer",
            context=self.parent,
            start_time=tracing.mono_to_ns(start_mono),
            attributes=attrs,
        )
        if error is not None:
            tracing.fail(span, error)
            span.add_event("recompute_prefill")
        span.end()

    def start_decode(self, placed: bool, resumed: bool, prior_tokens: int = 0) -> None:
        """``prior_tokens``: output tokens the client already has from elsewhere (the prefill's
        first token, or those streamed before a resume): counted in the request's output tokens."""
        self.tokens = prior_tokens
        self.decode = tracing.tracer().start_span(
            "decode",
            context=self.parent,
            attributes={
                "baton.worker": self.worker_id,
                "baton.tenant": self.tenant,
                "baton.kv.placed": placed,
                "baton.resumed": resumed,
            },
        )

    def observe(self, deltas: list[GenerateDelta]) -> None:
        span = self.decode
        if span is None:
            return
        for d in deltas:
            if d.token_ids and self.tokens == 0:
                span.add_event("first_token")
            self.tokens += len(d.token_ids)
            if d.finish_reason is not None:
                span.set_attribute("gen_ai.usage.output_tokens", self.tokens)
                span.set_attribute("gen_ai.response.finish_reasons", (d.finish_reason,))
                span.set_attribute("baton.preemptions", d.num_preemptions)
                span.set_attribute("baton.prefix.cached_tokens", d.num_cached_tokens)
                if d.error:
                    tracing.fail(span, d.error)
                self.close()

    def close(self) -> None:
        if self.decode is not None:
            self.decode.end()
            self.decode = None
