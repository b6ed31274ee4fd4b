"""Authentication and tenant isolation on the real router (in-process uvicorn + gRPC, colocated
engine; see ``inproc_router``):

- no key / a wrong key -> 401 (HTTP) / UNAUTHENTICATED (gRPC) on every endpoint but ``/health``,
  ``/metrics`` and gRPC ``Health`` (public on purpose: probes and scrapers carry no key), before the
  body is even parsed; tenant keys never open ``/admin``, admin keys never generate;
- a tenant cannot hit, purge, abort or time another tenant's cache: identical prompts report
  ``cached_tokens == 0`` across tenants (HTTP and gRPC), a namespace in the body is ignored, an
  admin purge of one tenant leaves the other's cache, and the latency of a cross-tenant repeat is
  indistinguishable from a miss (AUC within [0.2, 0.8]) while the tenant's own repeat is clearly
  faster (AUC > 0.9: the measurement can see a hit);
- API keys never appear in logs (root logger at DEBUG, uvicorn at debug), metrics text, admin stats
  or trace spans.
"""

from __future__ import annotations

import logging
import random
import secrets
import time

import grpc
import httpx
import pytest
import yaml
from baton.protos.build import ensure_generated
from inproc_router import inproc_router

ensure_generated()
from baton.protos.baton.v1 import generation_pb2 as pb  # noqa: E402
from baton.protos.baton.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(180)

KEYS = {name: f"sk-{name}-{secrets.token_hex(16)}" for name in ("a", "b", "admin")}
WRONG = f"sk-wrong-{secrets.token_hex(16)}"
PROMPT_LEN = 224  # 14 blocks; prefilled in 16-token chunks: a miss costs ~14 engine steps
TIMING_K = 16  # prompts per latency group


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a bad record must not break the test's capture
            self.lines.append(repr(record.__dict__))


@pytest.fixture(scope="module")
def spans():
    """An in-memory span exporter when the tracing module exists (None otherwise)."""
    try:
        from baton.cluster import tracing
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        yield None
        return
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.configure(None)


@pytest.fixture(scope="module")
def logs():
    cap = _Capture()
    cap.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        root.setLevel(old)


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory, logs, spans):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "tenants": {"a": {"keys": [KEYS["a"]]}, "b": {"keys": [KEYS["b"]]}},
                "admin_keys": [KEYS["admin"]],
            }
        )
    )
    args = {
        "model": {"path": str(tiny_model_dir), "name": "tiny"},
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "num_kv_blocks": 1024,
            "max_model_len": 256,
            "block_size": 16,
            "max_num_batched_tokens": 16,
        },
        "pools": {"mode": "colocated"},
        "tenants": {"api_keys_file": str(keys)},
    }
    with inproc_router(args, log_level="debug") as r:
        yield r


def _h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


HTTP_ENDPOINTS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("POST", "/admin/cache/purge"),
    ("GET", "/admin/stats"),
]


def test_every_endpoint_needs_a_key(router) -> None:
    bad_headers = [
        {},
        _h(WRONG),
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {WRONG}"},
        {"x-api-key": WRONG},
        {"Authorization": KEYS["a"]},
    ]  # no scheme: not a bearer
    with httpx.Client(base_url=router.base_url, timeout=30) as c:
        for method, path in HTTP_ENDPOINTS:
            for headers in bad_headers:
                # a malformed body too: anonymous callers learn nothing from validation errors
                r = c.request(method, path, headers=headers, content=b"{not json")
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
            if path.startswith("/admin"):
                for tenant in ("a", "b"):  # tenants are not admins
                    assert c.request(method, path, headers=_h(KEYS[tenant])).status_code == 401
            else:  # admin keys do not generate or list models
                assert c.request(method, path, headers=_h(KEYS["admin"])).status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/admin/stats", headers=_h(KEYS["admin"])).status_code == 200
        assert c.get("/admin/stats", headers={"x-api-key": KEYS["admin"]}).status_code == 200
    with grpc.insecure_channel(router.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        calls = [
            lambda md: list(
                stub.Generate(pb.GenerateRequest(model="tiny", text="hi"), metadata=md, timeout=30)
            ),
            lambda md: stub.Abort(pb.AbortRequest(request_id="x"), metadata=md, timeout=30),
            lambda md: stub.Tokenize(
                pb.TokenizeRequest(model="tiny", text="hi"), metadata=md, timeout=30
            ),
            lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30),
        ]
        for call in calls:
            for md in [
                (),
                (("authorization", f"Bearer {WRONG}"),),
                (("x-api-key", WRONG),),
                (("authorization", f"Bearer {KEYS['admin']}"),),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (md, err.value)
            call((("authorization", f"Bearer {KEYS['a']}"),))  # the right key works
        assert stub.Health(pb.HealthRequest(), timeout=30).ok
    router.assert_no_leak()


def _complete(c: httpx.Client, key: str, prompt, **extra) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = c.post(
        "/v1/completions",
        headers=_h(key),
        json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra},
    )
    dt = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], dt


def _grpc_cached(stub, key: str, ids: list[int]) -> int:
    last = None
    for last in stub.Generate(
        pb.GenerateRequest(
            model="tiny", token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=1)
        ),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=30,
    ):
        pass
    return last.usage.cached_tokens


