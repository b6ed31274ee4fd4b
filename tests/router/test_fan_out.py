"""``n > 1``: a request whose copies can never run side by side in the KV budget is a 400 at once
(naming n, the prompt tokens, max_tokens and the budget), and copies that cannot all be admitted
*right now* (a tenant concurrency cap, other traffic) are read as soon as each is admitted, so
the request completes instead of waiting out the queue timeout for a 429.

In-process router (no Ray): the same ``RouterCore`` and FastAPI app as a Serve replica.
"""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from baton.cluster.serve_config import AdmissionSection
from baton.router.admission import AdmissionController
from inproc_router import inproc_router

pytestmark = pytest.mark.timeout(120)
KEY = "sk-fan-out"
QUEUE_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {"fan": {"keys": [KEY]}}}))
    args = {
        "model": {"path": str(tiny_model_dir), "name": "tiny"},
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "num_kv_blocks": 48,
            "max_model_len": 128,
            "block_size": 16,
            "max_num_batched_tokens": 256,
        },
        "pools": {"mode": "colocated"},
        "tenants": {"api_keys_file": str(keys)},
        "admission": {
            "queue_timeout_s": QUEUE_TIMEOUT_S,
            "tenant_limits": {"fan": {"max_concurrency": 2}},
        },
    }
    with inproc_router(args) as r:
        yield r


def post(router, **body) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    with httpx.Client(
        base_url=router.base_url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **body})
    return r, time.monotonic() - t0


def test_n_beyond_kv_budget_is_400_at_once(router) -> None:
    budget = router.core.admission.policy.budget_blocks
    r, took = post(router, n=16, max_tokens=40, ignore_eos=True)
    assert r.status_code == 400, r.text
    assert took < 2, f"answered after {took:.1f} s"
    err = r.json()["error"]
    assert err["param"] == "n" and err["n"] == 16 and err["max_tokens"] == 40
    assert err["kv_budget_blocks"] == budget and err["kv_blocks_needed"] > budget
    assert err["prompt_tokens"] >= 1 and "max_tokens" in err["message"]
    router.assert_no_leak()


@pytest.mark.parametrize("stream", [False, True])
def test_copies_beyond_concurrency_are_served_as_admitted(router, stream: bool) -> None:
    """The tenant may run 2 sequences at once; n=4 used to hold 2 tickets unread while copies 3-4
    queued behind them, then 429 after queue_timeout_s."""
    r, took = post(router, n=4, max_tokens=6, ignore_eos=True, temperature=0, stream=stream)
    assert r.status_code == 200, r.text
    assert took < QUEUE_TIMEOUT_S, f"took {took:.1f} s: the copies waited out the queue"
    if stream:
        import json

        finishes = {}
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    if ch.get("finish_reason"):
                        finishes[ch["index"]] = ch["finish_reason"]
        assert finishes == {i: "length" for i in range(4)}
    else:
        choices = r.json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["length"] * 4
        assert r.json()["usage"]["completion_tokens"] == 24
    router.assert_no_leak()


def test_fan_out_check_unit() -> None:
    adm = AdmissionController(AdmissionSection(headroom=0.0), total_blocks=1, block_size=16)
    adm.check_fan_out(64, 100, 100)  # capacity unknown yet: no verdict
    adm.set_capacity(20, 16)
    adm.check_fan_out(1, 16 * 40, 16)  # one sequence: the engine's own checks apply
    adm.check_fan_out(5, 30, 34)  # 4 blocks each, 20 together: fits exactly
    with pytest.raises(Exception) as e:
        adm.check_fan_out(6, 30, 34)
    assert e.value.status == 400 and e.value.details["kv_blocks_needed"] == 24
    assert "at most n=5" in e.value.message
