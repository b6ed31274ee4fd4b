"""Shared bench plumbing: model shapes built in code (dummy weights, no download) and result files that
record device, versions and the command that produced them."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-3-8B differs from Llama-3.2-1B (the engine's own `llama_3_2_1b_config`) only in these fields.
LLAMA_3_8B_OVERRIDES = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    head_dim=128,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
SHAPES = ("llama-3.2-1b", "llama-3-8b")


def shape_config(shape: str) -> Any:
    """The HF config of a named shape, built in code (no download)."""
    from baton.workers.model_loader import llama_3_2_1b_config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    cfg = llama_3_2_1b_config()
    if shape == "llama-3-8b":
        cfg.update(LLAMA_3_8B_OVERRIDES)
    return cfg


def write_config_dir(path: Path, shape: str, min_positions: int = 0) -> Path:
    """A model directory holding only config.json: load it with load_format='dummy'.
    ``min_positions`` raises ``max_position_embeddings`` where a workload needs longer contexts
    than the shape's own (Llama-3-8B's 8192; the serving plan's 8000-token prompts plus output)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = shape_config(shape)
    cfg.max_position_embeddings = max(int(cfg.max_position_embeddings), min_positions)
    cfg.save_pretrained(path)
    return path


def write_random_weights_dir(path: Path, shape: str, seed: int = 0) -> Path:
    """config.json + random bf16 safetensors built by transformers itself, so Baton and HF load the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    write_config_dir(path, shape)
    cfg = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
        else:
            info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    except ImportError:
        pass
    for mod in ("triton", "transformers", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"env": environment(), **payload}, indent=1, default=str))
    print(f"wrote {path}")
    return path
