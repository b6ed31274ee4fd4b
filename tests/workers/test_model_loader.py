"""load_model: clear errors on bad inputs, weight-file layouts, dummy weights, dtype and eos."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from baton.kernels.attention import AttentionMetadata
from baton.workers.model_loader import (
    llama_3_2_1b_config,
    load_model,
    resolve_dtype,
    supported_architectures,
)
from baton.workers.models.llama import rope_parameters
from safetensors.torch import load_file, save_file

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=32,
)


def _tiny_dir(path: Path, **overrides: object) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _logits(model: object, ids: list[int]) -> torch.Tensor:
    s = model.spec  # type: ignore[attr-defined]
    kv = torch.zeros(s.num_layers, 2, 4, 16, s.num_kv_heads, s.head_dim, dtype=s.dtype)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[1, 2]], 16, "cpu")
    hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), kv, meta)  # type: ignore
    return model.compute_logits(hidden)  # type: ignore[attr-defined]


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(missing)


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path}"):
        load_model(tmp_path)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no weight files .* {tmp_path}"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors\) in"):
        load_model(tmp_path, load_format="safetensors")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    assert "GPT2LMHeadModel" in str(err.value)
    for name in supported_architectures():
        assert name in str(err.value)


def test_bad_dtype_and_load_format(tmp_path: Path) -> None:
    path = _tiny_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(path, dtype="float8")
    with pytest.raises(ValueError, match="unknown load_format 'gguf'"):
        load_model(path, load_format="gguf")


def test_dynamic_rope_is_rejected(tmp_path: Path) -> None:
    path = _tiny_dir(
        tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    )
    with pytest.raises(ValueError, match="unsupported RoPE type 'dynamic'"):
        load_model(path)


def test_transformers4_rope_fields_are_read() -> None:
    cfg = SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=100.0)
    assert rope_parameters(cfg) == {
        "type": "linear",
        "factor": 2.0,
        "rope_theta": 100.0,
        "rope_type": "linear",
    }
    plain = SimpleNamespace(rope_scaling=None, rope_theta=500.0)
    assert rope_parameters(plain) == {"rope_theta": 500.0, "rope_type": "default"}


def test_sharded_and_bin_layouts_load_the_same_weights(tmp_path: Path) -> None:
    single = _tiny_dir(tmp_path / "single")
    state = load_file(str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    names = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((single / "config.json").read_text())
    torch.save(state, binary / "pytorch_model.bin")

    ref = _logits(load_model(single)[0], [1, 2, 3])
    torch.testing.assert_close(_logits(load_model(sharded)[0], [1, 2, 3]), ref, atol=0, rtol=0)
    torch.testing.assert_close(_logits(load_model(binary)[0], [1, 2, 3]), ref, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        load_model(binary, load_format="safetensors")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(sharded)


def test_missing_and_unknown_weights_are_errors(tmp_path: Path) -> None:
    path = _tiny_dir(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if k != "model.norm.weight"},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(path)
    save_file(
        {**state, "model.layers.0.extra.weight": torch.zeros(2)},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        load_model(path)


def test_dummy_weights_are_deterministic_and_finite(tmp_path: Path) -> None:
    path = _tiny_dir(tmp_path, tie_word_embeddings=True)
    a, _ = load_model(path, load_format="dummy")
    b, _ = load_model(path, load_format="dummy")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert torch.all(a.model.norm.weight == 1)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert 0.01 < float(a.model.layers[0].self_attn.q_proj.weight.std()) < 0.03
    bf16, _ = load_model(path, dtype="bfloat16", load_format="dummy")
    assert bf16.spec.dtype == torch.bfloat16
    assert torch.isfinite(_logits(bf16, [1, 2, 3, 4])).all()


def test_dummy_from_config_object_with_llama_1b_shapes() -> None:
    cfg = llama_3_2_1b_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (2048, 16, 8)
    small = transformers.LlamaConfig(
        **{
            **cfg.to_dict(),
            "num_hidden_layers": 1,
            "vocab_size": 512,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    model, _ = load_model(small, dtype="bfloat16", load_format="dummy")
    assert model.spec.eos_token_ids == (128001, 128008, 128009)
    assert model.attention_scaling == 1.0
    assert torch.isfinite(_logits(model, list(range(20)))).all()
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model(small)


def test_auto_dtype_rules() -> None:
    half = SimpleNamespace(dtype=torch.bfloat16)
    assert resolve_dtype("auto", half, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", half, torch.device("cuda")) == torch.bfloat16
    assert (
        resolve_dtype("auto", SimpleNamespace(torch_dtype="float16"), torch.device("cuda"))
        == torch.float16
    )
    assert resolve_dtype("auto", SimpleNamespace(), torch.device("cuda")) == torch.float32
    assert resolve_dtype("bfloat16", half, torch.device("cpu")) == torch.bfloat16


def test_generation_config_eos_wins(tmp_path: Path) -> None:
    path = _tiny_dir(tmp_path, eos_token_id=2)
    assert load_model(path)[0].spec.eos_token_ids == (2,)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model(path)[0].spec.eos_token_ids == (2, 7)


def test_architecture_from_model_type_when_config_names_none(tmp_path: Path) -> None:
    transformers.Qwen3Config(**TINY).save_pretrained(tmp_path / "q")
    model, _ = load_model(tmp_path / "q", load_format="dummy")
    assert model.spec.architecture == "Qwen3ForCausalLM"
    assert model.model.layers[0].self_attn.q_norm is not None
