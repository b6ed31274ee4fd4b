"""The official openai client against a real Serve router: streamed chat equals the offline engine (greedy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))
from serve_harness import router_args, serve_router  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    with serve_router(router_args(tiny_model_dir)) as h:
        yield h


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from baton import LLM, SamplingParams

    llm = LLM(
        str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256
    )
    out = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return out


def test_streamed_chat_matches_offline_engine(router, offline) -> None:
    import openai

    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="dev-mode-any")
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    text, ids, finish, usage, roles = "", [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
            ids.extend(ch.model_extra.get("token_ids") or [])
            finish = ch.finish_reason or finish
    comp = offline.outputs[0]
    assert ids == list(comp.token_ids)
    assert text == comp.text
    assert roles == ["assistant"] and finish == "length"
    assert usage.prompt_tokens == len(offline.prompt_token_ids)
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    assert usage.prompt_tokens_details.cached_tokens == 0

    # the same request again: the prompt's full blocks now come from the prefix cache
    again = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].message.content == comp.text
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < usage.prompt_tokens and cached % 16 == 0


def test_completions_models_and_n(router) -> None:
    import openai

    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x")
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=5,
        temperature=0.8,
        seed=7,
        n=3,
        logprobs=2,
    )
    assert len(r.choices) == 3 and r.usage.completion_tokens <= 15
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) for c in r.choices)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x " * 300, max_tokens=8)
    assert err.value.body["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    router.assert_no_leak()
