"""One request through the real router and real Ray prefill/decode actors gives ONE trace:
``request`` (router, in-memory exporter) → ``admission``/``queue``, and from the actors (separate
processes, ``BATON_TRACE_FILE`` exporter) ``prefill`` (+ ``queue``, chunk events), ``kv_transfer``
and ``decode``, all parented on the router's span through the carried ``traceparent``; a client's
``traceparent`` is the parent of ``request``. No prompt text and no API key in any span."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from baton.cluster import tracing  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

sys.path.insert(0, str(Path(__file__).parent))
from cluster_stack import MODEL_NAME, cluster_stack  # noqa: E402

pytestmark = pytest.mark.timeout(300)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "The secret launch phrase is purple-elephant-42; now count slowly from one to twenty:"


@pytest.fixture(scope="module")
def traced(tiny_model_dir, tmp_path_factory):
    span_file = tmp_path_factory.mktemp("spans") / "actors.jsonl"
    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracing.configure(provider)
    try:
        with cluster_stack(
            tiny_model_dir, "baton-tracing", env={"BATON_TRACE_FILE": str(span_file)}
        ) as stack:
            yield stack, mem, str(span_file)
    finally:
        tracing.configure(None)


def _actor_spans(path: str, trace_id: str, names: set[str], timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in tracing.read_span_file(path) if s["trace_id"] == trace_id]
        if names <= {s["name"] for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def _one(spans: list[dict], name: str) -> dict:
    got = [s for s in spans if s["name"] == name]
    assert len(got) == 1, (name, [s["name"] for s in spans])
    return got[0]


def _router_spans(mem: InMemorySpanExporter, trace_id: str) -> list[dict]:
    return [
        tracing.span_record(s)
        for s in mem.get_finished_spans()
        if f"{s.context.trace_id:032x}" == trace_id
    ]


def test_one_trace_across_router_prefill_transfer_decode(traced):
    stack, mem, span_file = traced
    headers = {
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        "authorization": "Bearer sk-never-in-a-span",
    }
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = stack.run(stack.post("/v1/completions", body, headers))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] >= 8  # long enough to go through the prefill worker

    router = _router_spans(mem, CLIENT_TRACE)
    actors = _actor_spans(span_file, CLIENT_TRACE, {"prefill", "kv_transfer", "decode", "queue"})
    request = _one(router, "request")
    admission = _one(router, "admission")
    # the client's traceparent is the parent of the router's request span
    assert request["parent_id"] == CLIENT_SPAN
    assert admission["parent_id"] == request["span_id"]
    a = request["attributes"]
    assert a["gen_ai.request.model"] == MODEL_NAME
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["baton.tenant"] == "dev"
    assert a["baton.kv.blocks"] == -(-(usage["prompt_tokens"] + 6) // 16)
    assert "baton.prefix.cached_tokens" in a

    prefill = _one(actors, "prefill")
    transfer = _one(actors, "kv_transfer")
    decode = _one(actors, "decode")
    queue = _one(actors, "queue")
    me = os.getpid()
    for s in (prefill, transfer, decode):
        assert s["parent_id"] == request["span_id"], s["name"]
        assert s["pid"] != me  # recorded in the actor processes
    assert prefill["service"] == "baton-prefill" and decode["service"] == "baton-decode"
    assert prefill["pid"] != decode["pid"]
    assert queue["parent_id"] == prefill["span_id"]
    assert prefill["attributes"]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert prefill["attributes"]["baton.kv.blocks"] >= 1
    chunks = [e for e in prefill["events"] if e["name"] == "prefill_chunk"]
    # max_num_batched_tokens=32: the prompt is prefilled in ceil(n/32) chunks
    assert len(chunks) == -(-usage["prompt_tokens"] // 32)
    assert sum(e["attributes"]["baton.chunk.tokens"] for e in chunks) == usage["prompt_tokens"]
    t = transfer["attributes"]
    assert t["baton.kv.transport"] == "gloo" and t["baton.kv.bytes"] > 0
    assert t["baton.kv.retries"] == 0 and transfer["status"] != "ERROR"
    assert t["baton.kv.blocks"] == prefill["attributes"]["baton.kv.blocks"]
    assert decode["attributes"]["gen_ai.usage.output_tokens"] == 6
    assert decode["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    # causal order on one host's clock: prefill ends before the transfer ends, decode after that
    assert prefill["start"] >= request["start"] and prefill["end"] <= transfer["end"]
    assert transfer["start"] <= decode["start"] and decode["end"] <= request["end"]

    dump = json.dumps(router + actors)
    assert "purple-elephant" not in dump and "sk-never-in-a-span" not in dump


def test_no_incoming_traceparent_starts_a_root(traced):
    stack, mem, span_file = traced
    mem.clear()
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    r = stack.run(stack.post("/v1/completions", body))
    assert r.status_code == 200, r.text
    requests = [tracing.span_record(s) for s in mem.get_finished_spans() if s.name == "request"]
    assert len(requests) == 1 and requests[0]["parent_id"] is None
    tid = requests[0]["trace_id"]
    actors = _actor_spans(span_file, tid, {"prefill", "kv_transfer", "decode"})
    assert {"prefill", "kv_transfer", "decode"} <= {s["name"] for s in actors}
    assert all(s["parent_id"] == requests[0]["span_id"] for s in actors if s["name"] != "queue")


def test_exporter_selection_from_the_otel_environment():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert tracing._exporters_from_env({}, None) == []  # nothing configured: no-op tracer
    assert (
        tracing._exporters_from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:6006", "OTEL_TRACES_EXPORTER": "none"}, None
        )
        == []
    )
    procs = tracing._exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:6006"}, None)
    assert len(procs) == 1
    exp = procs[0].span_exporter
    assert isinstance(exp, OTLPSpanExporter) and exp._endpoint == "http://x:6006/v1/traces"
    for p in procs:
        p.shutdown()
