"""Acceptance 1 of the engine: greedy tokens equal HF transformers ``generate`` on the same weights.

Each architecture, 8 prompts of different lengths in one batch, block size 4 so prompts straddle block
boundaries, prefix reuse on (two prompts share a long prefix, and the batch runs twice), and a KV budget so small
that preemption happens. The same again with prefill forced into 7-token chunks.
"""

from __future__ import annotations

import pytest
import torch
from baton import LLM, SamplingParams
from transformers import AutoModelForCausalLM

ARCHS = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 12


def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = [1, 3, 4, 5, 9, 16, 23, 31]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    prompts[7] = prompts[6] + prompts[7][:8]  # shares a 23-token prefix with prompt 6
    return prompts


def hf_greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outs.append(gen[0, len(p) :].tolist())
    return outs


def short_output_llm(model_dir, **llm_kwargs) -> LLM:
    """A float32 LLM whose admission predictor has learned that outputs are short, so it over-admits and the
    real (longer) outputs run the pool dry: the seeds' case of outputs outgrowing their prediction."""
    llm = LLM(str(model_dir), dtype="float32", **llm_kwargs)
    for _ in range(16):
        llm.engine.scheduler.predictor.observe(llm.engine.config.cache.namespace, 1)
    return llm


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [None, 7])
def test_greedy_token_exact(tiny_model_factory, arch: str, chunk: int | None) -> None:
    model_dir = tiny_model_factory(arch)
    llm = short_output_llm(
        model_dir,
        device="cpu",
        block_size=4,
        num_kv_blocks=24,  # 96 token slots for 8 sequences of up to 43 tokens: preemption must happen
        max_num_batched_tokens=256,
        long_prefill_token_threshold=chunk,
        attention_backend="torch",
    )
    vocab = llm.engine.spec.vocab_size
    prompts = make_prompts(vocab)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = hf_greedy(model_dir, prompts)
    for round_ in range(2):  # second round runs on a warm prefix cache
        outs = llm.generate(prompts, params)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == expected, f"{arch} round {round_}"
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
        llm.engine.check_integrity()
        assert llm.engine.pool.num_used == 0
    assert llm.engine.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert llm.engine.pool.prefix_hits > 0, "prefix reuse was meant to happen"
