"""Sink + recent-window KV eviction (StreamingLLM): KV stays bounded at sinks + window blocks on a
conversation longer than the pool, tokens equal the model computed under the same mask with no block
ever freed (so eviction only drops what the mask hides), responses say eviction happened, the default
stays the explicit context error, and on the default model the window with sinks predicts a held
continuation better than plain truncation of the oldest tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baton.kernels.attention import AttentionMetadata, LayerAttentionParams
from baton.workers.admission import blocks_for
from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.workers.engine import ContextLengthError, EngineCore
from baton.workers.sampling_params import SamplingParams

BS = 16
SINKS = 4


def mask_layers(model, window: int | None, sinks: int) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "params", None), LayerAttentionParams):
            m.params = dataclasses.replace(m.params, sliding_window=window, num_sink_tokens=sinks)


def engine(
    model_dir, *, window: int, blocks: int, evict: bool, backend: str = "torch", chunk: int = 128
) -> EngineCore:
    cache = CacheConfig(
        block_size=BS,
        num_kv_blocks=blocks,
        kv_eviction="sink_window" if evict else "none",
        num_sink_tokens=SINKS,
        eviction_window=window,
    )
    eng = EngineCore(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", attention_backend=backend,
        cache=cache, scheduler=SchedulerConfig(max_num_batched_tokens=chunk),
    ))  # fmt: skip
    if not evict:  # the reference: the same mask, every block kept
        mask_layers(eng.model, window, SINKS)
    return eng


def synthetic_chat(eng: EngineCore, turns: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = [
        "alpha",
        "robot",
        "count",
        "Paris",
        "fox",
        "model",
        "serve",
        "decode",
        "block",
        "cache",
    ]
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for t in range(turns):
        idx = torch.randint(0, len(words), (60,), generator=g).tolist()
        role = "user" if t % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": " ".join(words[i] for i in idx)})
    return msgs


def generate(eng: EngineCore, rid: str, prompt: list[int], max_tokens: int):
    eng.add_request(
        rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    peak, final = 0, None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final = out
        peak = max(peak, eng.pool.num_used)
        eng.check_integrity()
    assert eng.pool.num_used == 0 or eng.config.cache.enable_prefix_caching
    return final, peak


def run_long_chat(
    model_dir, *, turns: int, window: int, blocks: int, backend: str = "torch", max_tokens: int = 24
) -> None:
    ev = engine(model_dir, window=window, blocks=blocks, evict=True, backend=backend)
    ref = engine(model_dir, window=window, blocks=4096, evict=False)
    chat = synthetic_chat(ev, turns)
    prompt = ev.chat_prompt(chat)
    assert len(prompt) > blocks * BS, "the conversation must outgrow the KV pool"
    bound = blocks_for(SINKS, BS) + blocks_for(window + 128 - 1, BS) + 1
    got, peak = generate(ev, "long", prompt, max_tokens)
    want, ref_peak = generate(ref, "long", prompt, max_tokens)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.kv_evicted and got.num_evicted_tokens > 0 and not want.kv_evicted
    assert peak <= bound < ref_peak, (peak, bound, ref_peak)
    assert ev.stats().evicted_blocks * BS == got.num_evicted_tokens
    # Next turn: the conversation plus the answer plus a new message (sink blocks hit the cache).
    chat2 = chat + [
        {"role": "assistant", "content": got.outputs[0].text},
        {"role": "user", "content": "count the fox"},
    ]
    prompt2 = ev.chat_prompt(chat2)
    got2, peak2 = generate(ev, "turn2", prompt2, 8)
    want2, _ = generate(ref, "turn2", prompt2, 8)
    assert got2.outputs[0].token_ids == want2.outputs[0].token_ids
    assert peak2 <= bound


def test_long_chat_kv_bounded_and_token_exact(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama", max_position_embeddings=4096)
    run_long_chat(model_dir, turns=12, window=256, blocks=40)  # ~2.1k tokens, 640 token slots


def test_sink_window_kernels_path_triton(tiny_model_factory) -> None:
    """The Triton decode/extend kernels' window + sink masking (interpreter on CPU)."""
    model_dir = tiny_model_factory("llama", max_position_embeddings=4096)
    run_long_chat(model_dir, turns=2, window=48, blocks=14, backend="triton", max_tokens=6)


@pytest.mark.slow
def test_20k_token_chat_kv_bounded(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama", max_position_embeddings=32768)
    run_long_chat(model_dir, turns=115, window=512, blocks=64)  # ~20k tokens


def test_default_is_the_explicit_context_error(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama", max_position_embeddings=4096)
    plain = engine(model_dir, window=64, blocks=16, evict=False)
    long_prompt = list(range(5, 300))
    with pytest.raises(ValueError, match="KV cache capacity"):
        plain.validate(long_prompt, SamplingParams(max_tokens=8))
    with pytest.raises(ContextLengthError):
        plain.validate(list(range(5, 100)) * 44, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="kv_eviction=sink_window needs"):
        plain.validate([5, 6], SamplingParams(extra={"kv_eviction": "sink_window"}))
    ev = engine(model_dir, window=64, blocks=16, evict=True)
    ev.validate(long_prompt, SamplingParams(max_tokens=8))  # bounded by eviction: accepted
    with pytest.raises(ContextLengthError) as err:  # opted out: must fit in the window
        ev.validate(long_prompt, SamplingParams(max_tokens=8, extra={"kv_eviction": "none"}))
    assert err.value.max_model_len == 64
    out, _ = generate(ev, "short", list(range(5, 40)), 8)
    assert not out.kv_evicted  # shorter than the window: nothing was evicted, attention is exact
    with pytest.raises(ValueError, match="eviction_window"):
        engine(model_dir, window=1024, blocks=16, evict=True)  # sinks + window do not fit


def test_sinks_beat_plain_truncation_on_default_model() -> None:
    """Mean NLL of a held continuation, same KV budget: window + 4 sinks (StreamingLLM) vs the
    same budget without sinks (drop the oldest tokens, original positions) vs truncating the
    text to its last window tokens and re-encoding it (the recompute baseline)."""
    import argparse
    import doctest
    import subprocess

    from baton.workers.default_model import default_model_path
    from baton.workers.model_loader import load_model
    from transformers import AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = "\n\n".join(m.__doc__ for m in (subprocess, argparse, doctest))
    ids = tok.encode(text)[:640]
    assert len(ids) == 640
    model, _ = load_model(
        str(path), dtype="float32", device=torch.device("cpu"), attn_backend="torch"
    )
    window, held = 128, 64

    def nll(x: list[int], window: int | None, sinks: int) -> float:
        mask_layers(model, window, sinks)
        spec, n = model.spec, len(x)
        nb = blocks_for(n, BS)
        kv = torch.zeros(spec.num_layers, 2, nb + 1, BS, spec.num_kv_heads, spec.head_dim)
        meta = AttentionMetadata.build([n], [n], [list(range(1, nb + 1))], BS, "cpu")
        with torch.inference_mode():
            h = model.forward(torch.tensor(x), torch.arange(n), kv, meta)
            lp = torch.log_softmax(model.compute_logits(h[n - held - 1 : n - 1]).float(), -1)
            return float(-lp.gather(1, torch.tensor(x[n - held :])[:, None]).mean())

    sink_window = nll(ids, window, SINKS)
    drop_oldest = nll(ids, window + SINKS, 0)
    truncated = nll(ids[-(window + SINKS) :], None, 0)
    assert sink_window < truncated < drop_oldest, (sink_window, truncated, drop_oldest)
    assert drop_oldest - sink_window > 0.2  # measured: 2.67 vs 2.99 nats (truncated: between)
