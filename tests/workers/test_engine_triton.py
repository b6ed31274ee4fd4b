"""Kernels acceptance 2: the engine's token-exact test with the Triton attention path on (CPU: interpreter)."""

from __future__ import annotations

import pytest
from baton import LLM, SamplingParams


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_token_exact_triton_path(tiny_model_factory, arch, monkeypatch) -> None:
    import torch
    from test_engine_vs_hf import MAX_TOKENS, hf_greedy, make_prompts

    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (make test sets it)")
    model_dir = tiny_model_factory(arch)
    llm = LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        block_size=8,
        num_kv_blocks=8,
        attention_backend="triton",
        long_prefill_token_threshold=7,
    )
    for _ in range(16):
        llm.engine.scheduler.predictor.observe(llm.engine.config.cache.namespace, 1)
    prompts = make_prompts(llm.engine.spec.vocab_size)
    expected = hf_greedy(model_dir, prompts)
    got = [
        o.outputs[0].token_ids
        for o in llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
    ]
    assert got == expected
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_integrity()
