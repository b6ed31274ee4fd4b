"""Load a Llama-family model from a Hugging Face model directory (or dummy weights from a config).

``load_model(path, dtype, device, attn_backend, load_format) -> (model, hf_config)``:

* config through ``transformers.AutoConfig`` (so 4.x and 5.x config layouts both work);
* weights from ``*.safetensors`` (single file or sharded via ``model.safetensors.index.json``),
  falling back to ``pytorch_model.bin`` (single or sharded) under ``load_format="auto"``;
* ``load_format="dummy"``: deterministic random weights (seeded, ``initializer_range`` scale so
  bfloat16 activations stay finite) for benchmarks on big shapes without a download;
* stop tokens: ``generation_config.json``'s ``eos_token_id`` wins over the config's, as in HF
  ``generate``.

Every bad input fails before any weight is read, with the path, the architecture or the dtype named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from baton.kernels.attention import AttentionBackend
from baton.workers.models.llama import (
    ARCHITECTURES,
    LlamaFamilyForCausalLM,
    architecture_of,
    build_model,
    eos_ids_of,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_SEED = 0


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """``auto`` = the config's dtype, except half precision on CPU becomes float32.

    Why: CPU half-precision matmuls are slow and less exact than float32, and the CPU path is the
    one the token-exactness tests run on. A config without a dtype means float32 (HF's default).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(
                f"unsupported dtype {dtype}; expected one of auto, {', '.join(DTYPES)}"
            )
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.removeprefix("torch."), torch.float32)
    if declared not in DTYPES.values():
        declared = torch.float32
    if device.type == "cpu" and declared in (torch.float16, torch.bfloat16):
        return torch.float32
    return declared


def _weight_files(model_dir: Path, load_format: str) -> tuple[str, list[Path]]:
    """``("safetensors"|"bin", files)``; raises naming the directory when none is usable."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return "safetensors", _indexed(index)
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return "safetensors", shards
    if load_format == "auto":
        bin_index = model_dir / "pytorch_model.bin.index.json"
        if bin_index.is_file():
            return "bin", _indexed(bin_index)
        if (model_dir / "pytorch_model.bin").is_file():
            return "bin", [model_dir / "pytorch_model.bin"]
    wanted = "*.safetensors" + (" or pytorch_model.bin" if load_format == "auto" else "")
    raise FileNotFoundError(f"no weight files ({wanted}) in model directory {model_dir}")


def _indexed(index: Path) -> list[Path]:
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} names shard(s) that are missing: {absent}")
    return files


def iter_weights(kind: str, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` on CPU, one shard open at a time."""
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        for path in files:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


@torch.no_grad()
def init_dummy_weights(model: LlamaFamilyForCausalLM, seed: int = DUMMY_SEED) -> None:
    """Deterministic random weights: N(0, initializer_range) for matrices/biases, ones for norms.

    Parameters are filled in name order from one generator on the model's device, so the same seed
    gives the same weights on the same device type (CPU and CUDA generators differ).
    """
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def load_config(model_path: str | Path) -> tuple[Path, Any]:
    """``(directory, hf_config)`` after checking the directory, config.json and the architecture."""
    from transformers import AutoConfig

    model_dir = Path(model_path).expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory does not exist: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    architecture_of(hf_config)  # raises with the architecture named
    return model_dir, hf_config


def _generation_eos(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    return eos_ids_of(json.loads(path.read_text()).get("eos_token_id"))


def load_model(
    model_path: str | Path | Any,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_backend: AttentionBackend | str = "torch",
    load_format: str = "auto",
) -> tuple[LlamaFamilyForCausalLM, Any]:
    """Build and load the model at ``model_path``; returns ``(model, hf_config)``.

    ``model_path`` may also be a transformers config object (with ``load_format="dummy"``), e.g.
    ``llama_3_2_1b_config()`` for benchmarks on real shapes without a download.

    ``dtype``: ``auto`` (config dtype; half on CPU becomes float32), ``float32``, ``bfloat16``,
    ``float16``.
    ``load_format``: ``auto`` (safetensors, else pytorch_model.bin), ``safetensors``, ``dummy``.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    dev = torch.device(device)
    if not isinstance(model_path, (str, Path)):  # a config object: dummy weights only
        if load_format != "dummy":
            raise ValueError("a config object (no model directory) needs load_format='dummy'")
        hf_config = model_path
        architecture_of(hf_config)
        model = build_model(hf_config, resolve_dtype(dtype, hf_config, dev), dev, attn_backend)
        init_dummy_weights(model)
        return model, hf_config
    model_dir, hf_config = load_config(model_path)
    torch_dtype = resolve_dtype(dtype, hf_config, dev)
    files: tuple[str, list[Path]] | None = None
    if load_format != "dummy":
        files = _weight_files(model_dir, load_format)  # fail before allocating anything
    model = build_model(hf_config, torch_dtype, dev, attn_backend)
    if files is None:
        init_dummy_weights(model)
    else:
        model.load_weights(iter_weights(*files))
    eos = _generation_eos(model_dir)
    if eos:
        model.spec = dataclasses.replace(model.spec, eos_token_ids=eos)
    return model, hf_config


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def llama_3_2_1b_config() -> Any:
    """A config with Llama-3.2-1B's published shapes (for dummy-weight benchmarks; no download)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        dtype="bfloat16",
    )
