"""Timing and result-writing helpers shared by the kernel benchmarks (GPU only).

Timing: each candidate is called on ``copies`` independent input sets in turn, enough that the
working set is several times the L2 cache, so small shapes are measured from HBM, not from L2
(all candidates alike). The calls are captured in one CUDA graph (so host launch overhead is not
measured; the engine replays decode steps as graphs too) and the graph is replayed; the time per
call is the median over replays. Falls back to plain CUDA-event timing if capture fails.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 << 20


def copies_for(bytes_per_call: int, cap: int = 32) -> int:
    """How many independent input sets make the rotation overflow L2."""
    return max(1, min(cap, -(-L2_FLUSH_BYTES // max(bytes_per_call, 1))))


def time_calls(
    fns: list[Callable[[], object]], reps: int = 20, min_calls: int = 8
) -> tuple[float, str]:
    """Seconds per call of rotating through ``fns``; returns (seconds, method)."""
    calls = [fns[i % len(fns)] for i in range(max(min_calls, len(fns)))]
    for fn in calls[: len(fns)] * 2:  # warm-up: compile, autotune, allocator
        fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in calls[: len(fns)]:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        run, method = graph.replay, "cuda_graph"
    except Exception:  # noqa: BLE001 - capture is best effort; events still measure
        torch.cuda.synchronize()

        def run() -> None:
            for fn in calls:
                fn()

        method = "cuda_events"
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(samples), method


def environment(command: str) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "total_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "command": command,
    }


def write_results(path: Path, env: dict, rows: list[dict], extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path} ({len(rows)} rows)")


def plot(path: Path, rows: list[dict], y: str, ylabel: str, title: str) -> None:
    """Grouped bars: one group per (batch, context), one bar per kernel. Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable; no plot")
        return
    shapes = sorted({(r["batch"], r["context"]) for r in rows if r.get(y) is not None})
    kernels = sorted({r["kernel"] for r in rows if r.get(y) is not None})
    fig, ax = plt.subplots(figsize=(max(8, len(shapes) * 0.9), 4.5))
    width = 0.8 / max(len(kernels), 1)
    for k, name in enumerate(kernels):
        vals = {(r["batch"], r["context"]): r[y] for r in rows if r["kernel"] == name}
        xs = [i + k * width for i, s in enumerate(shapes) if vals.get(s) is not None]
        ys = [vals[s] for s in shapes if vals.get(s) is not None]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels([f"{b}x{c // 1024}k" if c >= 1024 else f"{b}x{c}" for b, c in shapes])
    ax.set_xlabel("batch x context")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
