"""KV transfer benchmark (no Ray): bandwidth and latency per transport for 1-64 MiB handles, with the limits of
the same run beside them (a same-process device-to-device copy and a torch NCCL send/recv of the same bytes),
and the handover orchestration latency (prefill done -> decode engine holds the sequence).

Each transport runs between two processes (spawned; a pipe stands in for the control plane Ray provides in the
cluster): the source holds a KV-shaped buffer and serves it through the transport exactly as a prefill worker
does (cuda_ipc: inside its export arena, ``--ipc-arena-mib``, 0 = one IPC handle per export); the sink calls
``receive_verified``, as a decode worker does. The smallest handle is one block (16 tokens = 2 MiB). Times are
wall-clock per transfer (p50 over ``--iters``, the first left out: it opens the source's arena), including the
checksum on receipt. Limits: a plain device copy and, on CUDA, the copy verified on the device (what the
cuda_ipc sink runs: ``verified_copy``), the fused copy+checksum kernels with a host comparison (wsum32x2 and
wsum64, older handles), the checksum alone (what the nccl sink adds) and NCCL. For cuda_ipc each row also
splits the sink's verified receive into its CPU-side steps (``steps_us``: parse, allocate, launch, sync +
verdict; medians of separate runs after the timed ones), with the same verified copy from a local buffer
of the sink (``local_copy``) and a fixed pure-Python loop (``python_loop``) beside them: they tell the
mapping's cost from the sink process's own host speed.

    python -m bench.kv_transfer --device cuda --out bench/results/kv_transfer.json
    python -m bench.kv_transfer --device cuda --transports cuda_ipc --sizes-mib 4 16 64 256 --iters 20
    python -m bench.kv_transfer --device cuda --sink-device cuda:1 --transports nccl --sizes-mib 4 16 64
    python -m bench.kv_transfer --device cpu --transports gloo grpc --sizes-mib 1 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from baton.workers.kv_handle import (
    ALGO_WSUM32,
    KV_LAYOUT,
    KVHandle,
    default_algo,
    dtype_name,
    kv_checksum,
    verify,
    wsum32_expected,
)

# Llama-3-8B KV geometry: 32 layers, 8 KV heads, head_dim 128, bf16 -> 128 KiB per token.
L, H, D, BS = 32, 8, 128, 16


def make_buffer(mib: int, device: str) -> torch.Tensor:
    per_block = L * 2 * BS * H * D * 2
    n = max(1, (mib << 20) // per_block)
    return torch.randn(L, 2, n, BS, H, D, device=device).to(torch.bfloat16)


def handle_for(rid: str, buf: torch.Tensor) -> KVHandle:
    return KVHandle(
        "src",
        rid,
        tuple(range(buf.shape[2])),
        tuple(buf.shape),
        dtype_name(buf.dtype),
        KV_LAYOUT,
        kv_checksum(buf),
        default_algo(buf),
        time.time() + 600,
        buf.shape[2] * BS,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _source(name: str, device: str, sizes: list[int], iters: int, arena_mib: int, conn) -> None:
    from baton.cluster.transfer import make_transport

    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(
                torch.device(device).index or 0
            )  # as a worker's own GPU is current
        t = make_transport(
            name, worker_id="src", device=device, timeout_s=60, export_arena_bytes=arena_mib << 20
        )
        alloc = t.export_allocator()
        table: dict[str, tuple[KVHandle, torch.Tensor]] = {}
        endpoint = t.serve(table.get)
        conn.send(("endpoint", endpoint))
        if t.caps.needs_pair_group:
            t.open_pair("dst", "", 0, 1)
        for mib in sizes:
            buf = make_buffer(mib, device)
            slot = alloc(tuple(buf.shape), buf.dtype) if alloc is not None else None
            if slot is not None:  # where a prefill worker gathers its export (the arena)
                buf = slot[0].copy_(buf)
            h = handle_for(f"h{mib}", buf)
            table[h.request_id] = (h, buf)
            conn.send(("handle", h, t.export_payload(h, buf) if t.caps.exports_payload else b""))
            for i in range(iters):
                if t.caps.needs_pair_group:
                    t.send(h.request_id, "dst", i)
                conn.recv()  # the sink's "done": keeps the buffer alive while it is opened
            conn.recv()  # its last "done": the sink's extra runs (cuda_ipc steps) read it too
            del table[h.request_id]
            if slot is not None:
                slot[1]()
        conn.send(("bye",))
    except Exception:  # noqa: BLE001 - reported by the parent
        conn.send(("error", traceback.format_exc()))


def _sink(name: str, device: str, iters: int, conn, out, w32: str | None = None) -> None:
    from baton.cluster.transfer import make_transport

    try:
        if w32:  # "BLOCK/PROGRAMS_PER_SM": the fused kernel's knobs (bench/checksum_kernel.py)
            from baton.kernels import checksum

            block, pps = (int(x) for x in w32.split("/"))
            checksum.W32_BLOCK, checksum._W32_PROGRAMS_PER_SM = block, pps
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device).index or 0)
        t = make_transport(name, worker_id="dst", device=device, timeout_s=60)
        _, endpoint = conn.recv()
        if t.caps.needs_pair_group:
            t.open_pair("src", endpoint, 1, 1)
        rows = []
        while True:
            msg = conn.recv()
            if msg[0] != "handle":
                if msg[0] == "error":
                    out.put({"error": msg[1]})
                    return
                break
            h, payload = msg[1], msg[2]
            times = []
            for i in range(iters):
                t0 = time.perf_counter()
                t.receive_verified(
                    h, endpoint=endpoint, payload=payload, peer_id="src", transfer_id=i
                )  # raises on a checksum mismatch
                sync(device)
                times.append(time.perf_counter() - t0)
                conn.send("done")
            p50 = statistics.median(times[1:] if len(times) > 1 else times)
            row = {"bytes": h.nbytes, "p50_s": p50, "gbps": h.nbytes / p50 / 1e9}
            row["checksum_algo"] = h.checksum_algo
            if hasattr(t, "arenas_opened"):
                row["arenas_opened"] = t.arenas_opened
            if name == "cuda_ipc":
                row["steps_us"] = _ipc_steps(t, h, payload, iters)
            rows.append(row)
            conn.send("done")  # the steps are measured: the source may free the buffer
        out.put({"rows": rows})
    except Exception:  # noqa: BLE001
        out.put({"error": traceback.format_exc()})


def _ipc_steps(t, h: KVHandle, payload: bytes, iters: int) -> dict:
    """The cuda_ipc sink's verified receive, step by step (what ``receive_verified`` does for an
    arena export), medians in microseconds: where its fixed cost goes. Default checksum: parse,
    allocate, launch (the direct launch of the compiled copy+verify kernel), sync + verdict; older
    checksums: parse, allocate, launch of the fused copy, sync + host digest."""
    from baton.cluster.transfer.cuda_ipc import ArenaRef, decode_payload
    from baton.kernels.checksum import verified_copier
    from baton.workers.kv_handle import torch_dtype

    on_device = h.checksum_algo == ALGO_WSUM32
    copier = verified_copier(t.device)
    copy_fn, digest_fn = t._fused[h.checksum_algo]
    steps: dict[str, list[float]] = {k: [] for k in ("parse", "alloc", "launch", "sync_verdict")}
    for _ in range(max(iters, 3)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref = decode_payload(payload)
        if not isinstance(ref, ArenaRef):
            return {}
        arena = t._arena_view(ref)
        t1 = time.perf_counter()
        dst = torch.empty(h.shape, dtype=torch_dtype(h.dtype), device=t.device)
        t2 = time.perf_counter()
        if on_device:  # as the transport: a byte buffer, viewed while the GPU copies
            raw = dst.view(-1).view(torch.uint8)
            slot = copier.launch(arena, raw, ref.nbytes, wsum32_expected(h.checksum), ref.offset)
            t3 = time.perf_counter()
            ok = copier.wait(slot)
        else:
            sums = copy_fn(arena[ref.offset : ref.offset + ref.nbytes], dst)
            t3 = time.perf_counter()
            ok = digest_fn(sums, dst.numel(), h.shape) == h.checksum
        t4 = time.perf_counter()
        assert ok, "checksum mismatch in the step-by-step run"
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[k].append(v)
    row = {k: round(statistics.median(v) * 1e6, 1) for k, v in steps.items()}
    if on_device:  # the same verified copy from a buffer of this process: is IPC the cost?
        local = torch.empty(ref.nbytes, dtype=torch.uint8, device=t.device)
        local.copy_(arena[ref.offset : ref.offset + ref.nbytes])
        raw = torch.empty_like(local)
        want = wsum32_expected(h.checksum)
        times = []
        for _ in range(max(iters, 3)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            assert copier.copy(local, raw, ref.nbytes, want)
            times.append(time.perf_counter() - t0)
        row["local_copy"] = round(statistics.median(times) * 1e6, 1)
    row["python_loop"] = python_loop_us()
    return row


def python_loop_us() -> float:
    """A fixed pure-Python loop (median us): compares the host speed of this process with others'."""
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        sum(i * i for i in range(2000))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def bench_transport(
    name: str,
    device: str,
    sizes: list[int],
    iters: int,
    arena_mib: int = 1024,
    sink_device: str | None = None,
    w32: str | None = None,
) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    src = ctx.Process(target=_source, args=(name, device, sizes, iters, arena_mib, a))
    dst = ctx.Process(target=_sink, args=(name, sink_device or device, iters, b, out, w32))
    src.start()
    dst.start()
    try:
        res = out.get(timeout=600)
    finally:
        for p in (src, dst):
            p.join(30)
            if p.is_alive():
                p.kill()
    return res


