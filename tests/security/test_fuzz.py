"""Bad input never crashes the router or an engine: generated HTTP bodies (schemathesis, from the
OpenAPI description of every route) and generated gRPC messages (hypothesis: huge, negative, NaN
values, wrong wire types, empty and 1 MB prompts, invalid UTF-8, unknown fields) get a 2xx or a 4xx
(INVALID_ARGUMENT / UNAUTHENTICATED / NOT_FOUND / RESOURCE_EXHAUSTED), never a 5xx / INTERNAL, and
the engine afterwards is alive with every KV block free.

Runs in-process (uvicorn + grpcio aio around the real ``RouterCore`` and a colocated engine, no
Ray): the code under test is the same as in a Serve replica, and thousands of calls take seconds.
The server does not publish ``/openapi.json`` (``openapi_url=None``: the bodies are read raw so
that errors name the field), so the schema is FastAPI's own route list with the request bodies taken
from the pydantic models in ``router/schemas.py``; a route missing from it fails the test.
"""

from __future__ import annotations

import math
import struct

import grpc
import httpx
import pytest
import yaml
from baton.protos.build import ensure_generated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc_router import inproc_router

ensure_generated()
from baton.protos.baton.v1 import generation_pb2 as pb  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core import NOT_SET  # noqa: E402

pytestmark = pytest.mark.timeout(300)

KEY, ADMIN = "sk-fuzz-tenant", "sk-fuzz-admin"
EXAMPLES = 50  # per operation and generation mode
OK_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"f": {"keys": [KEY]}}, "admin_keys": [ADMIN]}))
    args = {
        "model": {"path": str(tiny_model_dir), "name": "tiny"},
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "num_kv_blocks": 48,
            "max_model_len": 64,
            "block_size": 16,
            "max_num_batched_tokens": 256,
        },
        "pools": {"mode": "colocated"},
        "tenants": {"api_keys_file": str(keys)},
        "server": {"max_body_bytes": 2 * 1024 * 1024},
        "admission": {"max_queue_per_tenant": 8, "queue_timeout_s": 5},
    }
    with inproc_router(args) as r:
        yield r


# -- HTTP ---------------------------------------------------------------------------------------
def _body_schema(model: type) -> tuple[dict, dict]:
    s = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {k: v for k, v in s.items() if k != "$defs"}, s.get("$defs", {})


def openapi_schema(app) -> dict:
    """FastAPI's description of the app, with each POST route's JSON body described."""
    from baton.router.schemas import ChatCompletionRequest, CompletionRequest
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title="Baton", version="1", routes=app.routes)
    comps = doc.setdefault("components", {}).setdefault("schemas", {})
    purge = {"type": "object", "properties": {"namespace": {"type": "string"}}}
    bodies = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method != "post":
                continue
            if path in bodies:
                schema, defs = _body_schema(bodies[path])
                comps.update(defs)
            else:
                assert path == "/admin/cache/purge", f"describe the body of POST {path} here"
                schema = purge
            op["requestBody"] = {
                "required": path in bodies,
                "content": {"application/json": {"schema": schema}},
            }
    return doc


def test_openapi_covers_every_route(router) -> None:
    doc = openapi_schema(router.app)
    assert set(doc["paths"]) == {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/admin/cache/purge",
        "/admin/stats",
    }


def _check_http(resp, label: str) -> None:
    assert resp.status_code < 500, f"{label}: {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        err = resp.json()["error"]  # every refusal is a JSON error body
        assert err["type"] and err["message"], err


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_http_schema_fuzz(router, mode) -> None:
    schema = schemathesis.openapi.from_dict(openapi_schema(router.app))
    calls = {"n": 0, "ok": 0}
    with httpx.Client(base_url=router.base_url, timeout=60) as http:
        for op in schema.get_all_operations():
            op = op.ok()
            if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
                continue  # nothing to negate: the GET routes take no parameters
            key = ADMIN if op.path.startswith("/admin") else KEY

            @FUZZ
            @given(case=op.as_strategy(generation_mode=mode), real_model=st.booleans())
            def one(case, real_model) -> None:
                body = case.body
                if real_model and isinstance(body, dict) and "model" in body:
                    body = {**body, "model": "tiny"}  # reach past the model check half the time
                kw: dict = {}
                if isinstance(body, (bytes, bytearray)):
                    kw["content"] = bytes(body)
                elif body is not NOT_SET:
                    kw["json"] = body
                resp = http.request(
                    op.method.upper(), op.path, headers={"Authorization": f"Bearer {key}"}, **kw
                )
                calls["n"] += 1
                calls["ok"] += resp.status_code == 200
                _check_http(resp, f"{op.method} {op.path} {str(body)[:200]}")

            one()
    assert calls["n"] >= EXAMPLES * 3  # three POST routes, 50 bodies each (GETs have one form)
    if mode is GenerationMode.POSITIVE:
        assert calls["ok"] > 0, "no generated request got through: the fuzzing never went deep"
    router.assert_no_leak()


