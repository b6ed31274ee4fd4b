"""Admission under a burst of 10x the KV budget whose outputs outgrow their prediction (the seed's
case, scaled down): nothing is aborted for memory, nothing crashes, the excess queues or gets 429,
and the engine absorbs the wrong predictions by preemption (counted)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from baton.cluster.serve_config import AdmissionSection, TenantLimits
from baton.router.admission import AdmissionController
from baton.router.errors import APIError
from serve_harness import router_args, serve_router

BLOCKS = 32  # x 16 tokens = 512 KV tokens
PREDICTED, ACTUAL = 8, 48  # learned from the warm-up, then outgrown
BURST = 80  # a sequence needs 4 blocks at its end: the cache holds 8 of them, the burst is 10x


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    args = router_args(
        tiny_model_dir,
        engine={"num_kv_blocks": BLOCKS},
        admission={"min_samples": 8, "max_queue_per_tenant": 40, "queue_timeout_s": 120},
    )
    with serve_router(args) as h:
        yield h


async def _one(c: httpx.AsyncClient, i: int, max_tokens: int) -> httpx.Response:
    return await c.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": f"Request {i}: the quick brown fox jumps",
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
        },
    )


def test_burst_beyond_kv_budget(router) -> None:
    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(
            base_url=router.base_url, timeout=180, limits=httpx.Limits(max_connections=BURST + 8)
        ) as c:
            warm = [await _one(c, i, PREDICTED) for i in range(8)]
            burst = await asyncio.gather(*(_one(c, i, ACTUAL) for i in range(BURST)))
            return warm, list(burst)

    warm, burst = asyncio.run(run())
    assert all(r.status_code == 200 for r in warm)
    ok = [r for r in burst if r.status_code == 200]
    limited = [r for r in burst if r.status_code == 429]
    assert len(ok) + len(limited) == BURST, {r.status_code for r in burst}
    for r in ok:  # every admitted request ran to its full length: none aborted for memory
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length", choice
        assert r.json()["usage"]["completion_tokens"] == ACTUAL
    for r in limited:
        assert r.json()["error"]["code"] in ("queue_full", "queue_timeout")
        assert int(r.headers["Retry-After"]) >= 1
    assert limited, "a 10x burst with a bounded queue must turn some requests away"
    assert len(ok) > 40  # the queue (40) plus the admitted ones got through
    st = router.assert_no_leak()
    preemptions = sum(w["num_preemptions"] for w in st["workers"])
    assert preemptions > 0, "outputs outgrew the prediction: the engine should have preempted"
    metrics = httpx.get(router.base_url + "/metrics").text
    assert 'vllm:num_preemptions_total{model_name="tiny",worker="local-0"}' in metrics


def test_fair_queue_and_limits_unit() -> None:
    """Round-robin between tenants, per-tenant concurrency, token-rate limit with Retry-After."""

    async def run() -> None:
        now = [0.0]
        cfg = AdmissionSection(
            min_samples=1,
            max_queue_per_tenant=4,
            queue_timeout_s=5,
            tenant_limits={"slow": TenantLimits(tokens_per_minute=60)},
        )
        adm = AdmissionController(cfg, total_blocks=10, block_size=16, clock=lambda: now[0])
        big = await adm.acquire("r0", "a", "k", 16 * 8, 16)  # takes 9 of the 9 budget blocks
        order: list[str] = []

        async def waiter(rid: str, tenant: str) -> None:
            t = await adm.acquire(rid, tenant, "k", 10, 6)
            order.append(rid)
            await asyncio.sleep(0)
            adm.release(t, "stop")

        tasks = [asyncio.create_task(waiter(f"a{i}", "a")) for i in range(3)]
        tasks += [asyncio.create_task(waiter(f"b{i}", "b")) for i in range(2)]
        await asyncio.sleep(0.01)
        assert adm.num_queued == 5
        adm.release(big, "length")
        await asyncio.gather(*tasks)
        # round-robin: one of each tenant before the second of either
        assert sorted(order[:2]) == ["a0", "b0"] and sorted(order[2:4]) == ["a1", "b1"], order
        with pytest.raises(APIError) as err:
            for i in range(3):
                await adm.acquire(f"s{i}", "slow", "k", 20, 20)
        assert err.value.status == 429 and err.value.code == "rate_limited"
        assert err.value.retry_after_s and err.value.retry_after_s > 0

    asyncio.run(run())
