"""The one place the router's Prometheus metrics are defined (``GET /metrics`` renders
``RouterMetrics``).

Names follow vLLM's where one exists, under the ``baton:`` prefix
(``baton:time_to_first_token_seconds`` mirrors ``vllm:time_to_first_token_seconds``). Each
``RouterMetrics`` owns its registry, so several routers in one process (tests, the benchmark) never
collide. Pool gauges are refreshed from ``EngineClient.stats()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from baton.router.client_protocol import WorkerLoad

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        lab = ("model_name",)
        self.requests = Counter("baton:request_success", "Finished requests by finish reason.",
                                lab + ("finished_reason",), registry=r)
        self.rejections = Counter("baton:request_rejected", "Requests refused, by reason.",
                                  lab + ("reason",), registry=r)
        self.http_errors = Counter("baton:http_errors", "Error responses by status code.",
                                   lab + ("status",), registry=r)
        self.prompt_tokens = Counter("baton:prompt_tokens", "Prompt tokens of admitted requests.",
                                     lab, registry=r)
        self.cached_tokens = Counter("baton:prefix_cache_hit_tokens",
                                     "Prompt tokens served from the prefix cache.", lab, registry=r)
        self.generation_tokens = Counter("baton:generation_tokens", "Generated tokens.", lab,
                                         registry=r)
        self.ttft = Histogram("baton:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_LAT, registry=r)
        self.itl = Histogram("baton:inter_token_latency_seconds", "Time between streamed tokens.",
                             lab, buckets=_ITL, registry=r)
        self.e2e = Histogram("baton:e2e_request_latency_seconds", "End-to-end request latency.",
                             lab, buckets=_LAT, registry=r)
        self.queue_time = Histogram("baton:request_queue_time_seconds",
                                    "Time spent in the router's admission queue.", lab,
                                    buckets=_LAT, registry=r)
        self.router_overhead = Histogram(
            "baton:router_overhead_seconds",
            "Router time before the request reaches a worker (auth, tokenize, admission, routing).",
            lab, buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r)
        self.running = Gauge("baton:num_requests_running", "Sequences running on workers.",
                             lab + ("worker",), registry=r)
        self.waiting = Gauge("baton:num_requests_waiting", "Sequences waiting on workers.",
                             lab + ("worker",), registry=r)
        self.router_admitted = Gauge("baton:router_requests_admitted",
                                     "Requests admitted by the router and not finished.", lab,
                                     registry=r)
        self.router_queued = Gauge("baton:router_requests_queued",
                                   "Requests waiting in the router's admission queue.", lab,
                                   registry=r)
        self.kv_usage = Gauge("baton:kv_cache_usage_perc", "KV-cache usage (0..1).",
                              lab + ("worker",), registry=r)
        self.preemptions = Gauge("baton:num_preemptions", "Preemptions so far (per worker).",
                                 lab + ("worker",), registry=r)
        self.prefix_queries = Gauge("baton:prefix_cache_queries", "Prefix-cache block queries.",
                                    lab + ("worker",), registry=r)
        self.prefix_hits = Gauge("baton:prefix_cache_hits", "Prefix-cache block hits.",
                                 lab + ("worker",), registry=r)
        self.worker_ready = Gauge("baton:worker_ready", "1 when the worker is ready.",
                                  lab + ("worker", "role"), registry=r)

    def observe_loads(self, loads: Sequence[WorkerLoad]) -> None:
        m = self.model_name
        for w in loads:
            self.running.labels(m, w.worker_id).set(w.num_running)
            self.waiting.labels(m, w.worker_id).set(w.num_waiting)
            self.kv_usage.labels(m, w.worker_id).set(w.kv_usage)
            self.preemptions.labels(m, w.worker_id).set(w.num_preemptions)
            self.prefix_queries.labels(m, w.worker_id).set(w.prefix_queries)
            self.prefix_hits.labels(m, w.worker_id).set(w.prefix_hits)
            self.worker_ready.labels(m, w.worker_id, w.role).set(1 if w.ready else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
