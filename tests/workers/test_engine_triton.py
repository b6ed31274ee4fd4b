"""Kernels acceptance 2: the engine's token-exact test with the Triton attention path on (CPU:
interpreter; GPU: the compiled kernels and decode CUDA graphs, float32)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_token_exact_triton_path(tiny_model_factory, arch) -> None:
    import torch
    from test_engine_vs_hf import greedy_tokens, hf_greedy, make_prompts, short_output_llm

    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (make test sets it)")
    model_dir = tiny_model_factory(arch)
    llm = short_output_llm(
        model_dir,
        device="cuda" if torch.cuda.is_available() else "cpu",  # GPU: float32, real kernels
        block_size=8,
        num_kv_blocks=8,
        attention_backend="triton",
        long_prefill_token_threshold=7,
    )
    prompts = make_prompts(llm.engine.spec.vocab_size)
    assert greedy_tokens(llm, prompts) == hf_greedy(model_dir, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_integrity()
