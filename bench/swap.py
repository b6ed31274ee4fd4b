"""Swap preemption: swap-out/in bandwidth of the pinned host pool, and a burst that must preempt,
run with recompute and with swap preemption (greedy outputs must be identical; wall time compared).

Llama-3.2-1B shapes with dummy weights (no download), bf16 KV on CUDA.

    python bench/swap.py [--shape llama-3.2-1b] [--blocks 16 64 256 1024] [--out DIR]
    CPU smoke: python bench/swap.py --model-dir TINY --blocks 4 16 --burst-blocks 48 --max-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_config_dir, write_result  # noqa: E402


def make_engine(model_dir: Path, device: str, num_blocks: int, swap_bytes: int, mode: str):
    from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
    from baton.workers.engine import EngineCore

    return EngineCore(EngineConfig(
        model=str(model_dir), device=device, load_format="dummy", skip_tokenizer_init=True,
        dtype="bfloat16" if device == "cuda" else "float32",
        cache=CacheConfig(num_kv_blocks=num_blocks, swap_space_bytes=swap_bytes,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=8192, preemption_mode=mode),
    ))  # fmt: skip


def bandwidth(model_dir: Path, device: str, sizes: list[int], repeats: int) -> list[dict]:
    from baton.workers.model_runner import block_bytes
    from baton.workers.swap import SwapOp

    n_max = max(sizes)
    probe = make_engine(model_dir, device, 2, 0, "recompute")
    per = block_bytes(probe.spec, 16, probe.kv_dtype)
    del probe
    eng = make_engine(model_dir, device, n_max + 1, per * n_max, "swap")
    assert eng.swap is not None
    eng.runner.kv_cache.normal_()
    rows = []
    for n in sizes:
        dev = list(range(1, n + 1))
        op = SwapOp("bench", tuple(dev), tuple(range(n)))
        eng.swap.swap_out(op)  # warm-up
        eng.swap.swap_in(op)
        before = eng.runner.gather_blocks(dev).clone()
        s0 = (eng.swap.stats.seconds_out, eng.swap.stats.seconds_in)
        for _ in range(repeats):
            eng.swap.swap_out(op)
            eng.swap.swap_in(op)
        out_s = (eng.swap.stats.seconds_out - s0[0]) / repeats
        in_s = (eng.swap.stats.seconds_in - s0[1]) / repeats
        assert torch.equal(eng.runner.gather_blocks(dev), before), "swap round trip changed KV"
        nbytes = n * eng.swap.block_bytes
        rows.append(
            dict(
                blocks=n,
                bytes=nbytes,
                out_seconds=out_s,
                in_seconds=in_s,
                out_GBps=nbytes / out_s / 1e9,
                in_GBps=nbytes / in_s / 1e9,
                pinned=eng.swap.host.is_pinned(),
            )
        )
        print(rows[-1])
    return rows


def burst(
    model_dir: Path, device: str, mode: str, swap_bytes: int, num_blocks: int, max_tokens: int
) -> dict:
    from baton.workers.sampling_params import SamplingParams

    eng = make_engine(model_dir, device, num_blocks, swap_bytes, mode)
    for _ in range(16):  # short predicted outputs: admit more than fits, so the burst preempts
        eng.scheduler.predictor.observe(eng.config.cache.namespace, 1)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    cap = eng.max_model_len - max_tokens
    vocab = eng.spec.vocab_size
    for i in range(32):
        n = int(torch.randint(min(1000, cap // 2), min(3000, cap), (1,), generator=g))
        eng.add_request(f"b{i}", torch.randint(10, vocab, (n,), generator=g).tolist(), params)
    outs: dict[str, list[int]] = {}
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    eng.check_integrity()
    s = eng.stats()
    return dict(
        mode=mode,
        seconds=dt,
        preemptions=s.scheduler.num_preemptions,
        swap_preemptions=s.num_swap_preemptions,
        swapped_out_blocks=s.swapped_out_blocks,
        swap_out_seconds=s.swap_out_seconds,
        swap_in_seconds=s.swap_in_seconds,
        prompt_tokens_computed=s.prompt_tokens_computed,
        outputs=outs,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--model-dir", type=Path, default=None, help="a model dir instead of --shape")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--swap-gib", type=float, default=16.0)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--burst-blocks", type=int, default=2048, help="KV budget of the burst")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = args.model_dir or write_config_dir(
        Path(tempfile.mkdtemp()) / args.shape, args.shape
    )
    bw = bandwidth(model_dir, device, args.blocks, args.repeats)
    swap_bytes = int(args.swap_gib * 2**30)
    rec = burst(model_dir, device, "recompute", 0, args.burst_blocks, args.max_tokens)
    swp = burst(model_dir, device, "swap", swap_bytes, args.burst_blocks, args.max_tokens)
    identical = rec.pop("outputs") == swp.pop("outputs")
    print(rec, swp, "identical", identical, sep="\n")
    write_result(
        f"swap_{device}",
        dict(
            shape=str(args.model_dir or args.shape),
            bandwidth=bw,
            burst=[rec, swp],
            burst_outputs_identical=identical,
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
