"""The serving comparison's pool layouts: one GPU shared (fractions) or N whole GPUs per config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from baton.bench.serving_setup import CONFIGS, full_plan, pool_config, serve_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import build_model_dir  # noqa: E402


def _layouts(tmp_path: Path, num_gpus: int) -> dict[str, tuple]:
    plan = dataclasses.replace(full_plan(None), num_gpus=num_gpus)
    path = build_model_dir(tmp_path / "tiny", "llama", max_position_embeddings=plan.max_model_len)
    out = {}
    for name in CONFIGS:
        cfg = serve_config(plan, path, "dummy", None, CONFIGS[name][2])
        pc = pool_config(plan, cfg, name)
        out[name] = (
            pc.num_prefill, pc.num_decode, pc.num_colocated, pc.num_gpus_per_worker, pc.transport,
            pc.disagg_threshold_tokens > plan.max_model_len,
        )  # fmt: skip
    return out


def test_one_gpu_is_shared_and_two_gpus_give_every_config_both(tmp_path):
    one = _layouts(tmp_path, 1)
    assert one["disagg"][:4] == (1, 1, 0, 0.5) and one["chunked"][:4] == (0, 0, 1, 1.0)
    two = _layouts(tmp_path, 2)
    # disagg: a prefill GPU and a decode GPU, KV over NCCL (Ray shows each worker one GPU only)
    assert two["disagg"] == (1, 1, 0, 1.0, "nccl", False) == two["nocache"]
    # colocated: one worker per GPU that never hands KV to the other
    assert two["chunked"] == (0, 0, 2, 1.0, "auto", True) == two["unchunked"]
