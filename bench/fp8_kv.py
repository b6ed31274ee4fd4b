"""fp8 (e4m3) KV vs bf16 KV on one model: bytes per token, decode speed, greedy-token agreement.

Feeds the KV-quantization drift monitor: the agreement numbers here are what the canary probe tracks online.
Llama-3.2-1B shapes with random weights (no download), bf16 weights, same prompts and GPU for both runs.

    python bench/fp8_kv.py [--prompts 64] [--max-tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_random_weights_dir, write_result  # noqa: E402


def run(model_dir: Path, kv: str, prompts, max_tokens: int) -> dict:
    from baton import LLM, SamplingParams

    llm = LLM(
        str(model_dir),
        device="cuda",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        kv_cache_dtype=kv,
        gpu_memory_utilization=0.6,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    kvt = llm.engine.runner.kv_cache
    per_token = kvt[:, :, 0, 0].numel() * kvt.element_size()
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm
    torch.cuda.empty_cache()
    return dict(
        kv_cache_dtype=kv,
        seconds=dt,
        tokens_per_s=sum(map(len, tokens)) / dt,
        kv_bytes_per_token=per_token,
        tokens=tokens,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model_dir = write_random_weights_dir(Path(tempfile.mkdtemp()) / "m", "llama-3.2-1b")
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, 128000, (int(n),), generator=g).tolist()
        for n in torch.randint(64, 2048, (args.prompts,), generator=g)
    ]
    base = run(model_dir, "auto", prompts, args.max_tokens)
    fp8 = run(model_dir, "fp8", prompts, args.max_tokens)
    first = sum(a[0] == b[0] for a, b in zip(base["tokens"], fp8["tokens"])) / len(prompts)
    same = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        for a, b in zip(base["tokens"], fp8["tokens"])
    ]
    summary = dict(
        first_token_agreement=first,
        mean_tokens_before_divergence=sum(same) / len(same),
        full_sequence_agreement=sum(s == args.max_tokens for s in same) / len(same),
        kv_bytes_ratio=fp8["kv_bytes_per_token"] / base["kv_bytes_per_token"],
        decode_speedup=fp8["tokens_per_s"] / base["tokens_per_s"],
    )
    print(summary)
    for r in (base, fp8):
        r.pop("tokens")
        print(r)
    write_result(
        "fp8_kv",
        dict(summary=summary, rows=[base, fp8], prompts=args.prompts, max_tokens=args.max_tokens),
        args.out,
    )


if __name__ == "__main__":
    main()
