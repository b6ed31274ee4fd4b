"""KV-quantization drift probe on the tiny model, offline: fp8 KV vs unquantized KV through two
``LLM`` instances, teacher-forced on the reference's greedy tokens; the same engine against itself
is the control (agreement 1, KL 0); the result lands in the router's gauges."""

from __future__ import annotations

import pytest
from baton.cluster.quant_probe import DEFAULT_CANARIES, QuantProbe, run_probe
from baton.router.metrics import RouterMetrics
from baton.workers.llm import LLM

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    kw = dict(device="cpu", dtype="float32", num_kv_blocks=128, max_num_batched_tokens=512)
    return (
        LLM(str(tiny_model_dir), kv_cache_dtype="auto", **kw),
        LLM(str(tiny_model_dir), kv_cache_dtype="fp8", **kw),
    )


def test_control_is_exact(engines):
    ref, _ = engines
    r = run_probe(ref, ref, DEFAULT_CANARIES[:3], num_tokens=4)
    assert r.positions == 12 and r.prompts == 3
    assert r.top1_agreement == 1.0
    assert r.kl_mean == pytest.approx(0.0, abs=1e-5)


def test_fp8_kv_drift_is_measured_and_exported(engines):
    ref, fp8 = engines
    got = []
    probe = QuantProbe(ref, fp8, got.append, prompts=DEFAULT_CANARIES, num_tokens=6)
    r = probe.run_once()
    assert got == [r] and r.positions == 6 * len(DEFAULT_CANARIES)
    assert 0.5 <= r.top1_agreement <= 1.0  # fp8 KV perturbs, it must not scramble
    assert 0.0 < r.kl_mean < 1.0 and r.kl_max >= r.kl_mean
    m = RouterMetrics("tiny")
    m.observe_quant_probe(r)
    text = m.render().decode()
    assert (
        f'baton:kv_quant_top1_agreement{{kv_dtype="fp8",model_name="tiny"}} {r.top1_agreement}'
        in text
    )
    assert 'baton:kv_quant_kl_divergence{kv_dtype="fp8",model_name="tiny"}' in text
