"""Serving comparison on the same GPU(s), in one run: Baton disaggregated vs colocated (chunked /
unchunked prefill), prefix cache on vs off, under workloads (a) shared system prompt, (b) long-prefill
interference, (d) burst.

Each configuration is started in turn on the same GPU, driven, and stopped:
  disagg     1 prefill + 1 decode Ray worker sharing the GPU (0.5 GPU each), KV over cuda_ipc
  chunked    1 colocated Ray worker, chunked prefill (max_num_batched_tokens 2048)
  unchunked  1 colocated Ray worker, whole prompts in one step (the static-ish baseline)
  nocache    disagg with the prefix cache off (workload a at one rate: TTFT hit vs miss, same load)
With ``--gpus N`` (N > 1, one host) every configuration gets the same N whole GPUs: disagg runs N/2
prefill and N - N/2 decode workers with KV over NCCL; colocated ones run N workers, one per GPU, the
router spreading requests over them (no KV handed between them).
The front end is the real router (``RouterCore`` + the OpenAI FastAPI app: auth, tenancy, admission
with 429s, routing) served by uvicorn on a thread of this process, over the Ray pools through
``ClusterEngineClient``. Ray Serve itself is left out so the run does not depend on Serve's proxy
and replica placement on a one-GPU box; the load generator (``bench/serve_load.py``) talks real
HTTP/SSE to it, with the same arrivals for every configuration.

Model: Llama-3.2-1B shapes, dummy (random) bf16 weights, a synthetic word-level tokenizer over the
full vocabulary (no download). Output lengths of workload (a) are scaled by 0.4 (B ~600 tokens) so
the run fits its budget; prompts are full size. Every phase has a hard stop and the whole run a time
budget (``--budget-s``): what does not fit is recorded as skipped. Each configuration runs in
try/except and its error lands in the JSON. ``--quick``: a CPU smoke run with the tiny test model.

    python bench/compare_serving.py [--quick] [--out DIR] [--budget-s 470] [--configs disagg,...]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from baton.bench.common import RESULTS, SHAPES, write_result
from baton.bench.serve_load import (
    SLO,
    RunResult,
    percentile,
    plot_cdfs,
    plot_goodput,
    run_load,
    summarize,
    window_itl,
)
from baton.bench.serving_setup import (
    CONFIGS,
    KEYS,
    MODEL_NAME,
    InProcessRouter,
    Plan,
    full_plan,
    get_json,
    keys_file,
    log,
    model_dir,
    pool_config,
    quick_plan,
    serve_config,
    wait_healthy,
)
from baton.bench.workloads import (
    burst,
    burst_size,
    long_prefill_interference,
    shared_system_prompt,
)


# -- phases ----------------------------------------------------------------------------------------
class Budget:
    def __init__(self, t0: float, budget_s: float) -> None:
        self.t0, self.budget_s = t0, budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s


def _keys(auth: bool) -> tuple[str | None, str | None]:
    return (KEYS["product-a"], KEYS["product-b"]) if auth else (None, None)


def warm_up(url: str, plan: Plan, vocab: int, auth: bool) -> float:
    """Compile every path once (short, long, concurrent decode); returns the mean decode gap (s)."""
    key = _keys(auth)[0]
    long_wl = long_prefill_interference(
        1.0,
        vocab_size=vocab,
        num_streams=8,
        stream_prompt=300,
        stream_tokens=32,
        long_start_s=0.0,
        long_every_s=10.0,
        long_output=2,
        api_key=key,
        scale=plan.scale,
        seed=99,
    )
    run = asyncio.run(
        run_load(url, long_wl.specs, model=MODEL_NAME, progress=False, stop_after_s=120)
    )
    bad = [r.error for r in run.results if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[:3]}")
    streams = asyncio.run(
        run_load(
            url,
            long_prefill_interference(
                1.0,
                vocab_size=vocab,
                num_streams=plan.b_streams,
                stream_prompt=128,
                stream_tokens=48,
                long_start_s=5.0,
                api_key=key,
                scale=plan.scale,
                seed=98,
            ).specs,
            model=MODEL_NAME,
            progress=False,
            stop_after_s=60,
        )
    )
    gaps = [g for r in streams.results for g in r.itl_s]
    return max(1e-4, sum(gaps) / max(1, len(gaps)))


def phase_a(
    url: str,
    plan: Plan,
    vocab: int,
    auth: bool,
    rates: tuple[float, ...],
    slo: SLO,
    budget: Budget,
    runs: dict[str, RunResult],
    label: str,
    t0: float,
) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        need = plan.window_s + plan.drain_s
        if not budget.fits(need):
            rows.append({"rate": rate, "skipped": f"time budget ({budget.left():.0f}s left)"})
            continue
        wl = shared_system_prompt(
            rate,
            plan.window_s,
            vocab_size=vocab,
            api_keys=_keys(auth),
            scale=plan.scale,
            seed=int(rate * 100),
        )
        run = asyncio.run(
            run_load(url, wl.specs, model=MODEL_NAME, stop_after_s=need, progress=False)
        )
        runs[f"{label} a@{rate:g}"] = run
        s = summarize(run, slo)
        sys_blocks = wl.meta["system_prompt_tokens"] // 16 * 16
        hit = [
            r.ttft_s for r in run.results if r.ok and sys_blocks and r.cached_tokens >= sys_blocks
        ]
        miss = [r.ttft_s for r in run.results if r.ok and r.cached_tokens < max(1, sys_blocks)]
        s["ttft_prefix_hit_p50_s"] = percentile(hit, 0.5)
        s["ttft_prefix_miss_p50_s"] = percentile(miss, 0.5)
        s["prefix_hits"], s["prefix_misses"] = len(hit), len(miss)
        s["by_product"] = {p: summarize(run, slo, tags=(p,)) for p in ("A", "B")}
        rows.append({"rate": rate, "summary": s, "workload": wl.meta})
        log(
            t0,
            f"  {label} a@{rate:g}: {s['completed']}/{s['requests']} ok, goodput "
            f"{s['goodput_rps']:.2f}/s, TTFT p99 {s['ttft_s'].get('p99', math.nan) * 1e3:.0f} ms,"
            f" ITL p99 {s['itl_s'].get('p99', math.nan) * 1e3:.1f} ms, 429 {s['rejected_429']}",
        )
    return rows


def phase_b(
    url: str,
    plan: Plan,
    vocab: int,
    auth: bool,
    itl_est: float,
    slo: SLO,
    budget: Budget,
    runs: dict[str, RunResult],
    label: str,
    t0: float,
) -> dict[str, Any]:
    need = plan.b_duration_s + 4
    if not budget.fits(need):
        return {"skipped": f"time budget ({budget.left():.0f}s left)"}
    prompt = plan.scale.p(128)
    # The warm-up's ITL estimate can be several times the steady one (first CUDA-graph captures): the H100
    # run's disaggregated streams finished before the long prompts began at 1.5x. Ask for 4x; the run's hard
    # stop cancels what is left (counted as cancelled by the client, not as aborts).
    tokens = min(plan.max_model_len - prompt - 1, math.ceil(4.0 * plan.b_duration_s / itl_est))
    wl = long_prefill_interference(
        plan.b_duration_s,
        vocab_size=vocab,
        num_streams=plan.b_streams,
        stream_tokens=tokens,
        long_every_s=plan.b_long_every_s,
        api_key=_keys(auth)[0],
        scale=plan.scale,
        seed=7,
    )
    run = asyncio.run(run_load(url, wl.specs, model=MODEL_NAME, stop_after_s=need, progress=False))
    runs[f"{label} b"] = run
    start = wl.meta["long_start_s"]
    alone = window_itl(run.results, 1.0, start)
    mixed = window_itl(run.results, start, plan.b_duration_s)
    longs = [r for r in run.results if r.tag == "long"]
    out = {
        "workload": wl.meta,
        "stream_itl_alone_s": {
            "n": len(alone),
            "p50": percentile(alone, 0.5),
            "p99": percentile(alone, 0.99),
            "max": max(alone, default=math.nan),
        },
        "stream_itl_with_long_s": {
            "n": len(mixed),
            "p50": percentile(mixed, 0.5),
            "p99": percentile(mixed, 0.99),
            "max": max(mixed, default=math.nan),
        },
        "long_prompts_completed": sum(1 for r in longs if r.ok),
        "long_prompts": len(longs),
        "long_ttft_p50_s": percentile([r.ttft_s for r in longs if r.ttft_s is not None], 0.5),
        "summary": summarize(run, slo),
    }
    out["itl_p99_ratio"] = out["stream_itl_with_long_s"]["p99"] / out["stream_itl_alone_s"]["p99"]
    log(
        t0,
        f"  {label} b: stream ITL p99 alone {out['stream_itl_alone_s']['p99'] * 1e3:.1f} ms, "
        f"with 8k prompts {out['stream_itl_with_long_s']['p99'] * 1e3:.1f} ms "
        f"(x{out['itl_p99_ratio']:.2f}); long done {out['long_prompts_completed']}/{len(longs)}",
    )
    return out


def phase_d(
    url: str, plan: Plan, vocab: int, auth: bool, slo: SLO, budget: Budget, label: str, t0: float
) -> dict[str, Any]:
    need = 45.0
    if not budget.fits(need):
        return {"skipped": f"time budget ({budget.left():.0f}s left)"}
    status, stats = asyncio.run(get_json(url + "/admin/stats", KEYS["admin"] if auth else None))
    if status != 200:
        return {"error": f"/admin/stats answered {status}: {str(stats)[:200]}"}
    p, o = plan.scale.p(plan.burst_prompt), plan.scale.o(plan.burst_output)
    capacity, n = burst_size(int(stats["budget_blocks"]), 16, p, o, cap=plan.burst_cap)
    wl = burst(
        n,
        vocab_size=vocab,
        prompt_tokens=plan.burst_prompt,
        max_tokens=plan.burst_output,
        api_keys=tuple(k for k in _keys(auth)),
        scale=plan.scale,
        seed=11,
    )
    run = asyncio.run(run_load(url, wl.specs, model=MODEL_NAME, stop_after_s=need, progress=False))
    s = summarize(run, slo)
    status, after = asyncio.run(get_json(url + "/admin/stats", KEYS["admin"] if auth else None))
    out = {
        "budget_blocks": stats["budget_blocks"],
        "capacity_requests": capacity,
        "burst": n,
        "completed": s["completed"],
        "rejected_429": s["rejected_429"],
        "rejection_rate": s["rejected_429"] / n,
        "aborted_or_error": s["aborted_or_error"],
        "transport_errors": s["transport_errors"],
        "http_errors": s["http_errors"],
        "cancelled_by_client": s["cancelled_by_client"],
        "retry_after_s": s["retry_after_s"],
        "router_rejections": after.get("rejections") if status == 200 else None,
        "summary": s,
    }
    log(
        t0,
        f"  {label} d: burst {n} (capacity {capacity}): {s['completed']} done, "
        f"{s['rejected_429']} x 429, {s['aborted_or_error']} aborted/error",
    )
    return out


def run_config(
    name: str,
    plan: Plan,
    path: Path,
    load_format: str,
    vocab: int,
    keys: Path | None,
    slo: SLO,
    budget: Budget,
    runs: dict[str, RunResult],
    t0: float,
) -> dict[str, Any]:
    from baton.cluster.pools import start_pools

    kind, chunked, cache = CONFIGS[name]
    out: dict[str, Any] = {"kind": kind, "chunked_prefill": chunked, "prefix_cache": cache}
    cfg = serve_config(plan, path, load_format, keys, cache)
    pools = router = None
    try:
        ts = time.monotonic()
        pcfg = pool_config(plan, cfg, name)
        pools = start_pools(pcfg)
        out["transport"] = pools.transport
        out["workers"] = {
            "prefill": pcfg.num_prefill,
            "decode": pcfg.num_decode,
            "colocated": pcfg.num_colocated,
            "gpus_per_worker": pcfg.num_gpus_per_worker,
        }
        router = InProcessRouter(cfg, pools)
        router.start()
        wait_healthy(router.url, 120)
        itl_est = warm_up(router.url, plan, vocab, keys is not None)
        out["startup_s"] = time.monotonic() - ts
        out["calibrated_itl_s"] = itl_est
        log(
            t0,
            f"{name}: up in {out['startup_s']:.0f}s (transport {pools.transport}), "
            f"decode gap ~{itl_est * 1e3:.1f} ms",
        )
        auth = keys is not None
        if name == "nocache":
            out["a"] = phase_a(
                router.url, plan, vocab, auth, (plan.nocache_rate,), slo, budget, runs, name, t0
            )
        else:
            out["b"] = phase_b(router.url, plan, vocab, auth, itl_est, slo, budget, runs, name, t0)
            out["a"] = phase_a(
                router.url, plan, vocab, auth, plan.rates, slo, budget, runs, name, t0
            )
            if name == "disagg":
                out["d"] = phase_d(router.url, plan, vocab, auth, slo, budget, name, t0)
        status, st = asyncio.run(
            get_json(router.url + "/admin/stats", KEYS["admin"] if auth else None)
        )
        out["integrity_error"] = st.get("integrity_error") if status == 200 else f"HTTP {status}"
    except Exception as exc:  # noqa: BLE001 - one configuration failing must not lose the others
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["traceback"] = traceback.format_exc()[-3000:]
        log(t0, f"{name}: FAILED {out['error'][:300]}")
    finally:
        if router is not None:
            router.stop()
        if pools is not None:
            try:
                pools.stop()
            except Exception as exc:  # noqa: BLE001
                out["stop_error"] = repr(exc)
    return out


# -- comparison ------------------------------------------------------------------------------------
def _div(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if b else None
    except (TypeError, ValueError):
        return None


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Side-by-side ratios against the issue's goals."""

    def goodput(name: str) -> dict[float, float]:
        return {
            r["rate"]: r["summary"]["goodput_rps"]
            for r in results.get(name, {}).get("a", [])
            if "summary" in r
        }

    g = {n: goodput(n) for n in ("disagg", "chunked", "unchunked")}
    out: dict[str, Any] = {"goodput_a_rps": g}
    for base in ("chunked", "unchunked"):
        per_rate = {rate: _div(g["disagg"].get(rate), g[base].get(rate)) for rate in g["disagg"]}
        best = _div(max(g["disagg"].values(), default=None), max(g[base].values(), default=None))
        out[f"goodput_disagg_over_{base}"] = {
            "per_rate": per_rate,
            "best": best,
            "goal": 1.5 if base == "chunked" else 3.0,
        }
    out["itl_p99_ratio_b"] = {
        n: results.get(n, {}).get("b", {}).get("itl_p99_ratio")
        for n in ("disagg", "chunked", "unchunked")
    }
    out["itl_p99_ratio_b_goal"] = 1.15
    on = {r["rate"]: r["summary"] for r in results.get("disagg", {}).get("a", []) if "summary" in r}
    off = {
        r["rate"]: r["summary"] for r in results.get("nocache", {}).get("a", []) if "summary" in r
    }
    common = sorted(set(on) & set(off))
    if common:
        rate = common[-1]
        out["prefix_ttft"] = {
            "rate": rate,
            "goal": 3.0,
            "ttft_p50_cache_on_s": on[rate]["ttft_s"].get("p50"),
            "ttft_p50_cache_off_s": off[rate]["ttft_s"].get("p50"),
            "ratio_p50_off_over_on": _div(
                off[rate]["ttft_s"].get("p50"), on[rate]["ttft_s"].get("p50")
            ),
            "ratio_p99_off_over_on": _div(
                off[rate]["ttft_s"].get("p99"), on[rate]["ttft_s"].get("p99")
            ),
            "in_run_hit_p50_s": on[rate]["ttft_prefix_hit_p50_s"],
            "in_run_miss_p50_s": on[rate]["ttft_prefix_miss_p50_s"],
        }
    d = results.get("disagg", {}).get("d", {})
    if "burst" in d:
        out["burst"] = {
            k: d[k]
            for k in (
                "burst",
                "capacity_requests",
                "completed",
                "rejected_429",
                "rejection_rate",
                "aborted_or_error",
                "transport_errors",
            )
        }
    return out


