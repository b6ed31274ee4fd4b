"""Paged decode attention vs the memory-bandwidth limit (issue 4, acceptance 3 and 5). GPU only.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128), bf16 KV, batch x context.
Per shape, in one run: our paged Triton kernel (bf16 KV and fp8 KV), a device-to-device copy of the
same bytes, torch SDPA (enable_gqa) on contiguous KV, and FlexAttention over a paged KV cache.
Each row: kernel, batch, context, seconds, bytes_per_s (KV bytes read per second),
fraction_of_copy_bw (against the large-copy reference). ``--sweep`` instead times kernel configs
and split counts (how the defaults in kernels/decode_attention.py were chosen).

    python bench/decode_attention.py --out bench/results/decode_attention_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baton.kernels.decode_attention import decode_attention  # noqa: E402
from kernel_timing import copies_for, environment, plot, time_calls, write_results  # noqa: E402

HQ, HKV, DIM = 32, 8, 128
FP8 = torch.float8_e4m3fn


def _paged(batch, ctx, copies, bs, dtype, gen_seed=0):
    """A shuffled paged cache holding ``copies`` independent batches, and their block tables."""
    nblk = -(-ctx // bs)
    total = copies * batch * nblk
    torch.manual_seed(gen_seed)
    k = torch.randn(total + 1, bs, HKV, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if dtype == FP8:
        k, v = k.to(FP8), v.to(FP8)
    perm = torch.randperm(total, device="cuda", dtype=torch.int32) + 1
    tables = perm.view(copies, batch, nblk)
    return k, v, tables


def _ours(batch, ctx, copies, bs, dtype, config=None, splits=None):
    k, v, tables = _paged(batch, ctx, copies, bs, dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qs = [torch.randn(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    outs = [torch.empty_like(q) for q in qs]

    def make(i):
        return lambda: decode_attention(
            qs[i], k, v, tables[i], seq_lens, DIM**-0.5, max_seq_len=ctx, out=outs[i],
            config=config, num_splits=splits,
        )  # fmt: skip

    return [make(i) for i in range(copies)]


def _sdpa(batch, ctx, copies):
    import torch.nn.functional as F

    k = torch.randn(copies * batch, HKV, ctx, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(copies * batch, HQ, 1, DIM, device="cuda", dtype=torch.bfloat16)

    def make(i):
        s = slice(i * batch, (i + 1) * batch)
        return lambda: F.scaled_dot_product_attention(q[s], k[s], v[s], enable_gqa=True)

    return [make(i) for i in range(copies)]


def _flex(batch, ctx, page=128):
    """FlexAttention over torch's experimental paged KV (page size 128, its block size)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_per = -(-ctx // page)
    n_pages = batch * n_per
    pa = PagedAttention(n_pages, page, batch, device="cuda")
    table = (torch.randperm(n_pages, device="cuda")).view(batch, n_per)
    pa.page_table[:, :n_per] = table
    pa.physical_to_logical.scatter_(
        1, table, torch.arange(n_per, device="cuda").expand(batch, n_per).contiguous()
    )
    pa.capacity[:] = n_per * page
    k = torch.randn(1, HKV, n_pages * page, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, 1, DIM, device="cuda", dtype=torch.bfloat16)
    kv_len = torch.full((batch,), ctx, device="cuda")

    def causal(b, h, q_idx, kv_idx):
        return kv_idx < ctx

    logical = create_block_mask(causal, batch, None, 1, ctx, device="cuda", BLOCK_SIZE=page)
    mask = pa.convert_logical_block_mask(logical, kv_len=kv_len)
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return [lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)]


def _copy_bw() -> float:
    """Best device-to-device copy rate over a few sizes, counting bytes read + written (as the
    issue's 2.87 TB/s does): the reference limit."""
    best = 0.0
    for nbytes in (256 << 20, 1 << 30, 2 << 30):
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        sec, _ = time_calls([lambda dst=dst, src=src: dst.copy_(src)], reps=10)
        best = max(best, 2 * nbytes / sec)
        del src, dst
    return best


