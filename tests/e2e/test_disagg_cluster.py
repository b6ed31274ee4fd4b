"""Acceptance 1: a real local Ray cluster with 1 prefill + 1 decode worker per transport (gloo, grpc): 8
concurrent requests give the offline engine's greedy tokens, the decode worker received KV bytes and computed no
prompt tokens except the conditional (short) ones, and every block is back in the pools afterwards."""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray")

from baton.cluster.client import RoutingHint  # noqa: E402
from baton.cluster.pool_config import PoolConfig  # noqa: E402
from baton.cluster.pools import start_pools  # noqa: E402
from baton.workers.config import CacheConfig, EngineConfig  # noqa: E402
from baton.workers.llm import LLM  # noqa: E402
from baton.workers.messages import GenerateRequest  # noqa: E402
from baton.workers.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(240)

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LENGTHS = (5, 12, 17, 24, 31, 40, 48, 63)  # 5 < threshold: conditional on the decode worker
THRESHOLD = 8


def prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(n)] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="baton-e2e",
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}},
    )
    engine = EngineConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=64),
    )
    pools = {}
    try:
        for transport in ("gloo", "grpc"):
            cfg = PoolConfig(
                engine=engine,
                num_prefill=1,
                num_decode=1,
                transport=transport,
                disagg_threshold_tokens=THRESHOLD,
                num_cpus_per_worker=0.5,
                transfer_timeout_s=10.0,
                ray_namespace=f"baton-{transport}",
            )
            pools[transport] = start_pools(cfg)
        yield pools
    finally:
        for p in pools.values():
            p.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    return [
        (list(o.outputs[0].token_ids), o.outputs[0].text) for o in llm.generate(prompts(), GREEDY)
    ]


async def run_all(client, tag: str):
    async def one(i: int, p: list[int]):
        req = GenerateRequest(f"{tag}-{i}", tuple(p), GREEDY)
        tokens, text, last = [], "", None
        async for d in client.generate(req, RoutingHint()):
            tokens += d.token_ids
            text += d.text
            last = d
        return tokens, text, last

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts())))


@pytest.mark.parametrize("transport", ["gloo", "grpc"])
def test_disaggregated_greedy_matches_offline(cluster, offline, transport):
    pools = cluster[transport]
    assert pools.transport == transport
    client = pools.client()
    results = asyncio.run(run_all(client, transport))
    for (tokens, text, last), (want_tokens, want_text) in zip(results, offline):
        assert last.finish_reason == "length" and last.error is None
        assert tokens == want_tokens and text == want_text
    stats = asyncio.run(client.stats())
    dec = next(s for s in stats.values() if s.role == "decode")
    pre = next(s for s in stats.values() if s.role == "prefill")
    conditional = sum(n for n in LENGTHS if n < THRESHOLD)
    assert dec.kv_bytes_received > 0 and dec.transfers_ok == len(LENGTHS) - 1
    assert dec.transfer_failures == 0 and dec.recomputed_prompt_tokens == 0
    assert dec.conditional_prompt_tokens == conditional
    assert (
        dec.prompt_tokens_computed == conditional
    )  # no prefill work beyond the conditional prompts
    assert pre.prompt_tokens_computed == sum(n for n in LENGTHS if n >= THRESHOLD)
    assert pre.kv_bytes_sent == dec.kv_bytes_received
    for s in stats.values():
        assert s.num_free_blocks == s.num_total_blocks and s.num_held == 0 and s.num_running == 0
    for w in pools.workers.values():
        ray.get(w.actor.check_integrity.remote(), timeout=30)
    assert all(asyncio.run(client.health()).values())


def test_stop_strings_across_the_prefill_first_token(cluster, offline, tiny_model_dir):
    """The first token is streamed from the prefill worker, the rest by the decode worker: a stop
    string that starts inside the first token's text (so the prefill holds it back) or later must
    give the offline engine's text, tokens and finish reason exactly."""
    prompt = prompts()[3]  # 24 tokens: disaggregated
    _, full = offline[3]
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    first = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0]
    head = first.outputs[0].text
    stops = [full[: len(head) + 2], full[len(full) // 2 : len(full) // 2 + 3]]
    client = cluster["gloo"].client()
    for k, stop in enumerate(stops):
        assert stop.strip(), f"degenerate stop {stop!r} from {full!r}"
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=[stop])
        want = llm.generate([prompt], params)[0].outputs[0]

        async def one() -> tuple[list[int], str, str | None]:
            tokens, text, last = [], "", None
            async for d in client.generate(GenerateRequest(f"stop-{k}", tuple(prompt), params)):
                tokens += d.token_ids
                text += d.text
                last = d
            return tokens, text, last.finish_reason if last else None

        tokens, text, reason = asyncio.run(one())
        assert (text, reason) == (want.text, want.finish_reason), stop
        assert tokens == list(want.token_ids), stop


def test_logprobs_across_the_prefill_first_token(cluster, tiny_model_dir):
    """One logprob per streamed token, in order, equal to the offline engine's: the first comes
    with the token the prefill worker streamed, the rest from the decode worker."""
    prompt = prompts()[5]  # 40 tokens: disaggregated
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    want = llm.generate([prompt], params)[0].outputs[0]
    client = cluster["gloo"].client()

    async def one():
        tokens, lps = [], []
        async for d in client.generate(GenerateRequest("lp", tuple(prompt), params)):
            assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
            tokens += d.token_ids
            lps += d.logprobs
        return tokens, lps

    tokens, lps = asyncio.run(one())
    assert tokens == list(want.token_ids)
    assert [lp.token_id for lp in lps] == tokens
    for got, exp in zip(lps, want.logprobs):
        assert abs(got.logprob - exp.logprob) < 1e-4
        assert set(got.top) == set(exp.top)