def test_no_cross_tenant_hits_and_no_body_override(router) -> None:
    rng = random.Random(1)
    p = [rng.randrange(3, 380) for _ in range(PROMPT_LEN)]
    q = [rng.randrange(3, 380) for _ in range(PROMPT_LEN)]
    with httpx.Client(base_url=router.base_url, timeout=60) as c:
        assert _complete(c, KEYS["a"], p)[0] == 0
        assert _complete(c, KEYS["a"], p)[0] >= PROMPT_LEN - 16  # a's own repeat hits
        # b: identical prompt, also when b claims a's namespace/tenant in the body
        assert (
            _complete(c, KEYS["b"], p, namespace="a", tenant="a", user="a", cache_salt="")[0] == 0
        )
        with grpc.insecure_channel(router.grpc_target) as ch:
            stub = pb_grpc.GenerationStub(ch)
            assert _grpc_cached(stub, KEYS["a"], q) == 0
            assert _grpc_cached(stub, KEYS["b"], q) == 0  # a warmed q over gRPC: still a miss
            assert _grpc_cached(stub, KEYS["a"], q) > 0
        # b cannot purge anything; an admin purge of a leaves b's cache alone
        r = c.post("/admin/cache/purge", headers=_h(KEYS["b"]), json={"namespace": "a"})
        assert r.status_code == 401
        assert _complete(c, KEYS["a"], p)[0] > 0
        assert _complete(c, KEYS["b"], p)[0] > 0  # b's own copy, from its first request
        r = c.post("/admin/cache/purge", headers=_h(KEYS["admin"]), json={"namespace": "a"})
        assert r.status_code == 200, r.text
        assert _complete(c, KEYS["a"], p)[0] == 0
        assert _complete(c, KEYS["b"], p)[0] > 0
    router.assert_no_leak()


def test_tenant_cannot_abort_or_collide_with_another_tenants_request(router) -> None:
    with grpc.insecure_channel(router.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(
            model="tiny",
            text="Once upon a time",
            request_id="shared-id",
            params=pb.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True),
        )
        a_stream = stub.Generate(
            req, metadata=(("authorization", f"Bearer {KEYS['a']}"),), timeout=60
        )
        first = next(a_stream)
        assert first.request_id == "shared-id"
        # b: same client request id, concurrently (ids are per tenant), and an Abort of it
        b_msgs = list(
            stub.Generate(req, metadata=(("authorization", f"Bearer {KEYS['b']}"),), timeout=60)
        )
        assert b_msgs[-1].finish_reason == "length"
        got = stub.Abort(
            pb.AbortRequest(request_id="shared-id"),
            metadata=(("authorization", f"Bearer {KEYS['b']}"),),
            timeout=30,
        )
        assert got.aborted is False
        rest = list(a_stream)
        assert rest[-1].finish_reason == "length"  # a's request ran to its end
        assert sum(len(m.token_ids) for m in [first, *rest]) == 48
    router.assert_no_leak()


def _auc(xs: list[float], ys: list[float]) -> float:
    """P(x < y) + P(x == y)/2: 0.5 when the two samples cannot be told apart (Mann-Whitney)."""
    wins = sum((x < y) + 0.5 * (x == y) for x in xs for y in ys)
    return wins / (len(xs) * len(ys))


def test_cross_tenant_latency_is_a_miss(router) -> None:
    rng = random.Random(7)

    def prompt() -> list[int]:
        return [rng.randrange(3, 380) for _ in range(PROMPT_LEN)]

    warmed = [prompt() for _ in range(TIMING_K)]
    hit, cross, miss = [], [], []
    with httpx.Client(base_url=router.base_url, timeout=60) as c:
        for _ in range(3):
            _complete(c, KEYS["b"], prompt())  # warm-up: first calls pay one-time costs
        for p in warmed:
            assert _complete(c, KEYS["a"], p)[0] == 0
        for p in warmed:  # interleaved so that drift hits every group alike
            cached, dt = _complete(c, KEYS["b"], p)
            assert cached == 0
            cross.append(dt)
            cached, dt = _complete(c, KEYS["b"], prompt())
            assert cached == 0
            miss.append(dt)
            cached, dt = _complete(c, KEYS["a"], p)
            assert cached >= PROMPT_LEN - 16
            hit.append(dt)
    med = {k: sorted(v)[len(v) // 2] for k, v in (("hit", hit), ("cross", cross), ("miss", miss))}
    assert _auc(hit, miss) > 0.9, f"hits not measurably faster: the test has no power ({med})"
    auc = _auc(cross, miss)
    assert 0.2 <= auc <= 0.8, f"cross-tenant repeats differ from misses: AUC {auc} {med}"
    router.assert_no_leak()


def test_secrets_never_logged_or_exported(router, logs, spans) -> None:
    with httpx.Client(base_url=router.base_url, timeout=30) as c:
        metrics = c.get("/metrics").text
        stats = c.get("/admin/stats", headers=_h(KEYS["admin"])).text
        health = c.get("/health").text
    assert "baton:" in metrics and len(logs.lines) > 50, "nothing captured: the test is blind"
    haystacks = {
        "logs": "\n".join(logs.lines),
        "metrics": metrics,
        "admin stats": stats,
        "health": health,
    }
    if spans is not None:
        got = spans.get_finished_spans()
        assert got, "tracing is configured but no span was recorded"
        haystacks["spans"] = "\n".join(
            f"{s.name} {dict(s.attributes or {})} {[dict(e.attributes or {}) for e in s.events]}"
            for s in got
        )
    for where, text in haystacks.items():
        for name, key in [*KEYS.items(), ("wrong", WRONG)]:
            secret = key.split("-", 2)[2]  # the random part: a prefix alone is no leak
            assert secret not in text, f"the {name} API key appears in {where}"
