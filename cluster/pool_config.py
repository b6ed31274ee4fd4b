"""``PoolConfig``: how many prefill/decode/colocated workers, where, with which transport and timeouts.

One frozen dataclass validated at construction (errors name the field). ``baton serve`` builds it from flags;
``start_pools`` and ``ClusterClient`` read it. ``disagg_threshold_tokens`` is the conditional-disaggregation
cut: a prompt whose uncached part is shorter is prefilled on the decode worker itself (the transfer would cost
more than it saves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.workers.config import EngineConfig

TRANSPORT_CHOICES = ("auto", "gloo", "nccl", "cuda_ipc", "grpc")


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"invalid pool config {name}={value!r}: {why}")


@dataclass(frozen=True)
class PoolConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0
    num_gpus_per_worker: float = 0.0  # 0.5: one GPU holds one prefill and one decode worker
    num_cpus_per_worker: float = 1.0
    transport: str = "auto"  # auto (by locality) | gloo | nccl | cuda_ipc | grpc
    disagg_threshold_tokens: int = 256  # uncached prompt tokens below this: prefill on the decode worker
    lease_s: float = 30.0  # prefill side holds exported KV this long without an ack
    transfer_timeout_s: float = 10.0
    prefill_timeout_s: float = 120.0
    stream_idle_timeout_s: float = 120.0  # no delta for this long from a live decode worker: terminal error
    poll_wait_s: float = 0.5  # one stream poll waits at most this long on the decode worker
    ray_namespace: str = "baton"
    address: str | None = None  # existing Ray cluster; None starts an embedded local one

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_colocated"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, name, v, "must be an integer >= 0")
        _require(self.num_decode + self.num_colocated >= 1, "num_decode", self.num_decode,
                 "at least one decode or colocated worker is needed")
        _require(0 <= self.num_gpus_per_worker <= 8, "num_gpus_per_worker", self.num_gpus_per_worker,
                 "must be in [0, 8]")
        _require(self.num_cpus_per_worker >= 0, "num_cpus_per_worker", self.num_cpus_per_worker,
                 "must be >= 0")
        _require(self.transport in TRANSPORT_CHOICES, "transport", self.transport,
                 f"must be one of {', '.join(TRANSPORT_CHOICES)}")
        _require(self.disagg_threshold_tokens >= 0, "disagg_threshold_tokens",
                 self.disagg_threshold_tokens, "must be >= 0")
        for name in ("lease_s", "transfer_timeout_s", "prefill_timeout_s", "stream_idle_timeout_s",
                     "poll_wait_s"):
            v = getattr(self, name)
            _require(v > 0, name, v, "must be > 0 seconds")
        _require(self.transfer_timeout_s < self.lease_s, "transfer_timeout_s",
                 self.transfer_timeout_s, f"must be shorter than lease_s={self.lease_s}")

    @property
    def device_type(self) -> str:
        dev = self.engine.device
        if dev == "auto":
            return "cuda" if self.num_gpus_per_worker > 0 else "cpu"
        return "cuda" if dev.startswith("cuda") else "cpu"
