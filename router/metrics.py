"""The one place the router's Prometheus metrics are defined (``GET /metrics`` renders
``RouterMetrics``).

Names are vLLM's where vLLM has one (``vllm:time_to_first_token_seconds``, ...), so existing vLLM
dashboards work; what vLLM has no name for is ``baton:``. Two sources feed it:

- the request path (this process): latencies, token counts, finish reasons, rejections, monitors;
- the workers: the router already polls every actor's ``WorkerStats`` for routing and admission;
  the latest poll is rendered by a custom collector (per-worker gauges and counters, KV-transfer
  bytes/seconds/failures summed by transport), so one scrape of the router covers all actors.

Each ``RouterMetrics`` owns its registry, so several routers in one process never collide. Tenant
labels appear only for tenants named in the configuration (others are ``other``), keeping
cardinality bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from baton.router.client_protocol import WorkerLoad
from baton.workers.roles import TRANSFER_BUCKETS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LAT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_PRED_ERR = (-1024, -256, -64, -16, -4, 0, 4, 16, 64, 256, 1024)
OTHER_TENANT = "other"


class RouterMetrics:
    def __init__(self, model_name: str, tenants: Iterable[str] = ()) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.tenants = frozenset(tenants)
        lab = ("model_name",)
        # -- vLLM-compatible request metrics
        self.requests = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            lab + ("finished_reason",),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of started requests.", lab, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", lab, registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            lab,
            buckets=_LAT,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between streamed tokens.",
            lab,
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            lab,
            buckets=_LAT,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent in the router's admission queue.",
            lab,
            buckets=_LAT,
            registry=r,
        )
        # -- Baton request metrics
        self.rejections = Counter(
            "baton:requests_rejected",
            "Requests refused, by reason.",
            lab + ("reason", "tenant"),
            registry=r,
        )
        self.http_errors = Counter(
            "baton:http_errors", "Error responses by status code.", lab + ("status",), registry=r
        )
        self.cached_tokens = Counter(
            "baton:prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache.",
            lab,
            registry=r,
        )
        self.tenant_requests = Counter(
            "baton:tenant_requests",
            "Finished requests per tenant.",
            lab + ("tenant", "finished_reason"),
            registry=r,
        )
        self.tenant_tokens = Counter(
            "baton:tenant_generation_tokens",
            "Generated tokens per tenant.",
            lab + ("tenant",),
            registry=r,
        )
        self.router_overhead = Histogram(
            "baton:router_overhead_seconds",
            "Router time before the request reaches a worker (auth, tokenize, admission, routing).",
            lab,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.router_admitted = Gauge(
            "baton:router_requests_admitted",
            "Requests admitted by the router and not finished.",
            lab,
            registry=r,
        )
        self.router_queued = Gauge(
            "baton:router_requests_queued",
            "Requests waiting in the router's admission queue.",
            lab,
            registry=r,
        )
        self.prediction_error = Histogram(
            "baton:admission_prediction_error_tokens",
            "Actual minus predicted output tokens of finished requests (admission's predictor).",
            lab,
            buckets=_PRED_ERR,
            registry=r,
        )
        self.finish_length_ratio = Gauge(
            "baton:finish_length_ratio",
            "Fraction of finish_reason=length over the last finished requests.",
            lab,
            registry=r,
        )
        self.injection = Counter(
            "baton:prompt_injection_indicators",
            "Prompt-injection indicators seen (source: prompt|output); labels only, never text.",
            lab + ("source", "indicator"),
            registry=r,
        )
        self.drift_score = Gauge(
            "baton:output_drift_score",
            "Output drift per route: |z| of mean length + 10 x token JS.",
            lab + ("route",),
            registry=r,
        )
        self.output_length = Gauge(
            "baton:output_length_mean_tokens",
            "Mean output length per route (recent window vs baseline).",
            lab + ("route", "window"),
            registry=r,
        )
        self.token_js = Gauge(
            "baton:output_token_js_divergence",
            "JS divergence of hashed output-token histograms (recent/baseline).",
            lab + ("route",),
            registry=r,
        )
        self.quant_top1 = Gauge(
            "baton:kv_quant_top1_agreement",
            "Canary top-1 agreement, quantized KV vs unquantized (0..1).",
            lab + ("kv_dtype",),
            registry=r,
        )
        self.quant_kl = Gauge(
            "baton:kv_quant_kl_divergence",
            "Canary mean KL(unquantized || quantized), next-token dists.",
            lab + ("kv_dtype",),
            registry=r,
        )
        self.quant_probe_time = Gauge(
            "baton:kv_quant_probe_timestamp_seconds",
            "When the KV-quantization probe last ran (unix time).",
            lab + ("kv_dtype",),
            registry=r,
        )
        self.pool = _PoolCollector(model_name)
        r.register(self.pool)

    def tenant(self, name: str) -> str:
        return name if name in self.tenants else OTHER_TENANT

    def observe_loads(self, loads: Sequence[WorkerLoad]) -> None:
        self.pool.loads = list(loads)

    def observe_directory(self, stats: dict[str, Any] | None) -> None:
        self.pool.directory = stats

    def observe_quant_probe(self, result: Any) -> None:
        """Gauges from a ``baton.cluster.quant_probe.ProbeResult``."""
        m, d = self.model_name, result.kv_dtype
        self.quant_top1.labels(m, d).set(result.top1_agreement)
        self.quant_kl.labels(m, d).set(result.kl_mean)
        self.quant_probe_time.labels(m, d).set(result.finished_unix)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector:
    """Renders the last polled worker stats (and prefix-directory stats) at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.loads: list[WorkerLoad] = []
        self.directory: dict[str, Any] | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families vary with the workers present

    def collect(self) -> Iterator[Metric]:
        m = self.model_name
        per = ["model_name", "worker"]
        fams = {
            "running": GaugeMetricFamily(
                "vllm:num_requests_running", "Sequences running on workers.", labels=per
            ),
            "waiting": GaugeMetricFamily(
                "vllm:num_requests_waiting", "Sequences waiting on workers.", labels=per
            ),
            "kv": GaugeMetricFamily(
                "vllm:kv_cache_usage_perc", "KV-cache usage (0..1).", labels=per
            ),
            "preempt": CounterMetricFamily(
                "vllm:num_preemptions", "Preemptions (per worker).", labels=per
            ),
            "pq": CounterMetricFamily(
                "vllm:prefix_cache_queries", "Prefix-cache queries (blocks).", labels=per
            ),
            "ph": CounterMetricFamily(
                "vllm:prefix_cache_hits", "Prefix-cache hits (blocks).", labels=per
            ),
            "ready": GaugeMetricFamily(
                "baton:worker_ready", "1 when the worker is ready.", labels=per + ["role"]
            ),
        }
        by_transport: dict[str, dict[str, Any]] = {}
        for w in self.loads:
            lv = [m, w.worker_id]
            fams["ready"].add_metric(lv + [w.role], 1.0 if w.ready else 0.0)
            if not w.ready:
                continue
            fams["running"].add_metric(lv, w.num_running)
            fams["waiting"].add_metric(lv, w.num_waiting)
            fams["kv"].add_metric(lv, w.kv_usage)
            fams["preempt"].add_metric(lv, w.num_preemptions)
            fams["pq"].add_metric(lv, w.prefix_queries)
            fams["ph"].add_metric(lv, w.prefix_hits)
            if w.serves_decode and w.transport:
                t = by_transport.setdefault(
                    w.transport,
                    {
                        "bytes": 0,
                        "sum": 0.0,
                        "buckets": [0] * (len(TRANSFER_BUCKETS) + 1),
                        "fail": {},
                    },
                )
                t["bytes"] += w.transfer_bytes
                t["sum"] += w.transfer_seconds_sum
                for i, c in enumerate(w.transfer_buckets):
                    t["buckets"][i] += c
                for reason, c in w.transfer_failure_reasons:
                    t["fail"][reason] = t["fail"].get(reason, 0) + c
        yield from fams.values()
        tl = ["model_name", "transport"]
        nbytes = CounterMetricFamily(
            "baton:kv_transfer_bytes", "KV bytes pulled by decode workers.", labels=tl
        )
        secs = HistogramMetricFamily(
            "baton:kv_transfer_seconds", "KV pull latency on decode workers.", labels=tl
        )
        fails = CounterMetricFamily(
            "baton:kv_transfer_failures",
            "Failed KV pulls (each ended in a local recompute).",
            labels=tl + ["reason"],
        )
        for transport, t in sorted(by_transport.items()):
            lv = [m, transport]
            nbytes.add_metric(lv, t["bytes"])
            cum, buckets = 0, []
            for bound, c in zip((*TRANSFER_BUCKETS, float("inf")), t["buckets"]):
                cum += c
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cum))
            secs.add_metric(lv, buckets, t["sum"])
            for reason, c in sorted(t["fail"].items()):
                fails.add_metric(lv + [reason], c)
        yield from (nbytes, secs, fails)
        entries = GaugeMetricFamily(
            "baton:prefix_directory_entries",
            "Block entries in the global prefix directory.",
            labels=["model_name"],
        )
        purges = CounterMetricFamily(
            "baton:prefix_directory_purges",
            "Directory entries purged, by reason.",
            labels=["model_name", "reason"],
        )
        d = self.directory
        if d is not None:
            entries.add_metric([m], float(d.get("entries", 0)))
            for key, c in sorted((d.get("counters") or {}).items()):
                if key.startswith("purged_"):
                    purges.add_metric([m, key.removeprefix("purged_")], float(c))
        yield from (entries, purges)
