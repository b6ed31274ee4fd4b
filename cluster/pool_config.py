"""``PoolConfig``: how many prefill/decode/colocated workers, where, with which transport and timeouts.

One frozen dataclass validated at construction (errors name the field). ``baton serve`` builds it from flags;
``start_pools`` and ``ClusterClient`` read it. ``disagg_threshold_tokens`` is the conditional-disaggregation
cut: a prompt whose uncached part is shorter is prefilled on the decode worker itself (the transfer would cost
more than it saves).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from baton.cluster.prefix_index import DirectoryConfig
from baton.workers.config import EngineConfig

TRANSPORT_CHOICES = ("auto", "gloo", "nccl", "cuda_ipc", "grpc")


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"invalid pool config {name}={value!r}: {why}")


@dataclass(frozen=True)
class WorkerResources:
    """What one worker of a kind asks Ray for; ``resources`` are custom ones (KubeRay's
    ``prefill_slot``/``decode_slot`` keep each kind on its own worker group)."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(0 <= self.num_gpus <= 8, "num_gpus", self.num_gpus, "must be in [0, 8]")
        _require(self.num_cpus >= 0, "num_cpus", self.num_cpus, "must be >= 0")
        for k, v in self.resources.items():
            _require(bool(k) and v >= 0, f"resources[{k!r}]", v, "must be a name and >= 0")


@dataclass(frozen=True)
class PoolConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0
    num_gpus_per_worker: float = 0.0  # 0.5: one GPU holds one prefill and one decode worker
    num_cpus_per_worker: float = 1.0
    transport: str = "auto"  # auto (by locality) | gloo | nccl | cuda_ipc | grpc
    disagg_threshold_tokens: int = (
        256  # uncached prompt tokens below this: prefill on the decode worker
    )
    lease_s: float = 30.0  # prefill side holds exported KV this long without an ack
    transfer_timeout_s: float = 10.0
    # cuda_ipc: each prefill worker gathers its exports into one pre-shared device buffer of this
    # size (its IPC handle is opened once per decode worker); 0 = off (one handle per export).
    # Exports that do not fit fall back to their own handle.
    ipc_arena_mib: int = 1024
    prefill_timeout_s: float = 120.0
    stream_idle_timeout_s: float = (
        120.0  # no delta for this long from a live decode worker: terminal error
    )
    poll_wait_s: float = 0.5  # one stream poll waits at most this long on the decode worker
    # A started stream not polled for this long has lost its caller (a dead router replica): the
    # decode worker aborts it (blocks freed) and forgets it. A live caller polls at least every
    # poll_wait_s, so this must be many polls long (validated: >= 10 x poll_wait_s).
    orphan_timeout_s: float = 60.0
    ray_namespace: str = "baton"
    address: str | None = None  # existing Ray cluster; None starts an embedded local one
    # Per-kind overrides of num_gpus/num_cpus_per_worker plus custom resources ("prefill", ...).
    worker_resources: Mapping[str, WorkerResources] = field(default_factory=dict)
    # Where workers heartbeat and publish their cache events; None: no directory link at all.
    prefix_directory: DirectoryConfig | None = field(default_factory=DirectoryConfig)

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_colocated"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, name, v, "must be an integer >= 0")
        _require(
            self.num_decode + self.num_colocated >= 1,
            "num_decode",
            self.num_decode,
            "at least one decode or colocated worker is needed",
        )
        _require(
            0 <= self.num_gpus_per_worker <= 8,
            "num_gpus_per_worker",
            self.num_gpus_per_worker,
            "must be in [0, 8]",
        )
        _require(
            self.num_cpus_per_worker >= 0,
            "num_cpus_per_worker",
            self.num_cpus_per_worker,
            "must be >= 0",
        )
        _require(
            self.transport in TRANSPORT_CHOICES,
            "transport",
            self.transport,
            f"must be one of {', '.join(TRANSPORT_CHOICES)}",
        )
        _require(
            self.disagg_threshold_tokens >= 0,
            "disagg_threshold_tokens",
            self.disagg_threshold_tokens,
            "must be >= 0",
        )
        for name in (
            "lease_s",
            "transfer_timeout_s",
            "prefill_timeout_s",
            "stream_idle_timeout_s",
            "poll_wait_s",
            "orphan_timeout_s",
        ):
            v = getattr(self, name)
            _require(v > 0, name, v, "must be > 0 seconds")
        _require(
            isinstance(self.ipc_arena_mib, int) and self.ipc_arena_mib >= 0,
            "ipc_arena_mib",
            self.ipc_arena_mib,
            "must be an integer >= 0 (MiB; 0 = off)",
        )
        for kind in self.worker_resources:
            _require(
                kind in ("prefill", "decode", "colocated"),
                "worker_resources",
                kind,
                "keys must be prefill, decode or colocated",
            )
        _require(
            self.orphan_timeout_s >= 10 * self.poll_wait_s,
            "orphan_timeout_s",
            self.orphan_timeout_s,
            f"must be >= 10 x poll_wait_s={self.poll_wait_s} (a live "
            "stream that is polled slowly must never be reaped)",
        )
        _require(
            self.transfer_timeout_s < self.lease_s,
            "transfer_timeout_s",
            self.transfer_timeout_s,
            f"must be shorter than lease_s={self.lease_s}",
        )

    def resources_for(self, kind: str) -> WorkerResources:
        got = self.worker_resources.get(kind)
        if got is not None:
            return got
        return WorkerResources(self.num_gpus_per_worker, self.num_cpus_per_worker)

    @property
    def device_type(self) -> str:
        dev = self.engine.device
        if dev == "auto":
            gpus = [self.num_gpus_per_worker, *(r.num_gpus for r in self.worker_resources.values())]
            return "cuda" if max(gpus) > 0 else "cpu"
        return "cuda" if dev.startswith("cuda") else "cpu"
