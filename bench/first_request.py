"""Time to first token of a fresh engine's first requests: does the first one pay for compiling?

Triton compiles a kernel the first time a process launches it (per tile config); the engine's
start-up warm-up (``EngineCore._warm_up``) runs the prefill, sampling and KV-export kernels once
so that cost lands in the start, not in the first user's TTFT. Clear the Triton cache
(``rm -rf ~/.triton/cache``) before a run to see a fresh container's first request.

    python bench/first_request.py [--shape llama-3.2-1b] [--out DIR]

Writes JSON (env, engine start seconds, per request: prompt tokens, TTFT, total). GPU only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, shape_config, write_config_dir, write_result  # noqa: E402
from serving_setup import synthetic_tokenizer  # noqa: E402

PROMPT_TOKENS = (700, 900, 650, 1200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/first_request.py needs a CUDA GPU")
    from baton.workers.config import CacheConfig, EngineConfig
    from baton.workers.engine import EngineCore
    from baton.workers.sampling_params import SamplingParams

    model = write_config_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape)
    synthetic_tokenizer(int(shape_config(args.shape).vocab_size)).save_pretrained(model)
    t0 = time.perf_counter()
    eng = EngineCore(EngineConfig(
        model=str(model), load_format="dummy", dtype="bfloat16",
        cache=CacheConfig(num_kv_blocks=2048),
    ))  # fmt: skip
    start_s = time.perf_counter() - t0
    print(f"engine start {start_s:.2f} s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for i, n in enumerate(PROMPT_TOKENS):
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(100, 5000, (n,), generator=gen).tolist()
        t0 = time.perf_counter()
        ttft = None
        eng.add_request(f"r{i}", ids, params)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if ttft is None and o.outputs[0].delta_token_ids:
                    torch.cuda.synchronize()
                    ttft = time.perf_counter() - t0
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        rows.append({"request": i, "prompt_tokens": n, "ttft_s": ttft, "total_s": total})
        print(f"request {i} ({n} tokens): ttft {ttft * 1e3:.1f} ms, total {total * 1e3:.1f} ms")
    write_result(
        "first_request",
        {"shape": args.shape, "engine_start_s": start_s, "requests": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