def _time_per_size(device: str, sizes: list[int], iters: int, call) -> list[dict]:
    """p50 wall time of ``call(src, dst)`` (which must finish its work before returning) on a
    KV-shaped buffer of each size."""
    rows = []
    for mib in sizes:
        src = make_buffer(mib, device)
        dst = torch.empty_like(src)
        times = []
        for _ in range(iters):
            sync(device)
            t0 = time.perf_counter()
            call(src, dst)
            times.append(time.perf_counter() - t0)
        p50 = statistics.median(times[1:])
        nbytes = src.numel() * src.element_size()
        rows.append({"bytes": nbytes, "p50_s": p50, "gbps": nbytes / p50 / 1e9})
    return rows


def bench_copy(device: str, sizes: list[int], iters: int) -> list[dict]:
    def copy(src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)
        sync(device)

    return _time_per_size(device, sizes, iters, copy)


def bench_kernel(device: str, sizes: list[int], iters: int, kernel: str) -> list[dict]:
    """A checksum kernel alone, same process: ``copy_with_*`` (the cuda_ipc sink's pass: copy and
    checksum at once) or the checksum alone (what the nccl sink adds after its receive); the
    partials' trip to the host (the digest's sync) included, as the sink pays it."""
    from baton.kernels import checksum

    if kernel == "verified_copy":  # the cuda_ipc sink's default: compared on the device
        copier = checksum.VerifiedCopier(device)
        expected: dict[int, tuple[int, int]] = {}

        def verified(src: torch.Tensor, dst: torch.Tensor) -> None:
            if src.data_ptr() not in expected:
                expected[src.data_ptr()] = wsum32_expected(kv_checksum(src, ALGO_WSUM32))
            assert copier.copy(src, dst, src.nbytes, expected[src.data_ptr()])

        return _time_per_size(device, sizes, iters, verified)
    fn = getattr(checksum, kernel)

    def run(src: torch.Tensor, dst: torch.Tensor) -> None:
        sums = fn(src, dst) if kernel.startswith("copy_") else fn(src)
        sums.cpu()

    return _time_per_size(device, sizes, iters, run)


