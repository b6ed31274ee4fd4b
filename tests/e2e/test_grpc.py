"""gRPC ``Generation`` on a real Serve router: streamed Generate equals the offline engine; status
codes; reflection; auth and trace context in metadata."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))
from baton.protos.build import ensure_generated  # noqa: E402
from serve_harness import router_args, serve_router  # noqa: E402

ensure_generated()
from baton.protos.baton.v1 import generation_pb2 as pb  # noqa: E402
from baton.protos.baton.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

AUTH = (
    ("authorization", "Bearer sk-g"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
)
PROMPT = "Once upon a time there was a little robot"


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump({"tenants": {"g": {"keys": ["sk-g"]}}, "admin_keys": ["sk-admin"]})
    )
    with serve_router(
        router_args(tiny_model_dir, tenants={"api_keys_file": str(keys)}),
        grpc=True,
        admin_key="sk-admin",
    ) as h:
        yield h


@pytest.fixture(scope="module")
def stub(router):
    ch = grpc.insecure_channel(router.grpc_target)
    grpc.channel_ready_future(ch).result(timeout=30)
    yield pb_grpc.GenerationStub(ch)
    ch.close()


def test_generate_streams_offline_tokens(stub, tiny_model_dir, router) -> None:
    from baton import LLM, SamplingParams

    llm = LLM(
        str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256
    )
    ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    req = pb.GenerateRequest(
        model="tiny",
        text=PROMPT,
        request_id="r1",
        params=pb.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    )
    msgs = list(stub.Generate(req, metadata=AUTH, timeout=60))
    ids = [t for m in msgs for t in m.token_ids]
    assert len(msgs) >= 2 and ids == list(ref.outputs[0].token_ids)
    assert "".join(m.text for m in msgs) == ref.outputs[0].text
    last = msgs[-1]
    assert last.finish_reason == "length" and last.request_id == "r1"
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert last.usage.completion_tokens == 10
    tok = stub.Tokenize(pb.TokenizeRequest(model="tiny", text=PROMPT), metadata=AUTH)
    assert list(tok.token_ids) == list(ref.prompt_token_ids) and tok.max_model_len == 256
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models] == ["tiny"]
    assert stub.Health(pb.HealthRequest()).ok


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_status_codes(stub, router) -> None:
    gen = pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(max_tokens=2))
    assert _code(lambda: list(stub.Generate(gen, timeout=30))) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _code(
            lambda: list(stub.Generate(gen, metadata=(("authorization", "Bearer x"),), timeout=30))
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )
    bad_model = pb.GenerateRequest(model="nope", text="hi")
    assert (
        _code(lambda: list(stub.Generate(bad_model, metadata=AUTH, timeout=30)))
        == grpc.StatusCode.NOT_FOUND
    )
    long = pb.GenerateRequest(
        model="tiny", text="fox " * 300, params=pb.SamplingParams(max_tokens=8)
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long, metadata=AUTH, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(err.value.trailing_metadata())
    assert trailers["max-model-len"] == "256" and trailers["max-tokens"] == "8"
    assert int(trailers["prompt-tokens"]) > 248
    bad_temp = pb.GenerateRequest(model="tiny", text="hi", params=pb.SamplingParams(temperature=-1))
    assert (
        _code(lambda: list(stub.Generate(bad_temp, metadata=AUTH, timeout=30)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_cancel_aborts_and_reflection(stub, router) -> None:
    req = pb.GenerateRequest(
        model="tiny",
        text=PROMPT,
        request_id="long",
        params=pb.SamplingParams(max_tokens=200, ignore_eos=True),
    )
    call = stub.Generate(req, metadata=AUTH, timeout=60)
    next(call)  # running
    call.cancel()
    router.assert_no_leak()

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(router.grpc_target)
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(
        refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in resp.list_services_response.service}
    assert "baton.v1.Generation" in names
    ch.close()
