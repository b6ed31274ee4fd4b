"""Async load generator for an OpenAI-compatible server (``baton bench serve``).

Sends ``RequestSpec``s (``bench/workloads.py``) at their arrival offsets as streaming
``/v1/completions`` requests over raw HTTP (aiohttp; it is on every machine Ray Serve runs on), with
token-id prompts so lengths are exact. Per request it records TTFT, the inter-token gaps (a chunk of
k tokens after a gap g counts as g then k-1 zeros: what the client sees), E2E, tokens streamed and
the server's usage, finish reason, HTTP status (429s with their ``Retry-After``) and transport
errors.

Summary: P50/P90/P99 of TTFT, ITL, E2E and TPOT, throughput, and **goodput**: requests per second
that completed with TTFT <= ``slo.ttft_s`` and their own P99 inter-token gap <= ``slo.itl_s``.
Results go to JSON, with latency CDFs and goodput-vs-rate plots (matplotlib, when installed).

    baton bench serve --url http://127.0.0.1:8000 --workload a --rates 2,4,8 --duration 30 \
        --api-key sk-a,sk-b --out bench/results/serve_load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baton.bench.workloads import (
    LengthScale,
    RequestSpec,
    Workload,
    burst,
    long_prefill_interference,
    shared_system_prompt,
    sharegpt_like,
)

OK_FINISH = ("stop", "length")


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 1.0
    itl_s: float = 0.05
    itl_quantile: float = 0.99  # a request's own gaps at this quantile must be <= itl_s


@dataclass
class RequestResult:
    tag: str
    arrival_s: float  # planned offset
    sent_s: float = 0.0  # actual send time, from the run start
    status: int = 0  # HTTP status; 0: no response
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    token_t_s: list[float] = field(
        default_factory=list
    )  # arrival of each gap's chunk, from run start
    output_tokens: int = 0  # tokens streamed (token_ids in chunks)
    chunks: int = 0
    prompt_tokens: int = 0  # from usage
    usage_completion_tokens: int | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    retry_after_s: float | None = None
    cancelled: bool = False  # stopped by the client at the run's hard stop (not a server abort)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish_reason in OK_FINISH and self.error is None

    def meets(self, slo: SLO) -> bool:
        if not self.ok or self.ttft_s is None or self.ttft_s > slo.ttft_s:
            return False
        return not self.itl_s or percentile(self.itl_s, slo.itl_quantile) <= slo.itl_s


@dataclass
class RunResult:
    results: list[RequestResult]
    elapsed_s: float  # first send to last response end
    meta: dict[str, Any] = field(default_factory=dict)


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 0.5),
        "p90": percentile(xs, 0.9),
        "p99": percentile(xs, 0.99),
        "max": max(xs),
    }


def summarize(
    run: RunResult | list[RequestResult],
    slo: SLO,
    elapsed_s: float | None = None,
    tags: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Counts, latency percentiles (s), throughput and goodput of one run (optionally some tags)."""
    results = run.results if isinstance(run, RunResult) else run
    elapsed = (
        elapsed_s
        if elapsed_s is not None
        else (run.elapsed_s if isinstance(run, RunResult) else 0.0)
    )
    if tags is not None:
        results = [r for r in results if r.tag in tags]
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.meets(slo)]
    statuses = Counter(r.status for r in results)
    finish = Counter(r.finish_reason for r in results if r.status == 200 and not r.cancelled)
    tpot = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.e2e_s is not None and r.output_tokens > 1
    ]
    out_tokens = sum(r.output_tokens for r in ok)
    elapsed = max(elapsed, 1e-9)
    return {
        "requests": len(results),
        "completed": len(ok),
        "rejected_429": statuses.get(429, 0),
        "http_errors": {str(k): v for k, v in statuses.items() if k not in (200, 429, 0)},
        "transport_errors": sum(1 for r in results if r.status == 0 and not r.cancelled),
        "aborted_or_error": sum(
            1
            for r in results
            if r.status == 200 and not r.cancelled and r.finish_reason not in OK_FINISH
        ),
        "cancelled_by_client": sum(1 for r in results if r.cancelled),
        "error_messages": dict(
            Counter(r.error for r in results if r.error and not r.cancelled).most_common(5)
        ),
        "finish_reasons": {str(k): v for k, v in finish.items()},
        "token_count_mismatches": sum(
            1
            for r in ok
            if r.usage_completion_tokens is not None
            and r.usage_completion_tokens != r.output_tokens
        ),
        "elapsed_s": elapsed,
        "throughput_rps": len(ok) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "goodput_rps": len(good) / elapsed,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "slo": asdict(slo),
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": _stats([g for r in ok for g in r.itl_s]),
        # the gap after the first token: in disaggregated serving the KV handover (transfer + the
        # decode worker placing the sequence + its first step) lands here, since the first token
        # is streamed from the prefill worker
        "first_itl_s": _stats([r.itl_s[0] for r in ok if r.itl_s]),
        "tpot_s": _stats(tpot),
        "e2e_s": _stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
        "cached_tokens_mean": sum(r.cached_tokens for r in ok) / len(ok) if ok else 0.0,
        "retry_after_s": _stats([r.retry_after_s for r in results if r.retry_after_s is not None]),
    }


