"""Speculative decoding (n-gram drafts): greedy output is token-identical to plain decoding, sampled
output keeps the target distribution, rejected drafts roll back cleanly, and drafting switches itself
off when it does not pay. CPU, tiny random Llama (whose greedy output loops, so drafts get accepted)."""

from __future__ import annotations

import math

import pytest
import torch
from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from baton.workers.engine import EngineCore
from baton.workers.sampler import SamplingRow, verify
from baton.workers.sampling_params import SamplingParams
from baton.workers.spec_decode import DraftQuery, NgramProposer, SpecDecoder


def make_engine(
    model_dir, spec=None, *, num_kv_blocks=256, chunk=None, backend="torch", block_size=4
) -> EngineCore:
    return EngineCore(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", attention_backend=backend,
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, long_prefill_token_threshold=chunk),
        speculative=spec,
    ))  # fmt: skip


def over_admit(eng: EngineCore) -> None:
    """Teach the admission predictor that outputs are short, so real outputs run the pool dry."""
    for _ in range(16):
        eng.scheduler.predictor.observe(eng.config.cache.namespace, 1)


def run(eng: EngineCore, prompts, params) -> dict[str, object]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        eng.add_request(f"r{i}", p, sp)
    done: dict[str, object] = {}
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        eng.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.pool.num_used == 0
    return done


def prompts_for(eng: EngineCore) -> list[list[int]]:
    tok = eng.tokenizer
    g = torch.Generator().manual_seed(3)
    return [
        tok.encode("one two three four five one two three four five one two three"),
        tok.encode("The quick brown fox jumps over the lazy dog. The quick brown fox"),
        tok.encode("def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"),
        torch.randint(3, eng.spec.vocab_size, (11,), generator=g).tolist(),
        [7],
    ]


@pytest.mark.parametrize("chunk,blocks", [(None, 256), (5, 40)])
def test_greedy_identical_with_and_without_speculation(tiny_model_dir, chunk, blocks) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    base = make_engine(tiny_model_dir, num_kv_blocks=blocks, chunk=chunk)
    spec = make_engine(tiny_model_dir, {"k": 4}, num_kv_blocks=blocks, chunk=chunk)
    prompts = prompts_for(base)
    over_admit(base)
    over_admit(spec)
    want = run(base, prompts, params)
    got = run(spec, prompts, params)
    for rid in want:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids, rid
        assert got[rid].outputs[0].finish_reason == "length"
    stats = spec.stats()
    assert stats.spec_accepted_tokens > 0 and stats.spec_draft_tokens >= stats.spec_accepted_tokens
    assert any(o.metrics.get("spec_accepted_tokens", 0) > 0 for o in got.values())
    if blocks == 40:
        assert spec.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"


def test_greedy_identical_with_stops_penalties_logprobs(tiny_model_dir) -> None:
    base = make_engine(tiny_model_dir)
    spec = make_engine(tiny_model_dir, {"k": 5, "n_min": 1})
    prompts = prompts_for(base)
    free = run(base, prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    toks = free["r0"].outputs[0].token_ids
    stop_tok = toks[12]  # a token that appears after drafts started being accepted
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=20),
        SamplingParams(
            temperature=0, max_tokens=30, stop=[base.tokenizer.decode(toks[9:11])], ignore_eos=True
        ),
    ]
    prompts = [prompts[0], prompts[1], prompts[1], prompts[2], prompts[0]]
    want, got = run(base, prompts, params), run(spec, prompts, params)
    for rid in want:
        w, g = want[rid].outputs[0], got[rid].outputs[0]
        assert g.token_ids == w.token_ids, rid
        assert g.text == w.text and g.finish_reason == w.finish_reason, rid
        assert g.stop_reason == w.stop_reason, rid
    lw, lg = want["r1"].outputs[0].logprobs, got["r1"].outputs[0].logprobs
    assert len(lg) == len(lw) == 17
    for a, b in zip(lw, lg):
        assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
    assert spec.stats().spec_accepted_tokens > 0