def _nccl_rank(rank: int, port: int, sizes: list[int], iters: int, out) -> None:
    import datetime

    import torch.distributed as dist

    try:
        dev = rank % torch.cuda.device_count()
        torch.cuda.set_device(dev)
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )
        rows = []
        for mib in sizes:
            buf = make_buffer(mib, f"cuda:{dev}")
            times = []
            for _ in range(iters):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                else:
                    dist.recv(buf, 0)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            nbytes = buf.numel() * buf.element_size()
            p50 = statistics.median(times[1:])
            rows.append({"bytes": nbytes, "p50_s": p50, "gbps": nbytes / p50 / 1e9})
        if rank == 1:
            out.put({"rows": rows, "gpus": torch.cuda.device_count()})
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - NCCL refuses two ranks on one GPU in some versions
        if rank == 1:
            out.put({"error": traceback.format_exc()})


def bench_nccl_limit(sizes: list[int], iters: int) -> dict:
    from baton.cluster.transfer.base import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    ps = [ctx.Process(target=_nccl_rank, args=(r, port, sizes, iters, out)) for r in (0, 1)]
    for p in ps:
        p.start()
    try:
        return out.get(timeout=300)
    finally:
        for p in ps:
            p.join(30)
            if p.is_alive():
                p.kill()


