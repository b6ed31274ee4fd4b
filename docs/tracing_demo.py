"""Send one request through Baton's real router and Ray prefill/decode pools with tracing on, so a
tracing UI (``make tracing``: Phoenix on :6006) shows one Baton trace. Prints the trace id.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:6006 .venv/bin/python docs/tracing_demo.py

Uses the bundled default model unless ``--model DIR`` is given; CPU is fine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import httpx


async def main(model: str | None, prompt: str) -> None:
    import ray
    from baton.cluster import tracing
    from baton.cluster.pools import start_pools
    from baton.cluster.serve_config import ServeConfig
    from baton.router.app import build_core
    from baton.router.cluster_adapter import ClusterEngineClient, pool_config
    from baton.router.openai_api import create_app

    config = ServeConfig.model_validate(
        {
            "model": {"path": model, "name": "baton-demo"},
            "engine": {
                "device": "cpu",
                "dtype": "float32",
                "num_kv_blocks": 128,
                "max_model_len": 512,
                "max_num_batched_tokens": 32,
            },
            "pools": {
                "mode": "disaggregated",
                "transport": "gloo",
                "short_prompt_tokens": 8,
                "prefill": {"replicas": 1, "num_cpus": 0.5},
                "decode": {"replicas": 1, "num_cpus": 0.5},
            },
            "observability": {"service_name": "baton-router"},
        }
    )
    env = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")  # actors flush quickly before they stop
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="baton-demo",
        runtime_env={"env_vars": {**env, "TRITON_INTERPRET": "1"}},
    )
    pools = start_pools(pool_config(config))
    try:
        core = await build_core(config, client=ClusterEngineClient(pools.client()))
        app = create_app(core)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://baton", timeout=120
        ) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={
                    "model": "baton-demo",
                    "max_tokens": 12,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}],
                },
            )
            r.raise_for_status()
            print("usage:", r.json()["usage"])
        await core.close()
        time.sleep(2.0)  # let the actors' batch processors export
    finally:
        pools.stop()
        ray.shutdown()
        tracing.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--prompt",
        default="Explain in two sentences why the sky looks blue at "
        "noon and red at sunset, for a curious ten-year-old.",
    )
    args = ap.parse_args()
    asyncio.run(main(args.model, args.prompt))
