"""The one interface between the router and whatever runs the engines.

Two implementations plug in: ``LocalEngineClient`` (one in-process ``EngineCore`` on a background
thread: the colocated dev mode and the tests) and the cluster's ``ClusterClient`` (Ray
prefill/decode pools). The router never imports either concretely; it only needs to stream deltas,
abort, see load and ask for health.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from baton.workers.messages import GenerateDelta, GenerateRequest


@dataclass(frozen=True)
class Route:
    """Which replicas serve one request; ``None`` lets the client decide (single worker, or its own policy)."""

    prefill_worker: str | None = None
    decode_worker: str | None = None


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as the router sees it (for routing, admission and ``/health``)."""

    worker_id: str
    role: str  # prefill | decode | colocated
    ready: bool
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    block_size: int = 16
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    integrity_error: str | None = None  # set when a block-accounting check failed on the worker
    transport: str = ""  # the KV transport its pulls use (decode side)
    transfer_bytes: int = 0
    transfer_seconds_sum: float = 0.0
    transfer_buckets: tuple[int, ...] = ()  # per workers.roles.TRANSFER_BUCKETS, +Inf last
    transfer_failure_reasons: tuple[tuple[str, int], ...] = ()

    @property
    def serves_decode(self) -> bool:
        return self.role in ("decode", "colocated")

    @property
    def serves_prefill(self) -> bool:
        return self.role in ("prefill", "colocated")


@runtime_checkable
class EngineClient(Protocol):
    """What the router calls. ``generate`` yields deltas until one has ``finish_reason`` set;
    closing the iterator early (client gone) must abort the request and free its blocks, as must
    ``abort``."""

    def generate(
        self, request: GenerateRequest, route: Route | None = None
    ) -> AsyncIterator[GenerateDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> bool: ...

    async def stats(self) -> list[WorkerLoad]: ...

    async def reset_prefix_cache(self, namespace: str | None = None) -> int: ...

    async def close(self) -> None: ...