def test_http_edge_bodies(router) -> None:
    """Hand-picked edges the generators reach rarely: invalid UTF-8, NaN, 1 MB prompt, deep
    nesting, wrong types."""
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    big = "fox " * (256 * 1024)
    cases = [
        b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}',
        b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}',
        b'{"model": "tiny", "prompt": "hi", "max_tokens": 1e400}',
        b'{"model": "tiny", "prompt": "hi", "max_tokens": 99999999999999999999999}',
        b'{"model": "tiny", "prompt": "hi", "seed": -99999999999999999999999}',
        b'{"model": "tiny", "prompt": "hi", "top_k": 99999999999999999999999}',
        b'{"model": "tiny", "prompt": [[1, 2], [3]]}',
        b'{"model": "tiny", "prompt": [-1]}',
        b'{"model": "tiny", "prompt": [4294967296]}',
        b'{"model": "tiny", "prompt": ""}',
        b'{"model": "tiny", "prompt": []}',
        b'{"model": "tiny", "prompt": "hi", "stop": [""]}',
        b'{"model": "tiny", "prompt": "hi", "stop_token_ids": [-5, 10000000]}',
        b'{"model": "tiny", "prompt": "hi", "logit_bias": {"x": 1}, "unknown": [1, {"a": 2}]}',
        b'{"model": "tiny", "prompt": "hi", "n": 4, "max_tokens": 40, "stream": true}',
        b'{"model": "tiny", "prompt": "hi", "truncate_prompt_tokens": 99999999}',
        b"[" * 10000 + b"]" * 10000,
        b'{"model": {"a": 1}, "prompt": true}',
        ('{"model": "tiny", "prompt": "%s"}' % big).encode(),
        b"\x00\x01\x02",
    ]
    chat = [
        b'{"model": "tiny", "messages": []}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image"}]}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "{{ 7*7 }}{% raw %}"}]}',
        b'{"model": "tiny", "messages": [{"role": "user"}], "top_logprobs": 20, "logprobs": true}',
        ('{"model": "tiny", "messages": [{"role": "user", "content": "%s"}]}' % big).encode(),
    ]
    with httpx.Client(base_url=router.base_url, timeout=120) as c:
        for raw in cases:
            _check_http(c.post("/v1/completions", content=raw, headers=h), raw[:80])
        for raw in chat:
            _check_http(c.post("/v1/chat/completions", content=raw, headers=h), raw[:80])
        r = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (3 << 20) + b'"}', headers=h)
        assert r.status_code == 413, r.text[:200]
    router.assert_no_leak()


# -- gRPC ---------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint((num << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
params_st = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(0, 2**32 - 1),
        "temperature": floats,
        "top_p": floats,
        "min_p": floats,
        "top_k": st.integers(-(2**31), 2**31 - 1),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "logprobs": st.integers(0, 2**32 - 1),
        "min_tokens": st.integers(0, 2**32 - 1),
        "presence_penalty": floats,
        "frequency_penalty": floats,
        "repetition_penalty": floats,
        "stop": st.lists(st.text(max_size=8), max_size=20),
        "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=5),
        "ignore_eos": st.booleans(),
    },
)


