"""Worker-side faults not covered by ``test_transfer_faults.py``, on a real local Ray cluster:

- the gRPC KV stream dropped halfway by the source (an error status, or a silent early end):
  the decode worker recomputes once, tokens equal the fault-free run, both sides free every block;
- the prefix directory killed while requests are routed through it: routing falls back to the
  router's local view, every request finishes with the fault-free tokens, Ray restarts the actor and
  the workers' heartbeats re-publish their blocks so the table is rebuilt;
- requests abandoned at random points or aborted by id while others run: every worker ends with
  zero used blocks, zero running/waiting/held sequences and a sound block pool.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

ray = pytest.importorskip("ray")

from baton.cluster.client import RoutingHint  # noqa: E402
from baton.cluster.pool_config import PoolConfig  # noqa: E402
from baton.cluster.pools import start_pools  # noqa: E402
from baton.workers.config import CacheConfig, EngineConfig  # noqa: E402
from baton.workers.llm import LLM  # noqa: E402
from baton.workers.messages import GenerateRequest  # noqa: E402
from baton.workers.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(180)

NS = "baton-wfaults"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [tuple((7 * i + 5 * j) % 300 + 7 for j in range(40 + 3 * i)) for i in range(8)]
HAS_DIRECTORY_LINK = "prefix_directory" in PoolConfig.__dataclass_fields__


def _engine(tiny_model_dir) -> EngineConfig:
    return EngineConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=64),
    )


@pytest.fixture(scope="module")
def directory_config():
    if not HAS_DIRECTORY_LINK:
        return None
    from baton.cluster.prefix_index import DirectoryConfig

    return DirectoryConfig(
        name="wfaults-directory", ray_namespace=NS, lease_s=6.0, sweep_interval_s=0.5
    )


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, directory_config):
    """Two pools on one Ray cluster: gloo (1 prefill + 2 decode, linked to a directory) and grpc
    (1 prefill + 1 decode)."""
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace=NS,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}},
    )
    pools = {}
    try:
        extra = {}
        if directory_config is not None:
            from baton.cluster.prefix_directory import get_or_create_directory

            ray.get(get_or_create_directory(directory_config).stats.remote(), timeout=60)
            extra["prefix_directory"] = directory_config
        common = dict(
            engine=_engine(tiny_model_dir),
            disagg_threshold_tokens=8,
            num_cpus_per_worker=0.5,
            lease_s=4.0,
            transfer_timeout_s=2.0,
            poll_wait_s=0.2,
        )
        pools["gloo"] = start_pools(
            PoolConfig(
                num_prefill=1, num_decode=2, transport="gloo", ray_namespace=NS, **common, **extra
            )
        )
        grpc_extra = {"prefix_directory": None} if HAS_DIRECTORY_LINK else {}
        pools["grpc"] = start_pools(
            PoolConfig(
                num_prefill=1,
                num_decode=1,
                transport="grpc",
                ray_namespace=NS + "-grpc",
                **common,
                **grpc_extra,
            )
        )
        yield pools
    finally:
        for p in pools.values():
            p.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def want(tiny_model_dir) -> dict[tuple[int, ...], list[int]]:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    outs = llm.generate([list(p) for p in PROMPTS], GREEDY)
    return {p: list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


def stats(pools) -> dict:
    return {w: ray.get(e.actor.stats.remote(), timeout=30) for w, e in pools.workers.items()}


def assert_back_to_baseline(pools, timeout: float = 20.0) -> None:
    """Every block free, nothing running, waiting or held, block pool sound, on every worker."""
    deadline = time.monotonic() + timeout
    while True:
        got = stats(pools)
        busy = {
            w: s
            for w, s in got.items()
            if s.num_free_blocks != s.num_total_blocks
            or s.num_running
            or s.num_waiting
            or s.num_held
        }
        if not busy:
            break
        assert time.monotonic() < deadline, f"workers did not return to baseline: {busy}"
        time.sleep(0.2)
    for e in pools.workers.values():
        ray.get(e.actor.check_integrity.remote(), timeout=30)


async def collect(client, rid: str, prompt, hint: RoutingHint | None = None):
    tokens, last = [], None
    async for d in client.generate(GenerateRequest(rid, prompt, GREEDY), hint):
        tokens += d.token_ids
        last = d
    return tokens, last


# -- gRPC stream dropped halfway ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["abort", "truncate"])
def test_grpc_stream_dropped_halfway_recomputes(cluster, want, mode) -> None:
    pools = cluster["grpc"]
    assert pools.transport == "grpc"
    pid = next(w for w, e in pools.workers.items() if e.info.kind == "prefill")
    did = next(w for w, e in pools.workers.items() if e.info.kind == "decode")
    ray.get(
        pools.workers[pid].actor.set_faults.remote(drop_stream_next=1, drop_stream_mode=mode),
        timeout=10,
    )
    before = stats(pools)
    prompt = PROMPTS[3]
    tokens, last = asyncio.run(collect(pools.client(), f"drop-{mode}", prompt))
    after = stats(pools)
    assert tokens == want[prompt] and last.finish_reason == "length" and last.error is None
    assert after[did].transfer_failures == before[did].transfer_failures + 1
    assert after[did].recomputed_prompt_tokens - before[did].recomputed_prompt_tokens == len(prompt)
    assert after[did].kv_bytes_received == before[did].kv_bytes_received  # nothing half-placed
    # the fault was one-shot: the next request transfers normally
    tokens, _ = asyncio.run(collect(pools.client(), f"after-drop-{mode}", PROMPTS[4]))
    assert tokens == want[PROMPTS[4]]
    assert stats(pools)[did].kv_bytes_received > after[did].kv_bytes_received
    assert_back_to_baseline(pools)


# -- prefix directory killed mid-load -------------------------------------------------------------
def _directory_entries(handle) -> int:
    try:
        return int(ray.get(handle.stats.remote(), timeout=5)["entries"])
    except Exception:  # noqa: BLE001 - restarting
        return -1


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.skipif(not HAS_DIRECTORY_LINK, reason="pool workers do not publish to the directory")
def test_directory_killed_mid_load(cluster, want, directory_config, tiny_model_dir) -> None:
    from baton.cluster.prefix_directory import get_directory
    from baton.router.client_protocol import WorkerLoad
    from baton.router.routing import PrefixRouter

    pools = cluster["gloo"]
    handle = get_directory(directory_config)
    ident = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=8).engine.identity
    router = PrefixRouter(ident, 16, directory=handle, directory_timeout_s=0.5, seed=0)
    client = pools.client()

    def loads() -> list[WorkerLoad]:
        return [
            WorkerLoad(
                w,
                s.role,
                True,
                num_running=s.num_running,
                num_waiting=s.num_waiting,
                kv_usage=s.kv_usage,
                num_total_blocks=s.num_total_blocks,
                num_free_blocks=s.num_free_blocks,
                block_size=s.block_size,
            )
            for w, s in stats(pools).items()
        ]

    async def one(i: int, prompt, kill: asyncio.Event | None = None, delay: float = 0.0):
        await asyncio.sleep(delay)  # arrivals spread over the kill and the restart
        route = await router.pick(prompt, "default", loads())
        if kill is not None:
            kill.set()
        return await collect(
            client, f"dir-{i}", prompt, RoutingHint(route.prefill_worker, route.decode_worker)
        )

    # warm: blocks cached on the workers show up in the directory
    for i, p in enumerate(PROMPTS[:2]):
        assert asyncio.run(one(100 + i, p))[0] == want[p]
    _wait(lambda: _directory_entries(handle) > 0, 15, "the workers' first publish")
    _pid = lambda actor_self: __import__("os").getpid()  # noqa: E731 - pickled by value
    old_pid = ray.get(handle.__ray_call__.remote(_pid), timeout=10)

    async def load_with_kill():
        first_routed = asyncio.Event()
        tasks = [
            asyncio.create_task(one(i, p, first_routed if i == 0 else None, 0.15 * i))
            for i, p in enumerate(PROMPTS * 2)
        ]
        await first_routed.wait()
        ray.kill(handle, no_restart=False)  # Ray restarts it (max_restarts=-1): an empty table
        return await asyncio.gather(*tasks)

    results = asyncio.run(load_with_kill())
    for (tokens, last), p in zip(results, PROMPTS * 2):
        assert last.finish_reason == "length" and tokens == want[p]
    assert router.directory_errors > 0, "no routing call saw the directory down: kill came late"
    # restarted, then rebuilt from the workers' heartbeat + snapshot re-publish
    entries = _wait(lambda: max(_directory_entries(handle), 0), 30, "the directory to refill")
    assert ray.get(handle.__ray_call__.remote(_pid), timeout=10) != old_pid  # a new process
    root = router.root("default")
    from baton.workers.block_hash import block_hashes

    hashes = block_hashes(root, list(PROMPTS[0]), 16)
    held = _wait(
        lambda: ray.get(handle.longest_prefix.remote(root, hashes), timeout=5),
        15,
        "a rebuilt entry for a prompt the workers still cache",
    )
    assert max(held.values()) == len(PROMPTS[0]) // 16 and entries > 0
    assert_back_to_baseline(pools)


# -- abandoned and aborted requests ---------------------------------------------------------------
def test_abandon_and_abort_at_random_points(cluster, want) -> None:
    pools = cluster["gloo"]
    client = pools.client()
    rng = random.Random(3)
    n = 40

    async def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        action, at = rng.choice(["finish", "abandon", "abort"]), rng.randrange(0, 12)
        rid = f"leak-{i}"
        agen = client.generate(GenerateRequest(rid, prompt, GREEDY), None)
        tokens, last = [], None
        try:
            async for d in agen:
                tokens += d.token_ids
                last = d
                if action == "abandon" and len(tokens) > at:
                    break  # the consumer goes away (client disconnect)
                if action == "abort" and len(tokens) > at:
                    await client.abort(rid)
        finally:
            await agen.aclose()
        return action, prompt, tokens, last

    async def run():
        sem = asyncio.Semaphore(8)

        async def bounded(i):
            async with sem:
                return await one(i)

        return await asyncio.gather(*(bounded(i) for i in range(n)))

    results = asyncio.run(run())
    for action, prompt, tokens, last in results:
        assert tokens == want[prompt][: len(tokens)]  # whatever was streamed was right
        if action == "finish":
            assert tokens == want[prompt] and last.finish_reason == "length"
        elif action == "abort" and last is not None and last.finish_reason is not None:
            assert last.finish_reason in ("abort", "length")
    assert_back_to_baseline(pools)
