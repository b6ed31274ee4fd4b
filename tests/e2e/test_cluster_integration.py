"""The router in disaggregated mode on real Ray Serve, started the KubeRay way (``build_app`` only,
nobody runs ``baton serve``): two racing router replicas get-or-create ONE pool (1 prefill + 2
decode, pinned by custom resources) and the prefix directory; workers publish their cache so a
repeated prefix lands on the decode worker that holds it, whichever router replica takes it; an
admin purge of one tenant drops that tenant's blocks on the workers and in the directory only."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))

from baton.cluster.serve_config import ServeConfig  # noqa: E402
from baton.workers.block_hash import block_hashes  # noqa: E402
from serve_harness import free_port, router_args  # noqa: E402

pytestmark = pytest.mark.timeout(300)
PROMPT = [(11 * j) % 300 + 5 for j in range(100)]  # 6 full blocks; < 256 tokens: decode prefills it
KEYS = {"a": "sk-a", "b": "sk-b"}


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    from baton.cluster.prefix_directory import get_directory
    from baton.router.app import build_app
    from baton.router.core import ModelInfo
    from ray import serve

    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {"tenants": {t: {"keys": [k]} for t, k in KEYS.items()}, "admin_keys": ["sk-admin"]}
        )
    )
    pool = {"num_cpus": 0.25}
    args = router_args(
        tiny_model_dir,
        tenants={"api_keys_file": str(keys)},
        server={"router_replicas": 2},
        pools={
            "mode": "disaggregated",
            "transport": "gloo",
            "prefill": {**pool, "replicas": 1, "resources": {"prefill_slot": 1}},
            "decode": {**pool, "replicas": 2, "resources": {"decode_slot": 1}},
        },
    )
    port = free_port()
    ray.init(
        num_cpus=2,
        resources={"prefill_slot": 1, "decode_slot": 2},
        include_dashboard=False,
        namespace="baton-itest",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.monotonic()
        serve.run(build_app(args), name="baton", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        while httpx.get(base + "/health", timeout=5).status_code != 200:
            assert time.monotonic() - t0 < 120, "not healthy in 120 s"
            time.sleep(0.2)
        model = ModelInfo.load(ServeConfig.model_validate(args))
        yield base, get_directory(), model
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def complete(base: str, tenant: str) -> int:
    r = httpx.post(
        base + "/v1/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {KEYS[tenant]}"},
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def holders(directory, model, tenant: str, want_any: bool, timeout_s: float = 15.0) -> dict:
    """The directory's answer for PROMPT under ``tenant``, waiting for it to (dis)appear."""
    root = dataclasses.replace(model.identity, namespace=tenant).root()
    hashes = block_hashes(root, PROMPT, model.block_size)
    deadline = time.monotonic() + timeout_s
    while True:
        got = ray.get(directory.longest_prefix.remote(root, hashes), timeout=10)
        if bool(got) == want_any or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_replicas_create_one_pinned_pool(stack) -> None:
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == "baton"
    )
    assert names == ["baton-prefix-directory", "decode-0", "decode-1", "prefill-0"], names
    avail = ray.available_resources()  # every slot taken by exactly one worker
    assert avail.get("prefill_slot", 0) == 0 and avail.get("decode_slot", 0) == 0, avail


def test_shared_prefix_goes_to_the_worker_that_holds_it(stack) -> None:
    base, directory, model = stack
    assert complete(base, "a") == 0
    first = holders(directory, model, "a", True)
    assert len(first) == 1 and list(first.values()) == [len(PROMPT) // 16], first
    for i in range(10):  # two router replicas: each finds the holder through the directory
        got = complete(base, "a")
        assert got == 96, (i, got, holders(directory, model, "a", True))
    assert holders(directory, model, "a", True) == first  # nobody else computed it


def test_tenant_purge_touches_only_that_tenant(stack) -> None:
    base, directory, model = stack
    complete(base, "a")
    complete(base, "b")
    assert holders(directory, model, "b", True)
    assert complete(base, "b") == 96
    r = httpx.post(
        base + "/admin/cache/purge",
        json={"namespace": "a"},
        timeout=30,
        headers={"Authorization": "Bearer sk-admin"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["worker_blocks_reset"] >= 6 and body["directory_entries_removed"] >= 6, body
    assert holders(directory, model, "a", False) == {}
    assert holders(directory, model, "b", True)
    assert complete(base, "b") == 96
    assert complete(base, "a") == 0


def test_a_rolled_config_replaces_the_workers(stack, tiny_model_dir) -> None:
    from baton.cluster.pool_config import PoolConfig
    from baton.cluster.pools import ensure_pools
    from baton.workers.config import CacheConfig, EngineConfig

    cfg = PoolConfig(
        engine=EngineConfig(
            model=str(tiny_model_dir),
            device="cpu",
            dtype="float32",
            cache=CacheConfig(block_size=16, num_kv_blocks=16),
        ),
        num_prefill=0,
        num_decode=1,
        num_cpus_per_worker=0.25,
        transport="gloo",
        ray_namespace="baton-roll",
        prefix_directory=None,
    )
    try:
        first = ensure_pools(cfg, model_version="v1")["decode-0"]
        assert ensure_pools(cfg, model_version="v1")["decode-0"].pid == first.pid  # got, not made
        rolled = ensure_pools(cfg, model_version="v2")["decode-0"]  # new weights at the same path
        assert rolled.pid != first.pid and rolled.config_tag != first.config_tag
    finally:
        ray.kill(ray.get_actor("decode-0", namespace="baton-roll"), no_restart=True)