def _row(kernel, batch, ctx, sec, kv_bytes, copy_bw, method, **extra):
    bw = kv_bytes / sec
    row = dict(kernel=kernel, batch=batch, context=ctx, seconds=sec, kv_bytes=kv_bytes,
               bytes_per_s=bw, fraction_of_copy_bw=bw / copy_bw, timing=method, **extra)  # fmt: skip
    print(f"{kernel:>18} B={batch:<4} ctx={ctx:<6} {sec * 1e6:9.1f} us  {bw / 1e12:5.2f} TB/s  "
          f"{100 * bw / copy_bw:5.1f}% of copy  {extra}", flush=True)  # fmt: skip
    return row


def _kv_bytes(batch, ctx, elem):
    return 2 * batch * ctx * HKV * DIM * elem


def run_main(args, env) -> None:
    copy_bw = _copy_bw()
    print(f"copy reference: {copy_bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    flex_shapes = {tuple(int(x) for x in s.split("x")) for s in args.flex_shapes.split(",") if s}
    budget = args.max_gib * 2**30
    for batch in args.batches:
        for ctx in args.contexts:
            kvb = _kv_bytes(batch, ctx, 2)
            if 2 * kvb > budget:
                print(f"skip B={batch} ctx={ctx}: {kvb / 2**30:.0f} GiB of KV", flush=True)
                continue
            copies = copies_for(kvb)
            sec, how = time_calls(_ours(batch, ctx, copies, args.block_size, torch.bfloat16))
            rows.append(_row("baton_paged", batch, ctx, sec, kvb, copy_bw, how,
                             block_size=args.block_size))  # fmt: skip
            torch.cuda.empty_cache()
            if args.fp8:
                kvb8 = _kv_bytes(batch, ctx, 1)
                sec8, how = time_calls(_ours(batch, ctx, copies_for(kvb8), args.block_size, FP8))
                rows.append(_row("baton_paged_fp8", batch, ctx, sec8, kvb8, copy_bw, how,
                                 speedup_vs_bf16=sec / sec8))  # fmt: skip
                torch.cuda.empty_cache()
            src = torch.empty(kvb * copies, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            fns = [lambda i=i, dst=dst, src=src: dst[i * kvb : (i + 1) * kvb].copy_(src[i * kvb : (i + 1) * kvb])
                   for i in range(copies)]  # fmt: skip
            csec, how = time_calls(fns)
            rows.append(_row("copy", batch, ctx, csec, kvb, copy_bw, how,
                             copy_bytes_per_s=2 * kvb / csec))  # fmt: skip
            del src, dst, fns
            torch.cuda.empty_cache()
            try:
                ssec, how = time_calls(_sdpa(batch, ctx, copies))
                rows.append(_row("sdpa_contiguous", batch, ctx, ssec, kvb, copy_bw, how,
                                 ours_over_sdpa=ssec / sec))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                print(f"sdpa failed: {exc!r}", flush=True)
            torch.cuda.empty_cache()
            if (batch, ctx) in flex_shapes:
                try:
                    fsec, how = time_calls(_flex(batch, ctx))
                    rows.append(_row("flex_paged", batch, ctx, fsec, kvb, copy_bw, how,
                                     ours_speedup=fsec / sec, page_size=128))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    print(f"flex failed: {str(exc)[:2000]}", flush=True)
                torch.cuda.empty_cache()
            write_results(args.out, env, rows, {"copy_reference_bytes_per_s": copy_bw})
    if args.plot:
        plot(args.out.with_suffix(".png"), rows, "fraction_of_copy_bw",
             "KV bytes/s as a fraction of copy bandwidth", f"paged decode, {env['device']}")  # fmt: skip


def run_sweep(args, env) -> None:
    """Time (BLOCK_N, warps, stages) configs and split counts on a few shapes."""
    rows: list[dict] = []
    copy_bw = _copy_bw()
    shapes = [(1, 32768), (16, 16384), (64, 4096), (256, 4096), (16, 4096), (4, 8192)]
    configs = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    for batch, ctx in shapes:
        kvb = _kv_bytes(batch, ctx, 2)
        copies = copies_for(kvb)
        for cfg in configs if (batch, ctx) in shapes[:4] else []:
            try:
                sec, how = time_calls(_ours(batch, ctx, copies, args.block_size, torch.bfloat16,
                                            config=cfg), reps=8)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(f"config {cfg} failed: {str(exc)[:200]}", flush=True)
                continue
            rows.append(_row("cfg", batch, ctx, sec, kvb, copy_bw, how, config=list(cfg)))
        for splits in (1, 2, 4, 8, 16, 32, 64):
            sec, how = time_calls(_ours(batch, ctx, copies, args.block_size, torch.bfloat16,
                                        splits=splits), reps=8)  # fmt: skip
            rows.append(_row("splits", batch, ctx, sec, kvb, copy_bw, how, splits=splits))
        torch.cuda.empty_cache()
        write_results(args.out, env, rows, {"copy_reference_bytes_per_s": copy_bw})


def run_small_sweep(args, env) -> None:
    """Small shapes (where the fixed cost of launches and too few programs shows): every
    (BLOCK_N, warps, stages) x split count, with cuDNN SDPA on the same shape in the same run."""
    rows: list[dict] = []
    copy_bw = _copy_bw()
    shapes = [(1, 512), (4, 512), (16, 512), (1, 4096), (16, 4096), (1, 1024), (64, 512)]
    configs = [(bn, w, s) for bn in (16, 32, 64) for w in (2, 4, 8) for s in (2, 3)]
    if args.sweep_shapes:
        shapes = [tuple(int(x) for x in t.split("x")) for t in args.sweep_shapes.split(",")]
    if args.sweep_configs:
        configs = [tuple(int(x) for x in t.split("/")) for t in args.sweep_configs.split(",")]
    for batch, ctx in shapes:
        kvb = _kv_bytes(batch, ctx, 2)
        copies = copies_for(kvb)
        ssec, how = time_calls(_sdpa(batch, ctx, copies))
        rows.append(_row("sdpa_contiguous", batch, ctx, ssec, kvb, copy_bw, how))
        sec, how = time_calls(_ours(batch, ctx, copies, args.block_size, torch.bfloat16))
        rows.append(_row("default", batch, ctx, sec, kvb, copy_bw, how, ours_over_sdpa=ssec / sec))
        for cfg in configs:
            for splits in (1, 2, 4, 8, 16):
                if splits * cfg[0] > ctx:
                    continue
                try:
                    sec, how = time_calls(_ours(batch, ctx, copies, args.block_size,
                                                torch.bfloat16, config=cfg, splits=splits),
                                          reps=8)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"config {cfg} x{splits} failed: {str(exc)[:200]}", flush=True)
                    continue
                rows.append(_row("cfg_split", batch, ctx, sec, kvb, copy_bw, how, config=list(cfg),
                                 splits=splits, ours_over_sdpa=ssec / sec))  # fmt: skip
        torch.cuda.empty_cache()
        write_results(args.out, env, rows, {"copy_reference_bytes_per_s": copy_bw})
        best = min((r for r in rows if r["batch"] == batch and r["context"] == ctx
                    and r["kernel"] == "cfg_split"), key=lambda r: r["seconds"])  # fmt: skip
        print(
            f"BEST B={batch} ctx={ctx}: {best['config']} x{best['splits']} "
            f"{best['seconds'] * 1e6:.1f} us, {best['ours_over_sdpa']:.3f} of sdpa",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256]
    )
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[512, 4096, 16384, 32768])  # fmt: skip
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--flex-shapes", default="64x4096,16x16384")
    p.add_argument("--no-fp8", dest="fp8", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--max-gib", type=float, default=66.0)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--small-sweep", action="store_true", help="configs x splits at small shapes")
    p.add_argument("--sweep-shapes", default="", help="small sweep shapes, e.g. 16x512,16x4096")
    p.add_argument("--sweep-configs", default="", help="BLOCK_N/warps/stages list, e.g. 128/8/2")
    p.add_argument("--out", type=Path, default=Path("bench/results/decode_attention.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_attention.py needs a CUDA GPU")
    env = environment(" ".join(["python"] + sys.argv))
    run = run_small_sweep if args.small_sweep else run_sweep if args.sweep else run_main
    run(args, env)


if __name__ == "__main__":
    main()
