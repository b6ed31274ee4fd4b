"""``ClusterEngineClient``: the cluster's ``ClusterClient`` (Ray prefill/decode pools) behind
``EngineClient``.

The cluster client speaks its own dialect (a ``RoutingHint``, health and stats as per-worker dicts);
this thin shell translates, so the router core stays ignorant of Ray. ``pool_config`` maps the one
``ServeConfig`` onto the pools' ``PoolConfig``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from baton.cluster.serve_config import ServeConfig
from baton.router.client_protocol import Route, WorkerLoad
from baton.workers.messages import GenerateDelta, GenerateRequest

log = logging.getLogger(__name__)


def pool_config(config: ServeConfig, address: str | None = None) -> Any:
    from baton.cluster.pool_config import PoolConfig, WorkerResources

    p = config.pools
    extra: dict[str, Any] = {}
    if p.short_prompt_tokens:
        extra["disagg_threshold_tokens"] = p.short_prompt_tokens
    per_kind = {
        kind: WorkerResources(s.num_gpus, s.num_cpus, dict(s.resources))
        for kind, s in (("prefill", p.prefill), ("decode", p.decode))
    }
    return PoolConfig(
        engine=config.engine_config(),
        num_prefill=p.prefill.replicas,
        num_decode=p.decode.replicas,
        num_gpus_per_worker=max(p.prefill.num_gpus, p.decode.num_gpus),
        num_cpus_per_worker=max(p.prefill.num_cpus, p.decode.num_cpus),
        transport=p.transport,
        address=address,
        worker_resources=per_kind,
        orphan_timeout_s=p.orphan_timeout_s,
        ipc_arena_mib=p.ipc_arena_mib,
        **extra,
    )


class ClusterEngineClient:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    @classmethod
    async def discover(cls, config: ServeConfig) -> ClusterEngineClient:
        from baton.cluster.client import ClusterClient

        return cls(await ClusterClient.discover(pool_config(config)))

    async def generate(
        self, request: GenerateRequest, route: Route | None = None
    ) -> AsyncIterator[GenerateDelta]:
        from baton.cluster.client import RoutingHint

        hint = RoutingHint(route.prefill_worker, route.decode_worker) if route else None
        agen = self.cluster.generate(request, hint)
        try:
            async for delta in agen:
                yield delta
        finally:
            await agen.aclose()

    async def abort(self, request_id: str) -> None:
        await self.cluster.abort(request_id)

    async def health(self) -> bool:
        alive = await self.cluster.health()
        return bool(alive) and all(alive.values())

    async def stats(self) -> list[WorkerLoad]:
        got = await self.cluster.stats()
        infos = self.cluster.workers()
        loads = []
        for wid, s in got.items():
            info = infos.get(wid)
            role = s.role if s is not None else (info.kind if info else "decode")
            if s is None:
                loads.append(WorkerLoad(wid, role, False))
                continue
            loads.append(
                WorkerLoad(
                    wid,
                    role,
                    True,
                    num_running=s.num_running,
                    num_waiting=s.num_waiting,
                    kv_usage=s.kv_usage,
                    num_total_blocks=s.num_total_blocks,
                    num_free_blocks=s.num_free_blocks,
                    block_size=s.block_size,
                    num_preemptions=s.num_preemptions,
                    prefix_queries=s.prefix_queries,
                    prefix_hits=s.prefix_hits,
                    transport=info.transport if info else "",
                    transfer_bytes=s.transfer_bytes,
                    transfer_seconds_sum=s.transfer_seconds_sum,
                    transfer_buckets=s.transfer_buckets,
                    transfer_failure_reasons=s.transfer_failure_reasons,
                )
            )
        return loads

    async def check_integrity(self) -> str | None:
        errors = []
        for wid, (_, actor) in list(self.cluster._workers.items()):
            try:
                await asyncio.wait_for(actor.check_integrity.remote(), 10)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                errors.append(f"{wid}: {exc}")
        return "; ".join(errors) or None

    async def reset_prefix_cache(self, namespace: str | None = None) -> int:
        """Blocks dropped over all reachable workers (unreachable ones are logged)."""
        got = await self.cluster.reset_prefix_cache(namespace)
        missed = sorted(w for w, n in got.items() if n is None)
        if missed:
            log.warning("cache purge could not reach %s", ", ".join(missed))
        return sum(n for n in got.values() if n is not None)

    async def close(self) -> None:
        return None
