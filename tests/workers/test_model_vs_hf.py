"""The paged Llama-family model against transformers' own forward, on tiny random HF checkpoints.

Each case builds a tiny HF model with a fixed seed, saves it with ``save_pretrained``, loads it
back through ``load_model`` and compares float32 logits: a full prefill, a prefill then one decode
step against the paged cache (validates the cache writes), and a prefill split into chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from baton.kernels.attention import AttentionMetadata
from baton.workers.model_loader import load_model

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 4
# A deliberately scrambled block table: logical block i lives in physical block TABLE[i].
TABLE = [5, 2, 7, 0, 3, 6]
NUM_BLOCKS = 8
ATOL = 1e-4

_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-llama3-rope-bias": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_parameters": LLAMA3_ROPE,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "llama-linear-rope-head-dim": (
        "LlamaConfig",
        {
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
            "head_dim": 32,
            "num_key_value_heads": 1,
        },
    ),
    "mistral-sliding": ("MistralConfig", {"head_dim": 16, "sliding_window": 5}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2-sliding-upper-layer": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen3-qk-norm": ("Qwen3Config", {"head_dim": 16}),
    "qwen3-bias-tied": (
        "Qwen3Config",
        {"head_dim": 24, "attention_bias": True, "tie_word_embeddings": True},
    ),
}


def _save_tiny(tmp_path: Path, config_cls: str, overrides: dict[str, Any]) -> tuple[Path, Any]:
    cfg = getattr(transformers, config_cls)(**{**_BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(1234)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomize so they matter
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf = hf.eval()
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


def _empty_cache(model: Any) -> torch.Tensor:
    s = model.spec
    return torch.zeros(s.num_layers, 2, NUM_BLOCKS, BLOCK_SIZE, s.num_kv_heads, s.head_dim)


def _run(model: Any, kv: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
    """Feed ``ids`` at positions ``start..`` (the cache holds the rest) -> logits [len, V]."""
    n = len(ids)
    meta = AttentionMetadata.build([n], [start + n], [TABLE], BLOCK_SIZE, "cpu")
    hidden = model.forward(torch.tensor(ids), torch.arange(start, start + n), kv, meta)
    return model.compute_logits(hidden)


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config_cls, overrides = CASES[request.param]
    path, hf = _save_tiny(tmp_path_factory.mktemp(request.param), config_cls, overrides)
    model, hf_config = load_model(path, dtype="float32", device="cpu", attn_backend="torch")
    assert model.spec.architecture == hf_config.architectures[0]
    return model, hf


PROMPT = [3, 17, 250, 9, 42, 7, 7, 128, 64, 1, 99, 200, 13]  # 13 tokens: straddles 4-token blocks


def _hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prefill_matches_hf(pair: Any) -> None:
    model, hf = pair
    ours = _run(model, _empty_cache(model), PROMPT, 0)
    ref = _hf_logits(hf, PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_prefill_then_decode_uses_cache(pair: Any) -> None:
    model, hf = pair
    kv = _empty_cache(model)
    _run(model, kv, PROMPT[:5], 0)
    step = _run(model, kv, PROMPT[5:6], 5)  # reads positions 0..4 back from the paged cache
    ref = _hf_logits(hf, PROMPT[:6])[-1:]
    torch.testing.assert_close(step, ref, atol=ATOL, rtol=0)
    # A decode step against a zeroed cache must differ: the cache contents are really used.
    wrong = _run(model, _empty_cache(model), PROMPT[5:6], 5)
    assert (wrong - ref).abs().max() > 1e-3


def test_chunked_prefill_matches_hf(pair: Any) -> None:
    model, hf = pair
    kv = _empty_cache(model)
    chunks = [PROMPT[:7], PROMPT[7:10], PROMPT[10:]]
    out, start = [], 0
    for chunk in chunks:
        out.append(_run(model, kv, chunk, start))
        start += len(chunk)
    torch.testing.assert_close(torch.cat(out), _hf_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_greedy_decode_token_exact_with_hf_generate(pair: Any) -> None:
    model, hf = pair
    prompt = PROMPT[:6]
    kv = _empty_cache(model)
    logits = _run(model, kv, prompt, 0)[-1:]
    ours: list[int] = []
    for step in range(8):
        tok = int(logits.argmax(-1))
        ours.append(tok)
        logits = _run(model, kv, [tok], len(prompt) + step)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            min_new_tokens=8,
            pad_token_id=0,
        )
    assert ours == ref[0, len(prompt) :].tolist()


def test_two_sequences_in_one_batch(pair: Any) -> None:
    """Two packed sequences (a prefill and a decode) in one step, each with its own blocks."""
    model, hf = pair
    kv = _empty_cache(model)
    a, b = PROMPT[:9], PROMPT[4:8]
    table_a, table_b = [5, 2, 7], [0, 3]
    meta = AttentionMetadata.build([len(b) - 1], [len(b) - 1], [table_b], BLOCK_SIZE, "cpu")
    model.forward(torch.tensor(b[:-1]), torch.arange(len(b) - 1), kv, meta)  # b's prefix first
    meta = AttentionMetadata.build(
        [len(a), 1], [len(a), len(b)], [table_a, table_b], BLOCK_SIZE, "cpu"
    )
    ids = torch.tensor(a + b[-1:])
    pos = torch.cat([torch.arange(len(a)), torch.tensor([len(b) - 1])])
    logits = model.compute_logits(model.forward(ids, pos, kv, meta))
    torch.testing.assert_close(logits[: len(a)], _hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[len(a) :], _hf_logits(hf, b)[-1:], atol=ATOL, rtol=0)


def test_sliding_window_reaches_layer_params(tmp_path: Path) -> None:
    path, _ = _save_tiny(tmp_path, *CASES["qwen2-sliding-upper-layer"])
    model, _ = load_model(path, dtype="float32")
    windows = [layer.self_attn.params.sliding_window for layer in model.model.layers]
    assert windows == [None, 4]
    assert model.spec.sliding_window is None  # not every layer slides
    path2, _ = _save_tiny(tmp_path / "m", *CASES["mistral-sliding"])
    mistral, _ = load_model(path2, dtype="float32")
    assert mistral.spec.sliding_window == 5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_float32_matches_hf(tmp_path: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path, hf = _save_tiny(tmp_path, *CASES["llama-tied-llama3-rope-bias"])
    model, _ = load_model(path, dtype="float32", device="cuda", attn_backend="torch")
    s = model.spec
    kv = torch.zeros(
        s.num_layers, 2, NUM_BLOCKS, BLOCK_SIZE, s.num_kv_heads, s.head_dim, device="cuda"
    )
    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [TABLE], BLOCK_SIZE, "cuda")
    hidden = model.forward(
        torch.tensor(PROMPT, device="cuda"), torch.arange(len(PROMPT), device="cuda"), kv, meta
    )
    torch.testing.assert_close(
        model.compute_logits(hidden).cpu(), _hf_logits(hf, PROMPT), atol=ATOL, rtol=0
    )


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_llama_1b_shapes_first_token_agrees_with_hf() -> None:
    """Dummy weights with Llama-3.2-1B shapes in bfloat16: HF gets the very same tensors."""
    from baton.workers.model_loader import llama_3_2_1b_config

    cfg = llama_3_2_1b_config()
    model, _ = load_model(cfg, dtype="bfloat16", device="cuda", load_format="dummy")
    hf = (
        transformers.LlamaForCausalLM._from_config(
            cfg, attn_implementation="eager", dtype=torch.bfloat16
        )
        .cuda()
        .eval()
    )
    missing, unexpected = hf.load_state_dict(dict(model.named_parameters()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    s = model.spec
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (200,), generator=gen).tolist()
    kv = torch.zeros(
        s.num_layers, 2, 16, 16, s.num_kv_heads, s.head_dim, device="cuda", dtype=torch.bfloat16
    )
    meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [list(range(13))], 16, "cuda")
    ours = model.compute_logits(
        model.forward(
            torch.tensor(prompt, device="cuda"), torch.arange(len(prompt), device="cuda"), kv, meta
        )
    )
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    assert int(ours[-1].argmax()) == int(ref[-1].argmax())
    targets = torch.tensor(prompt[1:], device="cuda")[:, None]  # next-token ids
    lp_ours = torch.log_softmax(ours[:-1], -1).gather(1, targets)
    lp_ref = torch.log_softmax(ref[:-1], -1).gather(1, targets)
    err = (lp_ours - lp_ref).abs().max().item()
    print(f"bf16 Llama-3.2-1B-shaped prompt logprob max abs diff vs HF: {err:.4f}")
    assert err < 0.1