def bench_handover(device: str, iters: int, model: str | None) -> dict:
    """Prefill role done -> decode role placed the sequence (export, checksum, transfer-free placement, first
    decode step). Both roles in one process: this isolates orchestration from the wire, measured above."""
    from baton.workers.config import CacheConfig, EngineConfig
    from baton.workers.engine import EngineCore
    from baton.workers.roles import DecodeRole, EngineLoop, PrefillRole
    from baton.workers.sampling_params import SamplingParams

    cfg = EngineConfig(model=model, device=device, cache=CacheConfig(num_kv_blocks=512))
    ploop = EngineLoop(EngineCore(cfg, worker_id="p"))
    dloop = EngineLoop(EngineCore(cfg, worker_id="d"))
    pre, dec = PrefillRole(ploop), DecodeRole(dloop)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    to_placed, to_first = [], []
    for i in range(iters):
        prompt = [(13 * i + j) % 300 + 10 for j in range(500)]
        res = pre.prefill(f"r{i}", prompt, sp).result(120)
        t0 = time.perf_counter()
        h, buf = pre.buffer_for(f"r{i}")
        kv = buf.clone()
        assert verify(h, kv)
        s = dec.start(
            f"r{i}",
            prompt,
            sp,
            output_token_ids=[res.first_token_id],
            kv=kv,
            emit_prefix=[res.first_token_id],
        )
        assert s.placed.result(60)
        to_placed.append(time.perf_counter() - t0)
        deltas = s.poll(60)
        to_first.append(time.perf_counter() - t0)
        pre.ack(f"r{i}")
        for _ in range(100):  # max_tokens=2: the first decode delta is usually the last
            if any(d.finish_reason for d in deltas):
                break
            deltas = s.poll(60)
    ploop.stop()
    dloop.stop()
    return {
        "p50_placed_ms": statistics.median(to_placed) * 1e3,
        "p50_first_decode_delta_ms": statistics.median(to_first) * 1e3,
        "iters": iters,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--transports", nargs="+", default=None, help="'none': limits/handover only")
    ap.add_argument(
        "--sink-device", default=None, help="the decode side's device (default: --device)"
    )
    ap.add_argument("--sizes-mib", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--model", default=None, help="model for the handover run (default model)")
    ap.add_argument(
        "--ipc-arena-mib", type=int, default=1024, help="cuda_ipc export arena; 0 = off"
    )
    ap.add_argument("--w32", default=None, help="sink's fused kernel knobs BLOCK/PROGRAMS_PER_SM")
    ap.add_argument("--no-nccl-limit", action="store_true", help="skip the NCCL send/recv limit")
    ap.add_argument("--no-handover", action="store_true", help="skip the handover run")
    ap.add_argument("--out", default="bench/results/kv_transfer.json")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    names = args.transports or (["cuda_ipc", "nccl", "gloo", "grpc"] if cuda else ["gloo", "grpc"])
    names = [n for n in names if n != "none"]
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "kv_geometry": {
            "layers": L,
            "kv_heads": H,
            "head_dim": D,
            "block_size": BS,
            "dtype": "bfloat16",
        },
        "sink_device": args.sink_device or args.device,
        "w32": args.w32,
        "sizes_mib": args.sizes_mib,
        "iters": args.iters,
        "transports": {},
    }
    result["limits"] = {"copy": bench_copy(args.device, args.sizes_mib, args.iters)}
    result["python_loop_us"] = python_loop_us()  # this process's; cuda_ipc rows carry the sink's
    result["ipc_arena_mib"] = args.ipc_arena_mib
    if cuda:
        for kernel in ("verified_copy", "copy_with_wsum32x2", "copy_with_wsum64", "wsum32x2"):
            result["limits"][kernel] = bench_kernel(args.device, args.sizes_mib, args.iters, kernel)
    if cuda and not args.no_nccl_limit:
        result["limits"]["nccl_send_recv"] = bench_nccl_limit(args.sizes_mib, args.iters)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:  # written after every step, so a run cut short still leaves what it measured
        print(f"== {name}", flush=True)
        result["transports"][name] = bench_transport(
            name,
            args.device,
            args.sizes_mib,
            args.iters,
            args.ipc_arena_mib,
            args.sink_device,
            args.w32,
        )
        print(json.dumps(result["transports"][name])[:600], flush=True)
        out.write_text(json.dumps(result, indent=2))
    if not args.no_handover:
        result["handover"] = bench_handover(args.device, args.iters, args.model)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["limits"])[:1200])
    print(json.dumps(result.get("handover")))


if __name__ == "__main__":
    main()