@st.composite
def generate_requests(draw) -> bytes:
    msg = pb.GenerateRequest(
        model=draw(st.sampled_from(["tiny", "tiny", "", "gpt-9"])),
        request_id=draw(st.sampled_from(["", "r1", "x" * 300])),
    )
    which = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    if which == "text":
        msg.text = draw(st.text(max_size=200))
    elif which == "ids":
        msg.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=80)))
    elif which == "chat":
        for role, content in draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["user", "system", "assistant", "robot", ""]),
                    st.text(max_size=40),
                ),
                max_size=3,
            )
        ):
            msg.chat.messages.add(role=role, content=content)
    p = draw(params_st)
    for k, v in p.items():
        if isinstance(v, list):
            getattr(msg.params, k).extend(v)
        else:
            setattr(msg.params, k, v)
    if draw(st.booleans()):
        msg.truncate_prompt_tokens = draw(st.integers(-(2**31), 2**31 - 1))
    raw = msg.SerializeToString()
    tail = draw(st.sampled_from(["", "unknown", "bad_utf8", "wrong_wire", "junk"]))
    if tail == "unknown":
        raw += _field(99, 2, b"surprise") + _field(100, 0, _varint(7))
    elif tail == "bad_utf8":
        raw += _field(3, 2, b"\xff\xfe\xc3\x28")  # the text field, not UTF-8
    elif tail == "wrong_wire":
        raw += _field(1, 0, _varint(5))  # model as a varint
    elif tail == "junk":
        raw += draw(st.binary(min_size=1, max_size=16))
    return raw


def _call(ch: grpc.Channel, raw: bytes, key: str | None = KEY) -> grpc.StatusCode:
    gen = ch.unary_stream("/baton.v1.Generation/Generate")  # raw bytes in, raw bytes out
    md = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        for _ in gen(raw, metadata=md, timeout=60):
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_message_fuzz(router) -> None:
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(router.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)

        @settings(FUZZ, max_examples=4 * EXAMPLES)
        @given(raw=generate_requests())
        def one(raw: bytes) -> None:
            code = _call(ch, raw)
            seen[code] = seen.get(code, 0) + 1
            assert code in OK_GRPC, f"{code} for {raw[:120]!r}"

        one()
    assert seen.get(grpc.StatusCode.OK, 0) > 0 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    router.assert_no_leak()


def test_grpc_edge_messages(router) -> None:
    big = "fox " * (256 * 1024)  # 1 MB
    cases = [
        pb.GenerateRequest(model="tiny", text=""),
        pb.GenerateRequest(model="tiny", text=big),
        pb.GenerateRequest(model="tiny"),  # no input at all
        pb.GenerateRequest(model="tiny", chat=pb.ChatMessages()),
        pb.GenerateRequest(
            model="tiny", text="hi", params=pb.SamplingParams(temperature=math.nan, top_p=math.inf)
        ),
        pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(max_tokens=2**32 - 1)),
        pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(max_tokens=0)),
        pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(top_k=-(2**31))),
        pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(logprobs=2**32 - 1)),
        pb.GenerateRequest(model="tiny", text="hi", truncate_prompt_tokens=-(2**31)),
        pb.GenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=[2**32 - 1])),
    ]
    raws = [m.SerializeToString() for m in cases]
    raws += [
        b"\xff" * 32,
        _field(3, 2, b"\xc3\x28"),
        _field(4, 2, b"\xff\xff\xff"),
        _field(6, 2, _field(2, 5, struct.pack("<f", math.nan))),
        _field(6, 2, _field(1, 0, _varint(-1))),
    ]
    with grpc.insecure_channel(
        router.grpc_target, options=[("grpc.max_send_message_length", 8 << 20)]
    ) as ch:
        for raw in raws:
            code = _call(ch, raw)
            assert code in OK_GRPC, f"{code} for {raw[:80]!r}"
        assert (
            _call(ch, pb.GenerateRequest(model="tiny", text="x" * (3 << 20)).SerializeToString())
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )  # over max_body_bytes
        assert _call(ch, raws[0], key=None) == grpc.StatusCode.UNAUTHENTICATED
    router.assert_no_leak()


def test_n_larger_than_kv_budget_answers_at_once(router) -> None:
    """16 copies of 2 + 40 tokens need 48 blocks; the pool has fewer: a 400 naming n, at once."""
    import time

    t0 = time.monotonic()
    with httpx.Client(base_url=router.base_url, timeout=120) as c:
        r = c.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "tiny", "prompt": "hi", "n": 16, "max_tokens": 40, "ignore_eos": True},
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text[:200]
    assert time.monotonic() - t0 < 4, f"{r.status_code} after {time.monotonic() - t0:.0f} s"
