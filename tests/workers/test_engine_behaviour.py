"""Sampling, stops, finish reasons, bad input, aborts, KV hand-over and KV waste of the engine (CPU, tiny model)."""

from __future__ import annotations

import random

import pytest
from baton import LLM, SamplingParams
from baton.workers.engine import ContextLengthError
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(
        str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=64,
        max_model_len=128,
    )


def test_seeded_sampling_is_reproducible_across_batches(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], p)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batched = llm.generate(["Once upon a time", "The quick brown fox"], [p, other])[0]
    assert batched.outputs[0].token_ids == alone
    different = (
        llm.generate(
            ["Once upon a time"],
            SamplingParams(temperature=1.0, max_tokens=10, seed=8, ignore_eos=True),
        )[0]
        .outputs[0]
        .token_ids
    )
    assert different != alone


def test_stop_string_cuts_text_exactly(llm: LLM) -> None:
    free = llm.generate(
        ["The capital"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    )[0]
    text = free.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]  # a substring that starts mid-way
    cut = llm.generate(
        ["The capital"], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True)
    )[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.find(stop)]
    keep = llm.generate(
        ["The capital"],
        SamplingParams(
            temperature=0,
            max_tokens=20,
            stop=[stop],
            include_stop_str_in_output=True,
            ignore_eos=True,
        ),
    )[0]
    assert keep.outputs[0].text == text[: text.find(stop) + len(stop)]


def test_finish_reasons(llm: LLM) -> None:
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    first = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    stop_id = first.outputs[0].token_ids[1]
    out = llm.generate(
        ["hello"],
        SamplingParams(temperature=0, max_tokens=3, stop_token_ids=[stop_id], ignore_eos=True),
    )[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    assert out.outputs[0].token_ids[-1] == stop_id


def test_streaming_deltas_reassemble_text(llm: LLM) -> None:
    eng = llm.engine
    eng.add_request(
        "s1",
        llm.encode("Once upon a time"),
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, stop=["zzz-never"]),
    )
    text, tokens, finals = "", [], []
    while eng.has_unfinished_requests():
        for o in eng.step():
            text += o.outputs[0].delta_text
            tokens += o.outputs[0].delta_token_ids
            if o.finished:
                finals.append(o)
    assert len(finals) == 1
    assert tokens == finals[0].outputs[0].token_ids and text == finals[0].outputs[0].text


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(top_k=-3),
        dict(temperature=float("nan")),
        dict(n=0),
        dict(min_p=2),
    ],
)
def test_bad_sampling_values_fail_before_work(kwargs) -> None:
    with pytest.raises(ValueError, match="invalid sampling parameter"):
        SamplingParams(**kwargs)


def test_context_overflow_names_both_numbers(llm: LLM) -> None:
    with pytest.raises(ContextLengthError) as err:
        llm.generate([[5] * 120], SamplingParams(max_tokens=20))
    assert err.value.prompt_tokens == 120 and err.value.max_model_len == 128
    assert "120" in str(err.value) and "128" in str(err.value) and "20" in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**6]], SamplingParams())
    assert llm.engine.pool.num_used == 0


def test_unknown_architecture_and_missing_dir(tmp_path, tiny_model_dir) -> None:
    with pytest.raises((FileNotFoundError, ValueError)):
        LLM(str(tmp_path / "nope"), device="cpu")


def test_abort_frees_blocks(llm: LLM) -> None:
    eng = llm.engine
    eng.add_request(
        "a1",
        llm.encode("The quick brown fox jumps"),
        SamplingParams(max_tokens=50, ignore_eos=True),
    )
    eng.step()
    assert eng.pool.num_used > 0
    assert eng.abort_request("a1")
    outs = eng.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    assert eng.pool.num_used == 0 and not eng.has_unfinished_requests()
    eng.check_integrity()


def test_prefill_handover_equals_local(llm: LLM) -> None:
    """Prefill-only on one engine, hand the KV to another: same greedy tokens as one engine alone."""
    eng = llm.engine
    prompt = llm.encode("You are a helpful assistant. Answer briefly")
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expect = llm.generate([prompt], p)[0].outputs[0].token_ids
    eng.reset_prefix_cache()
    eng.add_request("pf", prompt, p, prefill_only=True)
    outs = []
    while not outs:
        outs = [o for o in eng.step() if o.finished]
    assert outs[0].outputs[0].finish_reason is None
    first = outs[0].outputs[0].token_ids
    kv = eng.export_kv("pf").clone()
    eng.release_request("pf")
    assert eng.pool.num_used == 0
    eng.reset_prefix_cache()  # so the decode side cannot cheat through the local cache
    assert eng.add_prefilled_request("dc", prompt, first, p, kv)
    before = eng.prompt_tokens_computed
    tokens = list(first)
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens += o.outputs[0].delta_token_ids[-1:] if o.outputs[0].delta_token_ids else []
    assert tokens == expect
    assert eng.prompt_tokens_computed == before  # no prefill work on the decode side
    eng.check_integrity()


def test_kv_waste_at_most_one_partial_block_per_sequence(llm: LLM, capsys) -> None:
    eng = llm.engine
    rng = random.Random(0)
    for i in range(12):
        n = rng.randint(1, 40)
        eng.add_request(
            f"w{i}",
            [rng.randint(3, 300) for _ in range(n)],
            SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True),
        )
    worst = 0.0
    contiguous = 0.0
    bs = eng.pool.block_size
    while eng.has_unfinished_requests():
        eng.step()
        running = eng.scheduler.running
        if not running:
            continue
        allocated = sum(len(r.block_ids) for r in running) * bs
        used = sum(r.num_computed_tokens for r in running)
        assert allocated - used <= len(running) * bs
        worst = max(worst, (allocated - used) / allocated)
        reserved = len(running) * eng.max_model_len  # contiguous: a max-length slab per sequence
        contiguous = max(contiguous, (reserved - used) / reserved)
    with capsys.disabled():
        print(
            f"\n[kv-waste] paged block_size={bs}: worst allocated-minus-used = {worst:.1%} of allocated; "
            f"contiguous max_model_len slabs would waste {contiguous:.1%}"
        )
    eng.check_integrity()


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 30), st.integers(1, 12), st.booleans()), min_size=1, max_size=8
    ),
    st.integers(0, 5),
)
def test_random_add_abort_leaves_no_block(llm: LLM, reqs, abort_after) -> None:
    eng = llm.engine
    ids = []
    for i, (plen, max_tokens, abort) in enumerate(reqs):
        rid = f"h{i}-{random.random()}"
        eng.add_request(rid, [7] * plen, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        ids.append((rid, abort))
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        if steps == abort_after:
            for rid, abort in ids:
                if abort:
                    eng.abort_request(rid)
        eng.check_integrity()
    assert eng.pool.num_used == 0
