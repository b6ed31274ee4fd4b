"""OpenTelemetry tracing for every Baton process (router replica, prefill and decode actors).

One trace per request. The router opens the ``request`` span and carries its W3C ``traceparent``
in ``GenerateRequest.trace_context`` (Ray calls) or gRPC metadata; each actor calls
``setup_tracing`` once at start-up and parents its spans on that context, so spans from several
processes join one trace.

The exporter is chosen from the standard OTel environment, read here and nowhere else:

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or an explicit
  ``endpoint``): OTLP over HTTP, batched;
- ``OTEL_TRACES_EXPORTER=console``: spans printed (debugging);
- ``BATON_TRACE_FILE=path``: every finished span appended to ``path`` as one JSON line (tests read
  the spans of other processes from it);
- none of these, or ``OTEL_SDK_DISABLED=true``: no provider at all. ``tracer()`` is then the API's
  no-op tracer and ``enabled()`` is False, so instrumented code skips its span work entirely.

Providers are held here (not installed as the global provider), so tests can swap in an in-memory
exporter with ``configure``. Spans never carry API keys or prompt/completion text.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: Any | None = None  # opentelemetry.sdk.trace.TracerProvider when tracing is on
_tracer: trace.Tracer = trace.NoOpTracer()
_setup_done = False

INSTRUMENTATION = "baton"


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def setup_tracing(
    service_name: str, *, endpoint: str | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """Build this process's tracer provider once from the OTel environment; True if tracing is on.

    Later calls are no-ops (a Serve replica and the actors it shares a process with set up once)."""
    global _setup_done
    env = os.environ if env is None else env
    with _lock:
        if _setup_done:
            return _provider is not None
        _setup_done = True
        if _truthy(env.get("OTEL_SDK_DISABLED")):
            return False
        exporters = _exporters_from_env(env, endpoint)
        if not exporters:
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        name = env.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        for processor in exporters:
            provider.add_span_processor(processor)
        _install(provider)
        log.info("tracing on for %s (%d exporter(s))", name, len(exporters))
        return True


def _exporters_from_env(env: Mapping[str, str], endpoint: str | None) -> list[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    out: list[Any] = []
    kinds = {k.strip() for k in env.get("OTEL_TRACES_EXPORTER", "").split(",") if k.strip()}
    otlp = (
        endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if "none" in kinds:
        return out
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = otlp
        if not env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") and not url.endswith("/v1/traces"):
            url = url.rstrip("/") + "/v1/traces"  # the spec: the base endpoint gets the signal path
        out.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    if "console" in kinds:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    path = env.get("BATON_TRACE_FILE")
    if path:
        out.append(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return out


def _install(provider: Any | None) -> None:
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else trace.NoOpTracer()


def configure(provider: Any | None) -> None:
    """Use ``provider`` (tests: one with an in-memory exporter); None turns tracing off."""
    global _setup_done
    with _lock:
        _setup_done = True
        _install(provider)


def shutdown() -> None:
    """Flush and stop the exporters (end of process)."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    return _tracer


# -- propagation --------------------------------------------------------------------------------
def extract(carrier: Mapping[str, str] | None) -> Context:
    """The remote parent in a W3C carrier (``traceparent``/``tracestate``); empty: a new root."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def inject(ctx: Context) -> dict[str, str]:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def context_with(span: trace.Span) -> Context:
    return trace.set_span_in_context(span)


# -- time ---------------------------------------------------------------------------------------
def mono_to_ns(t_mono: float) -> int:
    """A ``time.monotonic()`` reading of this process as epoch nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.monotonic() - t_mono) * 1e9)


def span_between(
    name: str,
    parent: Context,
    start_mono: float,
    end_mono: float,
    attributes: Mapping[str, Any] | None = None,
    events: Sequence[tuple[str, float, Mapping[str, Any]]] = (),
) -> None:
    """Record a finished span from monotonic timestamps taken elsewhere (the engine's metrics)."""
    if not enabled():
        return
    start = mono_to_ns(start_mono)
    span = _tracer.start_span(
        name, context=parent, start_time=start, attributes=dict(attributes or {})
    )
    for ev_name, t, attrs in events:
        span.add_event(ev_name, dict(attrs), timestamp=mono_to_ns(t))
    span.end(end_time=max(start, mono_to_ns(end_mono)))


def fail(span: trace.Span, exc: BaseException | str) -> None:
    from opentelemetry.trace import Status, StatusCode

    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    span.set_status(Status(StatusCode.ERROR, msg[:200]))
    if isinstance(exc, BaseException):
        span.record_exception(exc)


# -- a file exporter: spans of other processes for tests and local debugging ---------------------
class JsonLinesSpanExporter:
    """Appends each finished span as one JSON object per line (ids in hex, times in ns)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(span_record(s), separators=(",", ":")) for s in spans]
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(s: Any) -> dict[str, Any]:
    """A ``ReadableSpan`` as plain data (the file exporter's line; tests compare these)."""
    ctx = s.get_span_context()
    return {
        "name": s.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{s.parent.span_id:016x}" if s.parent is not None else None,
        "start": s.start_time,
        "end": s.end_time,
        "service": s.resource.attributes.get("service.name"),
        "pid": os.getpid(),
        "status": s.status.status_code.name,
        "attributes": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in (s.attributes or {}).items()
        },
        "events": [
            {"name": e.name, "time": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in s.events
        ],
    }


def read_span_file(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
