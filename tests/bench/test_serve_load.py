"""The load generator against a real Ray Serve router (tiny model, CPU), and its arithmetic on a
fixed series."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))

from baton.bench.serve_load import (
    SLO,
    RequestResult,
    main,
    percentile,
    run_load,
    summarize,
    window_itl,
)
from baton.bench.workloads import (
    LengthScale,
    burst,
    long_prefill_interference,
    shared_system_prompt,
)

pytestmark = pytest.mark.timeout(300)
VOCAB = 384  # the tiny tokenizer's


def _r(
    ttft: float, itl: list[float], status: int = 200, finish: str | None = "length", tag: str = "A"
) -> RequestResult:
    e2e = ttft + sum(itl)
    return RequestResult(
        tag,
        0.0,
        status=status,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=itl,
        output_tokens=len(itl) + 1,
        usage_completion_tokens=len(itl) + 1,
        finish_reason=finish if status == 200 else None,
    )


def test_goodput_on_a_fixed_series() -> None:
    slo = SLO(ttft_s=1.0, itl_s=0.05)
    series = [
        _r(0.2, [0.01] * 20),  # good
        _r(0.9, [0.04] * 10),  # good (both at the limit side)
        _r(1.5, [0.01] * 10),  # TTFT too slow
        _r(0.1, [0.01] * 5 + [0.2]),  # one stall: its own p99 gap > 50 ms
        _r(0.1, [0.01] * 200 + [0.2]),  # one stall in 201 gaps: p99 still 10 ms -> good
        _r(0.0, [], status=429),
        _r(0.1, [0.01], finish="abort"),  # not completed
    ]
    s = summarize(series, slo, elapsed_s=2.0)
    assert s["requests"] == 7 and s["completed"] == 5
    assert s["rejected_429"] == 1 and s["aborted_or_error"] == 1
    assert s["goodput_rps"] == pytest.approx(3 / 2.0)
    assert s["throughput_rps"] == pytest.approx(5 / 2.0)
    assert s["slo_attainment"] == pytest.approx(3 / 7)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert percentile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert s["token_count_mismatches"] == 0


def test_window_itl_splits_by_arrival_time() -> None:
    r = RequestResult("stream", 0.0, status=200, itl_s=[0.01, 0.02, 0.3], token_t_s=[1.0, 2.0, 6.0])
    other = RequestResult("long", 0.0, status=200, itl_s=[9.0], token_t_s=[6.0])
    assert window_itl([r, other], 0.0, 5.0) == [0.01, 0.02]
    assert window_itl([r, other], 5.0, 10.0) == [0.3]


def test_workloads_are_seeded_and_shaped() -> None:
    a1 = shared_system_prompt(4.0, 5.0, vocab_size=VOCAB, api_keys=("ka", "kb"), seed=3)
    a2 = shared_system_prompt(4.0, 5.0, vocab_size=VOCAB, api_keys=("ka", "kb"), seed=3)
    assert a1 == a2 and len(a1.specs) > 5
    sys_len = a1.meta["system_prompt_tokens"]
    assert sys_len == 220
    heads = {s.prompt_ids[:sys_len] for s in a1.specs}
    assert len(heads) == 1  # one shared system prompt
    for s in a1.specs:
        assert 20 <= len(s.prompt_ids) - sys_len <= 2000
        assert s.api_key == ("ka" if s.tag == "A" else "kb")
        assert (s.max_tokens < 200) == (s.tag == "A")
    b = long_prefill_interference(10.0, vocab_size=VOCAB, long_every_s=2.0)
    longs = [s for s in b.specs if s.tag == "long"]
    assert [s.arrival_s for s in longs] == [5.0, 7.0, 9.0] and len(longs[0].prompt_ids) == 8000
    d = burst(7, vocab_size=VOCAB, api_keys=("x", "y"), scale=LengthScale(0.1, 0.1))
    assert all(s.arrival_s == 0 for s in d.specs) and [s.api_key for s in d.specs][:3] == [
        "x",
        "y",
        "x",
    ]


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    import yaml
    from serve_harness import router_args, serve_router

    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "product-a": {"keys": ["sk-a"], "prefix_namespace": "shared"},
                    "product-b": {"keys": ["sk-b"], "prefix_namespace": "shared"},
                },
                "admin_keys": ["sk-admin"],
            }
        )
    )
    args = router_args(
        tiny_model_dir,
        tenants={"api_keys_file": str(keys)},
        admission={"max_queue_per_tenant": 2, "queue_timeout_s": 20.0},
    )
    with serve_router(args, admin_key="sk-admin") as h:
        yield h


def test_load_against_real_router(router) -> None:
    wl = shared_system_prompt(
        6.0, 1.5, vocab_size=VOCAB, api_keys=("sk-a", "sk-b"), scale=LengthScale(0.08, 0.03), seed=1
    )
    run = asyncio.run(
        run_load(router.base_url, wl.specs, model="tiny", progress=False, timeout_s=120)
    )
    assert len(run.results) == len(wl.specs)
    for r, spec in zip(run.results, sorted(wl.specs, key=lambda s: s.arrival_s)):
        assert r.ok, r
        assert 0 < r.ttft_s < r.e2e_s
        assert r.output_tokens == r.usage_completion_tokens == spec.max_tokens
        assert r.prompt_tokens == len(spec.prompt_ids)
        assert len(r.itl_s) == r.output_tokens - 1 == len(r.token_t_s)
        assert r.finish_reason == "length"
    # the shared 16-token system prompt block is served from cache to later requests of BOTH tenants
    # (two API keys, one prefix namespace)
    hits = {r.tag for r in run.results[2:] if r.cached_tokens >= 16}
    assert hits == {"A", "B"}, [(r.tag, r.cached_tokens) for r in run.results]
    s = summarize(run, SLO(ttft_s=60.0, itl_s=60.0))
    assert s["completed"] == len(wl.specs) and s["goodput_rps"] == pytest.approx(
        s["throughput_rps"]
    )
    router.assert_no_leak()


def test_burst_counts_429_and_aborts_nothing(router) -> None:
    wl = burst(24, vocab_size=VOCAB, prompt_tokens=180, max_tokens=40, api_keys=("sk-a", "sk-b"))
    run = asyncio.run(
        run_load(router.base_url, wl.specs, model="tiny", progress=False, timeout_s=120)
    )
    s = summarize(run, SLO())
    assert s["rejected_429"] > 0, (
        s,
        [r.error for r in run.results if r.status == 500][:2],
    )  # 64 KV blocks hold ~5 such requests, queues hold 2 per tenant
    assert s["completed"] + s["rejected_429"] == 24, s
    assert s["aborted_or_error"] == 0 and s["transport_errors"] == 0
    assert s["retry_after_s"]["n"] == s["rejected_429"]
    router.assert_no_leak()


def test_cli_writes_json_and_plots(router, tmp_path) -> None:
    rc = main(
        [
            "--url",
            router.base_url,
            "--workload",
            "c",
            "--rates",
            "3,6",
            "--duration",
            "1",
            "--api-key",
            "sk-a",
            "--vocab-size",
            str(VOCAB),
            "--scale",
            "0.2",
            "--output-scale",
            "0.05",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "serve_load.json").read_text())
    assert data["model"] == "tiny" and [r["rate"] for r in data["runs"]] == [3.0, 6.0]
    for row in data["runs"]:
        assert row["summary"]["completed"] == row["summary"]["requests"] > 0
    assert (tmp_path / "serve_load_cdf.png").stat().st_size > 0
    assert (tmp_path / "serve_load_goodput.png").stat().st_size > 0


def test_cancel_at_stop_time_is_not_an_abort(router) -> None:
    wl = long_prefill_interference(
        1.0,
        vocab_size=VOCAB,
        num_streams=2,
        stream_prompt=10,
        stream_tokens=200,
        long_every_s=10.0,
        long_tokens=20,
        api_key="sk-a",
    )
    run = asyncio.run(
        run_load(router.base_url, wl.specs, model="tiny", progress=False, stop_after_s=0.05)
    )
    s = summarize(run, SLO())
    assert s["cancelled_by_client"] >= 2 and s["aborted_or_error"] == 0, s
    router.assert_no_leak()