# -- sending ---------------------------------------------------------------------------------------
class _Progress:
    """tqdm when installed, else one line every 10 %."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.n, self._bar, self._next = total, desc, 0, None, 0.1
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total,
                    desc=desc,
                    unit="req",
                    leave=False,
                    mininterval=1.0,
                    file=sys.stderr,
                )
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and self.n >= self._next * self.total:
            print(f"  {self.desc}: {self.n}/{self.total} done", file=sys.stderr, flush=True)
            self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _send(
    session: Any,
    url: str,
    model: str,
    spec: RequestSpec,
    t0: float,
    timeout_s: float,
    extra: dict[str, Any],
) -> RequestResult:
    import aiohttp

    res = RequestResult(spec.tag, spec.arrival_s)
    body = {
        "model": model,
        "prompt": list(spec.prompt_ids),
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        **extra,
    }
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    start = time.perf_counter()
    res.sent_s = start - t0
    last = start
    try:
        async with session.post(
            url + "/v1/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = await resp.text()
                res.error = text[:300]
                ra = resp.headers.get("Retry-After")
                if ra is not None:
                    try:
                        res.retry_after_s = float(ra)
                    except ValueError:
                        pass
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.usage_completion_tokens = usage.get("completion_tokens")
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens", 0
                    ) or 0
                for choice in chunk.get("choices") or ():
                    ids = choice.get("token_ids")
                    k = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                    if k:
                        res.chunks += 1
                        if res.ttft_s is None:
                            res.ttft_s = now - start
                            k_gaps = k - 1
                        else:
                            res.itl_s.append(now - last)
                            res.token_t_s.append(now - t0)
                            k_gaps = k - 1
                        res.itl_s.extend([0.0] * k_gaps)
                        res.token_t_s.extend([now - t0] * k_gaps)
                        res.output_tokens += k
                        last = now
                    if choice.get("finish_reason") is not None:
                        res.finish_reason = choice["finish_reason"]
                        if choice.get("error"):
                            res.error = str(choice["error"].get("message", ""))[:300]
            res.e2e_s = time.perf_counter() - start
            if res.finish_reason is None:
                res.error = "stream ended without a finish_reason"
    except asyncio.CancelledError:
        res.cancelled = True
        res.error = "cancelled by the client at the run's stop time"
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


async def run_load(
    url: str,
    specs: tuple[RequestSpec, ...] | list[RequestSpec],
    *,
    model: str,
    timeout_s: float = 600.0,
    stop_after_s: float | None = None,
    progress: bool = True,
    desc: str = "load",
    extra_body: dict[str, Any] | None = None,
) -> RunResult:
    """Send every spec at its arrival offset; wait for all (or cancel the rest at stop_after_s)."""
    import aiohttp

    url = url.rstrip("/")
    order = sorted(specs, key=lambda s: s.arrival_s)
    bar = _Progress(len(order), desc, progress)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    tasks: list[asyncio.Task[RequestResult]] = []
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestResult:
            try:
                return await _send(session, url, model, spec, t0, timeout_s, extra_body or {})
            finally:
                bar.update()

        async def launch() -> None:
            for spec in order:
                delay = t0 + spec.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(spec)))

        launcher = asyncio.create_task(launch())
        try:
            if stop_after_s is None:
                await launcher
                await asyncio.gather(*tasks)
            else:
                await asyncio.wait([launcher], timeout=stop_after_s)
                launcher.cancel()  # arrivals after the stop are never sent
                left = stop_after_s - (time.perf_counter() - t0)
                if tasks:
                    _, pending = await asyncio.wait(tasks, timeout=max(0.0, left))
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            launcher.cancel()
            bar.close()
    results = []
    for i, spec in enumerate(order):  # tasks were created in this order
        t = tasks[i] if i < len(tasks) else None
        if t is not None and t.done() and not t.cancelled():
            results.append(t.result())
        else:
            results.append(
                RequestResult(
                    spec.tag, spec.arrival_s, cancelled=True, error="never sent (run stopped)"
                )
            )
    ends = [r.sent_s + (r.e2e_s or 0.0) for r in results if r.status == 200]
    firsts = [r.sent_s for r in results if r.status or r.error]
    elapsed = (max(ends) - min(firsts)) if ends and firsts else time.perf_counter() - t0
    return RunResult(results, elapsed)


def window_itl(
    results: list[RequestResult], start_s: float, end_s: float, tags: tuple[str, ...] = ("stream",)
) -> list[float]:
    """Inter-token gaps of ``tags`` requests whose chunk arrived in [start_s, end_s) of the run."""
    return [
        g
        for r in results
        if r.tag in tags
        for g, t in zip(r.itl_s, r.token_t_s)
        if start_s <= t < end_s
    ]


def result_records(run: RunResult) -> list[dict[str, Any]]:
    """Per-request rows for the JSON (ITL lists summarized, not dumped)."""
    rows = []
    for r in run.results:
        d = {k: v for k, v in asdict(r).items() if k not in ("itl_s", "token_t_s")}
        if r.itl_s:
            d["itl_p50_s"], d["itl_p99_s"] = percentile(r.itl_s, 0.5), percentile(r.itl_s, 0.99)
            d["itl_max_s"] = max(r.itl_s)
        rows.append(d)
    return rows


# -- plots -----------------------------------------------------------------------------------------
def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_cdfs(series: dict[str, RunResult], path: Path, title: str = "") -> Path | None:
    """TTFT, ITL and E2E CDFs, one line per labelled run."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run in series.items():
        ok = [r for r in run.results if r.ok]
        for ax, xs in zip(
            axes,
            (
                [r.ttft_s for r in ok if r.ttft_s is not None],
                [g for r in ok for g in r.itl_s],
                [r.e2e_s for r in ok if r.e2e_s is not None],
            ),
        ):
            if xs:
                s = sorted(x * 1e3 for x in xs)
                ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    for ax, name in zip(axes, ("TTFT (ms)", "inter-token latency (ms)", "E2E latency (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput(
    curves: dict[str, list[tuple[float, dict[str, Any]]]], path: Path, title: str = ""
) -> Path | None:
    """Goodput and throughput (requests/s) against offered rate, one line per configuration."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda p: p[0])
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["goodput_rps"] for p in pts], marker="o", label=f"{label} goodput")
        ax.plot(
            xs,
            [p[1]["throughput_rps"] for p in pts],
            ls="--",
            alpha=0.5,
            label=f"{label} throughput",
        )
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- CLI -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--workload",
        default="a",
        choices=["a", "b", "c", "d"],
        help="a shared system prompt | b long-prefill interference | c ShareGPT-like | d burst",
    )
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None, help="requests/s (Poisson)")
    rate.add_argument("--rates", default=None, help="comma-separated sweep, e.g. 1,2,4")
    p.add_argument("--duration", type=float, default=30.0, help="arrival window per rate (s)")
    p.add_argument(
        "--api-key",
        default=None,
        help="API key; 'K1,K2' gives workload a's products A and B their own tenants",
    )
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument(
        "--out", type=Path, default=None, help="directory (default bench/results/serve_load)"
    )
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    p.add_argument("--slo-itl", type=float, default=0.05, help="seconds")
    p.add_argument(
        "--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this"
    )
    p.add_argument("--scale", type=float, default=1.0, help="prompt and output length factor")
    p.add_argument(
        "--output-scale", type=float, default=None, help="output length factor (default --scale)"
    )
    p.add_argument("--arrival", default="poisson", choices=["poisson", "uniform", "burst"])
    p.add_argument("--burst-size", type=int, default=100, help="workload d: requests sent at once")
    p.add_argument("--streams", type=int, default=16, help="workload b: decode streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default="serve_load", help="result file stem")


async def _first_model(url: str, key: str | None) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            url.rstrip("/") + "/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=30)
        ) as r,
    ):
        if r.status != 200:
            raise ValueError(f"GET /v1/models answered {r.status}: {(await r.text())[:200]}")
        return (await r.json())["data"][0]["id"]


def build_workload(
    args: argparse.Namespace, rate: float | None, keys: tuple[str | None, ...]
) -> Workload:
    scale = LengthScale(args.scale, args.output_scale or args.scale)
    common = {"vocab_size": args.vocab_size, "scale": scale, "seed": args.seed}
    if args.workload == "a":
        return shared_system_prompt(
            rate or 1.0, args.duration, api_keys=(keys[0], keys[-1]), arrival=args.arrival, **common
        )
    if args.workload == "b":
        return long_prefill_interference(
            args.duration, num_streams=args.streams, api_key=keys[0], **common
        )
    if args.workload == "c":
        return sharegpt_like(
            rate or 1.0, args.duration, api_key=keys[0], arrival=args.arrival, **common
        )
    return burst(args.burst_size, api_keys=keys, **common)


def run_cli(args: argparse.Namespace) -> int:
    from baton.bench.common import RESULTS, write_result

    keys: tuple[str | None, ...] = tuple(args.api_key.split(",")) if args.api_key else (None,)
    slo = SLO(args.slo_ttft, args.slo_itl)
    if args.rates:
        rates: list[float | None] = [float(x) for x in args.rates.split(",") if x.strip()]
    else:
        rates = [args.rate]
    if args.workload in ("b", "d"):
        rates = [None]
    model = args.model or asyncio.run(_first_model(args.url, keys[0]))
    out = args.out or RESULTS / "serve_load"
    runs: dict[str, RunResult] = {}
    rows = []
    for rate in rates:
        wl = build_workload(args, rate, keys)
        label = f"{rate:g} req/s" if rate is not None else wl.name
        print(f"{wl.name}: {len(wl.specs)} requests ({label})", flush=True)
        run = asyncio.run(
            run_load(
                args.url,
                wl.specs,
                model=model,
                timeout_s=args.timeout,
                progress=not args.no_progress,
                desc=label,
            )
        )
        runs[label] = run
        summ = summarize(run, slo)
        if args.workload == "b":
            t = wl.meta["long_start_s"]
            alone = window_itl(run.results, 1.0, t)
            mixed = window_itl(run.results, t, wl.meta["duration_s"])
            summ["stream_itl_p99_alone_s"] = percentile(alone, 0.99)
            summ["stream_itl_p99_with_long_s"] = percentile(mixed, 0.99)
            summ["itl_p99_ratio"] = (
                summ["stream_itl_p99_with_long_s"] / summ["stream_itl_p99_alone_s"]
            )
        rows.append(
            {"rate": rate, "workload": wl.meta, "summary": summ, "requests": result_records(run)}
        )
        print(
            f"  completed {summ['completed']}/{summ['requests']}, 429 {summ['rejected_429']}, "
            f"goodput {summ['goodput_rps']:.2f} req/s, TTFT p99 "
            f"{summ['ttft_s'].get('p99', float('nan')) * 1e3:.1f} ms, ITL p99 "
            f"{summ['itl_s'].get('p99', float('nan')) * 1e3:.1f} ms",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_cdfs(runs, out / f"{args.name}_cdf.png", f"{args.name}: latency CDFs")]
    if len(rates) > 1:
        plots.append(
            plot_goodput(
                {model: [(r["rate"], r["summary"]) for r in rows]},
                out / f"{args.name}_goodput.png",
                f"goodput at SLO ({model})",
            )
        )
    write_result(
        args.name,
        {
            "url": args.url,
            "model": model,
            "workload": args.workload,
            "slo": asdict(slo),
            "runs": rows,
            "plots": [str(p) for p in plots if p is not None],
        },
        out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
