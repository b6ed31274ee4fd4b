"""The Ray Serve application: ``build_app(args)`` is what ``baton serve`` runs and what KubeRay's
``serveConfigV2`` ``import_path: baton.router.app:build_app`` points at, with ``args`` in
``ServeConfig``'s shape.

One ingress deployment (``BatonRouter``) serves the FastAPI app and, on the same event loop, the
gRPC server. In ``colocated`` mode the engine runs inside the ingress replica
(``LocalEngineClient``); in ``disaggregated`` mode the replica talks to the Ray prefill/decode pools
through the cluster client.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from baton.cluster.serve_config import ServeConfig
from baton.router.auth import Authenticator
from baton.router.client_protocol import EngineClient
from baton.router.core import ModelInfo, RouterCore
from ray import serve

log = logging.getLogger(__name__)


def resolve_mode(config: ServeConfig) -> str:
    if config.pools.mode != "auto":
        return config.pools.mode
    return "disaggregated" if importlib.util.find_spec("baton.cluster.client") else "colocated"


async def _cluster_client(config: ServeConfig, model: ModelInfo) -> EngineClient:
    """The Ray pools, got or created: ``baton serve`` starts them before the router, but under
    KubeRay nobody does, so the replica creates the configured workers (named, detached,
    ``get_if_exists``: racing replicas end up with one pool) and waits until they are loaded."""
    from baton.cluster.client import ClusterClient
    from baton.cluster.pools import ensure_pools
    from baton.router.cluster_adapter import ClusterEngineClient, pool_config

    pcfg = pool_config(config)
    version = f"{model.identity.model_fingerprint}|{model.identity.tokenizer_hash}"
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: ensure_pools(pcfg, model_version=version)
    )
    return ClusterEngineClient(await ClusterClient.discover(pcfg))


def _directory(create: bool) -> Any | None:
    """The prefix directory's handle; in disaggregated mode it is created if none runs yet."""
    try:
        import ray
        from baton.cluster.prefix_directory import get_directory, get_or_create_directory

        if not ray.is_initialized():
            return None
        return get_or_create_directory() if create else get_directory()
    except (ImportError, ValueError):
        return None


async def build_core(
    config: ServeConfig, client: EngineClient | None = None, model: ModelInfo | None = None
) -> RouterCore:
    """Everything the router needs, started: auth, engine client, model info, admission, routing."""
    auth = Authenticator.from_file(config.tenants.api_keys_file)
    loop = asyncio.get_running_loop()
    # First, so the workers ensured below find it on their first look-up.
    directory = _directory(create=resolve_mode(config) == "disaggregated")
    if client is None:
        if resolve_mode(config) == "colocated":
            from baton.router.local_client import LocalEngineClient

            local = await loop.run_in_executor(None, LocalEngineClient, config.engine_config())
            client = local
            model = model or ModelInfo.from_engine(local.engine, config)
        else:
            model = model or await loop.run_in_executor(None, ModelInfo.load, config)
            client = await _cluster_client(config, model)
    if model is None:
        model = await loop.run_in_executor(None, ModelInfo.load, config)
    core = RouterCore(config, client, model, auth, directory=directory)
    await core.start()
    log.info(
        "router ready: model %s (max_model_len %d), mode %s, %s",
        model.name,
        model.max_model_len,
        resolve_mode(config),
        "DEV single-tenant" if auth.dev_mode else f"{auth.num_keys} keys",
    )
    return core


@serve.deployment(
    name="BatonRouter",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=4096,
    health_check_period_s=5,
)
@serve.ingress()
class BatonIngress:
    async def __init__(self, args: dict[str, Any]) -> None:
        self.config = ServeConfig.model_validate(args)
        self.core = await build_core(self.config)
        self.grpc_server = None
        self.grpc_port = 0
        if self.config.server.grpc_port:
            from baton.router.grpc_server import start_grpc_server

            self.grpc_server, self.grpc_port = await start_grpc_server(
                self.core, self.config.server.host, self.config.server.grpc_port
            )

    def __serve_build_asgi_app__(self) -> Any:
        from baton.router.openai_api import create_app

        return create_app(self.core)

    async def check_health(self) -> None:
        if not await self.core.client.health():
            raise RuntimeError("engine client unhealthy")

    async def __del__(self) -> None:
        if getattr(self, "grpc_server", None) is not None:
            await self.grpc_server.stop(grace=1.0)
        if getattr(self, "core", None) is not None:
            await self.core.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (validates ``args`` against ``ServeConfig`` before anything starts)."""
    config = ServeConfig.model_validate(args or {})
    return BatonIngress.options(num_replicas=config.server.router_replicas).bind(
        config.model_dump(mode="json")
    )
