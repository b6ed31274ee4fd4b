"""The real router core over real Ray prefill/decode pools, in the test process (no Serve proxy).

``cluster_stack(model_dir, namespace, env)`` starts local Ray (actor env from ``env``), one prefill
and one decode worker on the gloo transport, and a ``RouterCore`` with the FastAPI app; requests go
through ``httpx`` over ASGI. Shared by the tracing and metrics tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

MODEL_NAME = "tiny"
THRESHOLD = 8  # prompts of at least this many tokens go through the prefill worker


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    core: Any
    app: Any
    pools: Any

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 120))

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://router", timeout=60
        ) as c:
            return await c.post(path, json=body, headers=headers or {})

    async def get(self, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://router", timeout=60
        ) as c:
            return await c.get(path)


def serve_config(model_dir: Path, namespace: str, **observability: Any) -> Any:
    from baton.cluster.serve_config import ServeConfig

    return ServeConfig.model_validate(
        {
            "model": {"path": str(model_dir), "name": MODEL_NAME},
            "engine": {
                "device": "cpu",
                "dtype": "float32",
                "num_kv_blocks": 64,
                "max_model_len": 256,
                "block_size": 16,
                "max_num_batched_tokens": 32,
            },
            "pools": {
                "mode": "disaggregated",
                "transport": "gloo",
                "short_prompt_tokens": THRESHOLD,
                "prefill": {"replicas": 1, "num_cpus": 0.5},
                "decode": {"replicas": 1, "num_cpus": 0.5},
            },
            "admission": {"min_samples": 1000},
            "observability": observability,
            "server": {"grpc_port": 0},
        }
    )


@contextlib.contextmanager
def cluster_stack(
    model_dir: Path, namespace: str, env: dict[str, str] | None = None, **observability: Any
) -> Iterator[Stack]:
    import ray
    from baton.cluster.pools import start_pools
    from baton.router.app import build_core
    from baton.router.cluster_adapter import ClusterEngineClient, pool_config
    from baton.router.openai_api import create_app

    config = serve_config(model_dir, namespace, **observability)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace=namespace,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", **(env or {})}},
    )
    pools = None
    loop = asyncio.new_event_loop()
    core = None
    try:
        pcfg = replace(pool_config(config), ray_namespace=namespace, transfer_timeout_s=10.0)
        pools = start_pools(pcfg)
        client = ClusterEngineClient(pools.client())
        core = loop.run_until_complete(build_core(config, client=client))
        yield Stack(loop, core, create_app(core), pools)
    finally:
        if core is not None:
            loop.run_until_complete(core.close())
        loop.close()
        if pools is not None:
            pools.stop()
        ray.shutdown()
