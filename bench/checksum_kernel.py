"""The fused copy + ``wsum32x2`` checksum kernel (the cuda_ipc sink's one pass) against a plain
device-to-device copy of the same bytes, over its two launch knobs: words per block (``W32_BLOCK``)
and programs per SM. Two times per config, both medians:

- ``gpu_us``: CUDA events around ``--reps`` back-to-back launches, divided by ``--reps`` (what the
  GPU spends: is the kernel memory bound?);
- ``wall_us``: one call as the sink makes it (launch, partials to the host, fold), synchronised
  (what a transfer pays).

    python bench/checksum_kernel.py --sizes-mib 64 256 --out bench/results/checksum_kernel.json
    python bench/checksum_kernel.py --verify-variants --sizes-mib 64 256 --out <json>

Writes JSON (device, versions, command, rows, ``best``: the config with the lowest wall time at
the largest size, as ``BLOCK/PROGRAMS_PER_SM``). GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import environment, write_results  # noqa: E402


def _gpu_us(fn, reps: int) -> float:
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(samples)


def _wall_us(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()  # a no-op after the fused call's fold; the copy needs it
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def host_breakdown(sizes_mib: list[int], reps: int) -> list[dict]:
    """Where one synchronised fused call's wall time goes, step by step (medians, us): the
    partials' allocation, the Triton launch (JIT path and a direct launch of the compiled kernel),
    the wait for the GPU, the partials to the host (pageable ``.cpu()`` and a pinned copy), the
    fold; and a plain copy's wall time beside them."""
    from baton.kernels import checksum
    from baton.workers.kv_handle import wsum32_fold

    out = []
    for mib in sizes_mib:
        src = torch.randint(-(2**31), 2**31 - 1, (mib << 18,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        n_words = src.numel()
        n_full = n_words // checksum.W32_BLOCK
        grid = checksum._num_programs(n_full, src.device, checksum._W32_PROGRAMS_PER_SM)
        per_prog = -(-n_full // grid)
        grid = -(-n_full // per_prog)
        parts = torch.empty(2, grid, dtype=torch.int32, device="cuda")
        pinned = torch.empty(2, grid, dtype=torch.int32).pin_memory()
        args = (src, dst, parts, n_words, n_full, per_prog)
        kw = dict(BLOCK=checksum.W32_BLOCK, COPY=True, TAIL=n_words % checksum.W32_BLOCK != 0,
                  num_warps=checksum._W32_WARPS)  # fmt: skip
        compiled = checksum._wsum32_kernel[(grid,)](*args, **kw)
        direct = compiled[(grid, 1, 1)]
        steps: dict[str, list[float]] = {k: [] for k in (
            "empty", "launch_jit", "wait", "cpu_pageable", "fold", "launch_direct",
            "wait_direct", "pinned_d2h", "total_api", "copy_total")}  # fmt: skip
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.empty(2, grid, dtype=torch.int32, device="cuda")
            t1 = time.perf_counter()
            checksum._wsum32_kernel[(grid,)](*args, **kw)
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            host = parts.cpu()
            t4 = time.perf_counter()
            wsum32_fold(host)
            t5 = time.perf_counter()
            direct(*args, kw["BLOCK"], kw["COPY"], kw["TAIL"])
            t6 = time.perf_counter()
            torch.cuda.synchronize()
            t7 = time.perf_counter()
            pinned.copy_(parts, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            t8 = time.perf_counter()
            wsum32_fold(checksum.copy_with_wsum32x2(src, dst))
            t9 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            t10 = time.perf_counter()
            ts = (t0, t1, t2, t3, t4, t5)
            for k, v in zip(list(steps)[:5], [b - a for a, b in zip(ts, ts[1:])]):
                steps[k].append(v)
            steps["launch_direct"].append(t6 - t5)
            steps["wait_direct"].append(t7 - t6)
            steps["pinned_d2h"].append(t8 - t7)
            steps["total_api"].append(t9 - t8)
            steps["copy_total"].append(t10 - t9)
        row = {"mib": mib, "grid": grid,
               **{k: round(statistics.median(v) * 1e6, 1) for k, v in steps.items()}}  # fmt: skip
        print("host breakdown", row, flush=True)
        out.append(row)
    return out


def verify_variants(sizes_mib: list[int], reps: int) -> list[dict]:
    """The device-verified copy (``VerifiedCopier``, the cuda_ipc sink's default) by its parts:
    GPU time of the kernel with the fold's atomics all acq_rel or only the arrival counts (the
    default), 1 or 16 groups, beside ``cudaMemcpy`` and the partials-only variant; and host time of
    one verified copy (wall, synchronised), of ``launch`` alone and of a stream sync (what the
    polled verdict replaces)."""
    from baton.kernels import checksum
    from baton.workers.kv_handle import ALGO_WSUM32, kv_checksum, wsum32_expected

    out = []
    for mib in sizes_mib:
        src = torch.randint(-(2**31), 2**31 - 1, (mib << 18,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        exp = wsum32_expected(kv_checksum(src, ALGO_WSUM32))
        n_words = src.numel()
        grid, n_full, per_prog, tail = checksum._w32_grid(n_words, src.device)
        state = torch.zeros(1 + checksum._GROUPS, checksum._LINE, dtype=torch.int32, device="cuda")
        flag = torch.zeros(4, dtype=torch.int32, device="cuda")
        parts = torch.empty(2, grid, dtype=torch.int32, device="cuda")
        row: dict = {"mib": mib, "grid": grid, "copy_gpu_us": _gpu_us(lambda: dst.copy_(src), reps)}

        def kernel(verify: bool, groups: int = 16, sem: str = "relaxed"):
            return lambda: checksum._wsum32_kernel[(grid,)](
                src, dst, parts, state, flag, n_words, n_full, per_prog, exp[0], exp[1],
                BLOCK=checksum.W32_BLOCK, COPY=True, TAIL=tail, VERIFY=verify, GROUPS=groups,
                LINE=checksum._LINE, ADD_SEM=sem, SYS_FENCE=verify,
                num_warps=checksum._W32_WARPS,
            )  # fmt: skip

        row["partials_gpu_us"] = _gpu_us(kernel(False), reps)
        for groups in (1, 16):
            for sem in ("acq_rel", "relaxed"):
                fn = kernel(True, groups, sem)
                flag.zero_()
                fn()
                torch.cuda.synchronize()
                if int(flag[0].item()) != 1:
                    raise AssertionError(f"verify {groups} groups {sem}: wrong verdict")
                row[f"verify_g{groups}_{sem}_gpu_us"] = _gpu_us(fn, reps)
        copier = checksum.VerifiedCopier("cuda")
        nbytes = n_words * 4
        assert copier.copy(src, dst, nbytes, exp)
        row["verified_copy_wall_us"] = _wall_us(lambda: copier.copy(src, dst, nbytes, exp), reps)
        row["copy_wall_us"] = _wall_us(lambda: dst.copy_(src), reps)
        launches, syncs = [], []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            slot = copier.launch(src, dst, nbytes, exp)
            launches.append(time.perf_counter() - t0)
            copier.wait(slot)
            t0 = time.perf_counter()
            torch.cuda.current_stream().synchronize()
            syncs.append(time.perf_counter() - t0)
        row["launch_host_us"] = statistics.median(launches) * 1e6
        row["idle_stream_sync_us"] = statistics.median(syncs) * 1e6
        row["direct_launches"] = copier.direct_launches
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        print("verify variants", row, flush=True)
        out.append(row)
    return out


def main() -> None:
    from baton.kernels import checksum
    from baton.workers.kv_handle import wsum32_fold

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--blocks", nargs="+", type=int, default=[1024, 2048, 4096])
    ap.add_argument("--programs-per-sm", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/checksum_kernel.json"))
    ap.add_argument("--host-breakdown", action="store_true", help="only the per-step host costs")
    ap.add_argument(
        "--verify-variants", action="store_true", help="only the device-verified copy's parts"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/checksum_kernel.py needs a CUDA GPU")
    env = environment(" ".join(["python"] + sys.argv))
    if args.host_breakdown:
        write_results(args.out, env, host_breakdown(args.sizes_mib, args.reps))
        return
    if args.verify_variants:
        write_results(args.out, env, verify_variants(args.sizes_mib, args.reps))
        return
    rows: list[dict] = []
    best: dict[str, float | str] = {}
    for mib in args.sizes_mib:
        src = torch.randint(-(2**31), 2**31 - 1, (mib << 18,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        want = wsum32_fold(checksum.wsum32x2(src))
        copy = {
            "gpu_us": _gpu_us(lambda: dst.copy_(src), args.reps),
            "wall_us": _wall_us(lambda: dst.copy_(src), args.reps),
        }
        rows.append({"kernel": "copy", "mib": mib, **copy})
        print(f"copy {mib} MiB: gpu {copy['gpu_us']:.1f} us, wall {copy['wall_us']:.1f} us")
        for block in args.blocks:
            for pps in args.programs_per_sm:
                checksum.W32_BLOCK, checksum._W32_PROGRAMS_PER_SM = block, pps

                def call() -> tuple[int, int]:
                    return wsum32_fold(checksum.copy_with_wsum32x2(src, dst))

                if call() != want:  # the knobs must not change the result
                    raise AssertionError(f"block {block}, {pps}/SM: wrong checksum")
                gpu = _gpu_us(lambda: checksum.copy_with_wsum32x2(src, dst), args.reps)
                wall = _wall_us(call, args.reps)
                row = dict(kernel="copy_with_wsum32x2", mib=mib, block=block,
                           programs_per_sm=pps, gpu_us=gpu, wall_us=wall,
                           gpu_over_copy=copy["gpu_us"] / gpu,
                           wall_over_copy=copy["wall_us"] / wall)  # fmt: skip
                rows.append(row)
                print(f"  block {block:5d} {pps:3d}/SM: gpu {gpu:7.1f} us "
                      f"({row['gpu_over_copy']:.2f} of copy), wall {wall:7.1f} us "
                      f"({row['wall_over_copy']:.2f})", flush=True)  # fmt: skip
                if mib == max(args.sizes_mib) and wall < float(best.get("wall_us", 1e18)):
                    best = {"config": f"{block}/{pps}", "wall_us": wall}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "rows": rows, "best": best}, indent=2))
    print(f"best: {best}")


if __name__ == "__main__":
    main()
