"""deploy/prometheus and deploy/grafana against the code that feeds them.

- ``promtool check rules`` and ``promtool test rules``: each alert fires on a synthetic bad series
  and stays silent on a healthy one (promtool comes from Debian's ``prometheus`` package; ``make
  test`` installs it when missing, so CI runs these; elsewhere they skip with the reason).
- Every alert has both a firing and a silent case in ``alerts_test.yaml``.
- Every metric the rules and the dashboard query is one the router actually exports (a renamed
  metric would otherwise silently blind an alert).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from baton.router.client_protocol import WorkerLoad
from baton.router.metrics import RouterMetrics
from prometheus_client.metrics import MetricWrapperBase

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "baton.json"
_METRIC = re.compile(r"\b((?:vllm|baton):[a-z0-9_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not installed (apt-get install prometheus)"
)


@needs_promtool
def test_promtool_checks_the_rules():
    r = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    r = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def _alerts() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_has_a_firing_and_a_silent_case():
    alerts = _alerts()
    required = {
        "BatonKVCacheHigh",
        "BatonLengthFinishRateHigh",
        "BatonTTFTP99OverSLO",
        "BatonITLP99OverSLO",
        "BatonRequestsRejected",
        "BatonPreemptionRateHigh",
        "BatonKVTransferFailures",
        "BatonPromptInjectionIndicators",
        "BatonKVQuantDrift",
    }
    assert required <= set(alerts)
    fires: set[str] = set()
    silent: set[str] = set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires == set(alerts), set(alerts) ^ fires
    assert silent == set(alerts), set(alerts) ^ silent


def _exported_names() -> set[str]:
    """Every sample name the router renders once each metric family has a sample."""
    m = RouterMetrics("m", tenants=("t",))
    m.observe_loads(
        [
            WorkerLoad(
                "decode-0",
                "decode",
                True,
                transport="gloo",
                transfer_bytes=1,
                transfer_buckets=(1,) * 14,
                transfer_seconds_sum=0.1,
                transfer_failure_reasons=(("timeout", 1),),
            )
        ]
    )
    m.observe_directory({"entries": 3, "counters": {"purged_admin": 1}})
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase):  # labelled: samples appear once a child exists
            metric.labels(*["x"] * len(metric._labelnames))
    names = set()
    for fam in m.registry.collect():
        names |= {s.name for s in fam.samples}
    return names


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_rules_and_dashboard_query_exported_metrics():
    exported = _exported_names()
    bases = {_base(n) for n in exported}
    queried = set()
    for expr in _alerts().values():
        queried |= set(_METRIC.findall(expr))
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            queried |= set(_METRIC.findall(target["expr"]))
    assert len(queried) > 20
    unknown = sorted(q for q in queried if q not in exported and q not in bases)
    assert not unknown, unknown


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dash["panels"])
    for word in (
        "Time to first token",
        "KV cache usage",
        "length",
        "Transfer",
        "injection",
        "drift",
    ):
        assert word.lower() in titles.lower(), word