def test_streamed_deltas_add_up(tiny_model_dir) -> None:
    eng = make_engine(tiny_model_dir, {"k": 4})
    eng.add_request(
        "s", prompts_for(eng)[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )
    tokens: list[int] = []
    multi = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            delta = out.outputs[0].delta_token_ids
            multi += len(delta) > 1
            tokens.extend(delta)
            final = out
    assert tokens == final.outputs[0].token_ids and len(tokens) == 30
    assert multi > 0, "some steps were meant to emit several tokens"


def test_rejection_sampling_keeps_target_distribution() -> None:
    """Chi-square over a 6-token vocab: first and second emitted token vs the target p."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.2, 0.1, 1.3, -0.5, 0.0, 0.7]])
    p0, p1 = torch.softmax(logits[0], -1), torch.softmax(logits[1], -1)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    gen = torch.Generator().manual_seed(11)
    rows = [SamplingRow(params, [1], [], gen), SamplingRow(params, [1], [0], gen)]
    n = 6000
    first = torch.zeros(6)
    second_given_accept = torch.zeros(6)
    accepts = 0
    for _ in range(n):
        toks, _ = verify(logits.clone(), rows, [0], None)  # draft: token 0
        first[toks[0]] += 1
        if len(toks) == 2:
            accepts += 1
            second_given_accept[toks[1]] += 1
    assert abs(accepts / n - float(p0[0])) < 0.03  # acceptance probability is p(draft)
    chi_first = float((((first - n * p0) ** 2) / (n * p0)).sum())
    chi_second = float((((second_given_accept - accepts * p1) ** 2) / (accepts * p1)).sum())
    # 5 degrees of freedom: P(chi2 > 20.5) ~ 0.001
    assert chi_first < 20.5 and chi_second < 20.5, (chi_first, chi_second)


def test_sampled_speculation_runs_and_seeded_requests_stay_reproducible(tiny_model_dir) -> None:
    base = make_engine(tiny_model_dir)
    eng = make_engine(tiny_model_dir, {"k": 4, "n_min": 1})
    prompts = prompts_for(eng)[:3]
    free = SamplingParams(temperature=0.7, top_k=20, max_tokens=30, ignore_eos=True)
    out = run(eng, prompts, free)
    for o in out.values():
        toks = o.outputs[0].token_ids
        assert len(toks) == 30 and all(0 <= t < eng.spec.vocab_size for t in toks)
    assert eng.stats().spec_draft_tokens > 0
    # A seed promises the same tokens whatever else runs: seeded requests are not drafted for.
    seeded = SamplingParams(temperature=0.7, top_k=20, max_tokens=30, seed=5, ignore_eos=True)
    a, b = run(eng, prompts, seeded), run(base, prompts, seeded)
    for rid in a:
        assert a[rid].outputs[0].token_ids == b[rid].outputs[0].token_ids


def test_abort_mid_speculation_keeps_pool_consistent(tiny_model_dir) -> None:
    eng = make_engine(tiny_model_dir, {"k": 4}, num_kv_blocks=64)
    prompts = prompts_for(eng)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, params)
    aborted = set()
    for step in range(200):
        if not eng.has_unfinished_requests():
            break
        eng.step()
        eng.check_integrity()
        live = [r for r in eng.scheduler.running if r.num_draft_tokens > 0]
        if live and step % 3 == 0:
            assert eng.abort_request(live[0].request_id)
            aborted.add(live[0].request_id)
            eng.check_integrity()
    assert aborted and not eng.has_unfinished_requests()
    assert eng.pool.num_used == 0


def test_ngram_proposer() -> None:
    prop = NgramProposer(n_min=2, n_max=3, k=3)
    q = DraftQuery("x", [1, 2, 3, 4, 5, 9, 2, 3], [], k=3)
    assert prop.propose([q]) == [[4, 5, 9]]  # "2 3" occurred before, followed by 4 5 9
    q = DraftQuery("x", [1, 2, 3, 4, 5, 9, 2, 3], [4, 7, 2, 3], k=3)
    assert prop.propose([q]) == [[4, 7, 2]]  # the most recent earlier occurrence wins
    assert prop.propose([DraftQuery("y", [5, 6, 7, 8], [], k=3)]) == [[]]  # no repeat, no draft
    assert prop.propose([DraftQuery("z", [1, 2, 1, 2], [], k=1)]) == [[1]]
    prop.forget("x")
    assert "x" not in prop._index


def test_drafting_turns_itself_off_and_probes_again() -> None:
    cfg = SpeculativeConfig(
        k=2, min_acceptance=0.5, ema_alpha=0.5, warmup_drafts=4, cooldown_steps=3
    )
    dec = SpecDecoder(cfg)
    q = [DraftQuery("r", [1, 2, 3, 1, 2], [], k=2)]
    assert dec.propose(q) == [[3, 1]]
    for _ in range(4):
        dec.observe("r", 2, 0)
    assert not dec.active
    assert dec.propose(q) == [[]]
    for _ in range(3):
        dec.propose(q)
    assert dec.active and dec.propose(q) == [[3, 1]]


def test_one_request_that_does_not_repeat_does_not_switch_drafting_off_for_others() -> None:
    cfg = SpeculativeConfig(
        k=2, min_acceptance=0.5, ema_alpha=0.5, warmup_drafts=4, cooldown_steps=100
    )
    dec = SpecDecoder(cfg)
    good = DraftQuery("good", [1, 2, 3, 1, 2], [], k=2)
    bad = DraftQuery("bad", [4, 5, 6, 4, 5], [], k=2)
    assert dec.propose([good, bad]) == [[3, 1], [6, 4]]
    for _ in range(6):  # the bad request rejects everything, the good one accepts half
        dec.observe("bad", 2, 0)
        dec.observe("good", 2, 1)
    assert not dec.active  # the engine-wide average fell below the threshold ...
    assert dec.propose([good, bad]) == [[3, 1], []]  # ... but only the bad request stops


def test_speculative_config_validation() -> None:
    assert EngineConfig(speculative={"method": "ngram", "k": 3}).speculative.k == 3
    with pytest.raises(ValueError, match="speculative.k"):
        EngineConfig(speculative={"k": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        EngineConfig(speculative={"kk": 1})
