"""Paged prefill/extend attention TFLOP/s vs torch SDPA (issue 4, acceptance 4). GPU only.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128), bf16. Two modes per
(batch, context): ``prefill`` (the whole context is new, causal) and ``extend`` (a chunk of
``--chunk`` new tokens over a cached prefix of context - chunk, as chunked prefill and prefix-cache
hits run it). SDPA gets contiguous KV (prefill: ``is_causal``; extend: a lower-right causal bias
with KV heads pre-expanded). FLOPs count only visible (causal) pairs: 4 * D * Hq * pairs.

    python bench/extend_attention.py --out bench/results/extend_attention_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from baton.kernels.extend_attention import extend_attention  # noqa: E402
from kernel_timing import environment, plot, time_calls, write_results  # noqa: E402

HQ, HKV, DIM = 32, 8, 128


def _flops(batch: int, qlen: int, ctx: int) -> float:
    prefix = ctx - qlen
    pairs = qlen * prefix + qlen * (qlen + 1) / 2
    return 4.0 * DIM * HQ * pairs * batch


def _ours(batch, qlen, ctx, bs, config=None):
    nblk = -(-ctx // bs)
    k = torch.randn(batch * nblk + 1, bs, HKV, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = (torch.randperm(batch * nblk, device="cuda", dtype=torch.int32) + 1).view(batch, nblk)
    q = torch.randn(batch * qlen, HQ, DIM, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * qlen
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    return lambda: extend_attention(
        q, k, v, tables, seq_lens, qsl, DIM**-0.5, max_query_len=qlen, out=out, config=config
    )


def _sdpa(batch, qlen, ctx):
    q = torch.randn(batch, HQ, qlen, DIM, device="cuda", dtype=torch.bfloat16)
    if qlen == ctx:
        k = torch.randn(batch, HKV, ctx, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right

    k = torch.randn(batch, HQ, ctx, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bias = causal_lower_right(qlen, ctx)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _sweep(args, env) -> None:
    rows = []
    configs = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 2), (64, 32, 4, 4)]
    for batch, qlen, ctx in ((1, 16384, 16384), (16, 512, 4096), (4, 4096, 4096)):
        for cfg in configs:
            try:
                sec, how = time_calls([_ours(batch, qlen, ctx, args.block_size, cfg)], reps=5)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(f"{cfg} failed: {str(exc)[:200]}", flush=True)
                continue
            tflops = _flops(batch, qlen, ctx) / sec / 1e12
            rows.append(dict(kernel="cfg", batch=batch, context=ctx, query_len=qlen,
                             config=list(cfg), seconds=sec, tflops=tflops))  # fmt: skip
            print(f"B={batch} q={qlen} ctx={ctx} {cfg}: {tflops:.1f} TFLOP/s", flush=True)
            torch.cuda.empty_cache()
    write_results(args.out, env, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[512, 4096, 16384, 32768])  # fmt: skip
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=65536, help="skip batch*context above this")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench/results/extend_attention.json"))
    p.add_argument("--sweep", action="store_true", help="time (BLOCK_M, BLOCK_N, warps, stages)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/extend_attention.py needs a CUDA GPU")
    env = environment(" ".join(["python"] + sys.argv))
    if args.sweep:
        return _sweep(args, env)
    rows: list[dict] = []
    for batch in args.batches:
        for ctx in args.contexts:
            if batch * ctx > args.max_tokens:
                continue
            modes = [("prefill", ctx)] + ([("extend", args.chunk)] if ctx > args.chunk else [])
            for mode, qlen in modes:
                flops = _flops(batch, qlen, ctx)
                sec, how = time_calls([_ours(batch, qlen, ctx, args.block_size)], reps=10)
                torch.cuda.empty_cache()
                try:
                    ssec, _ = time_calls([_sdpa(batch, qlen, ctx)], reps=10)
                except Exception as exc:  # noqa: BLE001 - a failing baseline is reported
                    print(f"sdpa failed: {exc!r}", flush=True)
                    ssec = None
                torch.cuda.empty_cache()
                for name, s in (("baton_paged_" + mode, sec), ("sdpa_" + mode, ssec)):
                    if s is None:
                        continue
                    rows.append(dict(kernel=name, mode=mode, batch=batch, context=ctx,
                                     query_len=qlen, seconds=s, tflops=flops / s / 1e12,
                                     timing=how, block_size=args.block_size))  # fmt: skip
                ratio = f"{ssec / sec:.2f}x sdpa" if ssec else "sdpa n/a"
                print(f"{mode:>7} B={batch:<3} ctx={ctx:<6} q={qlen:<6} ours "
                      f"{flops / sec / 1e12:6.1f} TFLOP/s ({ratio})", flush=True)  # fmt: skip
                write_results(args.out, env, rows)
    plot(args.out.with_suffix(".png"), rows, "tflops", "TFLOP/s (causal pairs)",
         f"paged prefill/extend, {env['device']}")  # fmt: skip


if __name__ == "__main__":
    main()