def plots(runs: dict[str, RunResult], results: dict[str, Any], out: Path) -> list[str]:
    made = [
        plot_goodput(
            {
                n: [(r["rate"], r["summary"]) for r in results[n].get("a", []) if "summary" in r]
                for n in results
                if results[n].get("a")
            },
            out / "compare_serving_goodput.png",
            "workload (a): goodput at SLO vs rate",
        ),
        plot_cdfs(
            {k: v for k, v in runs.items() if k.endswith(" b")},
            out / "compare_serving_b_cdf.png",
            "workload (b): streams + 8k-token prompts",
        ),
        plot_cdfs(
            {k: v for k, v in runs.items() if " a@" in k},
            out / "compare_serving_a_cdf.png",
            "workload (a): latency CDFs",
        ),
    ]
    return [str(p) for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="CPU smoke run with the tiny test model")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="disagg,chunked,unchunked,nocache")
    ap.add_argument("--rates", default=None, help="workload (a) rates, e.g. 4,10")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting phases after this (default 470 GPU, 420 quick)",
    )
    ap.add_argument("--gpus", type=int, default=1, help="GPUs every configuration gets (1 host)")
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-itl", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    rates = tuple(float(x) for x in args.rates.split(",")) if args.rates else None
    plan = quick_plan(rates) if args.quick else full_plan(rates)
    if args.gpus < 1:
        raise SystemExit("--gpus must be >= 1")
    plan = dataclasses.replace(plan, num_gpus=args.gpus)
    budget = Budget(t0, args.budget_s or (420.0 if args.quick else 470.0))
    slo = SLO(args.slo_ttft, args.slo_itl)
    out_dir = args.out or RESULTS
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    import ray

    root = Path(tempfile.mkdtemp(prefix="baton-compare-"))
    path, load_format, vocab = model_dir(plan, root, args.shape)
    keys = keys_file(root)
    log(
        t0,
        f"model {path} ({'tiny' if args.quick else args.shape}, {load_format}), vocab {vocab}, "
        f"keys {'on' if keys else 'OFF (no yaml): dev mode'}",
    )
    env = {"TRITON_INTERPRET": "1"} if plan.device == "cpu" else {}
    init: dict[str, Any] = {"num_cpus": 4} if plan.device == "cpu" else {}
    ray.init(
        include_dashboard=False,
        namespace="baton-bench",
        log_to_driver=False,
        runtime_env={"env_vars": env},
        **init,
    )
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, RunResult] = {}
    try:
        for name in names:
            if not budget.fits(90):
                results[name] = {"skipped": f"time budget ({budget.left():.0f}s left)"}
                log(t0, f"{name}: skipped (time budget)")
                continue
            log(t0, f"{name}: starting")
            results[name] = run_config(
                name, plan, path, load_format, vocab, keys, slo, budget, runs, t0
            )
    finally:
        ray.shutdown()
    cmp = compare(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "compare_serving_quick" if args.quick else "compare_serving"
    if args.gpus > 1:
        stem += f"_{args.gpus}gpu"
    made = []
    try:
        made = plots(runs, results, out_dir)
    except Exception as exc:  # noqa: BLE001 - numbers matter more than pictures
        cmp["plot_error"] = repr(exc)
    write_result(
        stem,
        {
            "plan": dataclasses.asdict(plan),
            "shape": "tiny" if args.quick else args.shape,
            "slo": dataclasses.asdict(slo),
            "front_end": "in-process router (uvicorn) + Ray pools",
            "comparison": cmp,
            "configs": results,
            "plots": made,
            "wall_s": time.monotonic() - t0,
        },
        out_dir,
    )
    print(json.dumps(cmp, indent=1, default=str), flush=True)
    log(t0, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
