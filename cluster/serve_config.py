"""The ONE schema for ``baton serve --config FILE`` and KubeRay's ``serveConfigV2`` application
args.

``baton.router.app:build_app(args)`` validates its ``args`` dict with ``ServeConfig``; the CLI
builds the same dict from its flags (``--config`` first, flags override). pydantic names the
offending field on every error, and unknown keys are refused so a typo in a manifest fails at deploy
time instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
from pydantic import BaseModel, ConfigDict, Field, model_validator

Transport = Literal["auto", "cuda_ipc", "nccl", "gloo", "grpc"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    path: str | None = None  # HF directory; None = the bundled default model (no download)
    name: str | None = None  # the id clients send as "model"; default: the directory's name
    tokenizer: str | None = None
    aliases: tuple[str, ...] = ()  # extra ids accepted for this model

    def served_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).name if self.path else "baton-default"


class EngineSection(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_model_len: int | None = Field(default=None, ge=2)
    block_size: Literal[8, 16, 32, 64, 128] = 16
    kv_cache_dtype: Literal["auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3"] = "auto"
    num_kv_blocks: int | None = Field(default=None, ge=2)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    cpu_kv_cache_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    swap_space_bytes: int = Field(default=0, ge=0)
    enable_prefix_caching: bool = True
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    seed: int = 0

    def to_engine_config(self, model: ModelSection) -> EngineConfig:
        return EngineConfig(
            model=model.path,
            tokenizer=model.tokenizer,
            dtype=self.dtype,
            device=self.device,
            load_format=self.load_format,
            attention_backend=self.attention_backend,
            max_model_len=self.max_model_len,
            seed=self.seed,
            cache=CacheConfig(
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                gpu_memory_utilization=self.gpu_memory_utilization,
                cpu_kv_cache_bytes=self.cpu_kv_cache_bytes,
                kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space_bytes=self.swap_space_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                preemption_mode=self.preemption_mode,
            ),
        )


class PoolSection(_Strict):
    replicas: int = Field(default=1, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    # Custom Ray resources per worker (KubeRay: {"prefill_slot": 1} pins workers to their group).
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_resources(self) -> PoolSection:
        for name, amount in self.resources.items():
            if not name or amount < 0:
                raise ValueError(f"resources[{name!r}]={amount}: needs a name and an amount >= 0")
        return self


class PoolsSection(_Strict):
    """``colocated``: one engine inside the router replica (dev, tests); ``disaggregated``: Ray
    prefill/decode pools; ``auto``: disaggregated when the cluster client is installed, else
    colocated."""

    mode: Literal["auto", "colocated", "disaggregated"] = "auto"
    prefill: PoolSection = PoolSection()
    decode: PoolSection = PoolSection()
    transport: Transport = "auto"
    short_prompt_tokens: int = Field(default=0, ge=0)  # prompts up to this go straight to decode
    # A decode worker drops a stream nobody polled for this long (its router replica died);
    # PoolConfig checks it is >= 10 x the poll interval (0.5 s).
    orphan_timeout_s: float = Field(default=60.0, ge=5.0)
    # cuda_ipc: device memory each prefill worker sets aside for its KV exports (mapped once by
    # each decode worker); outside gpu_memory_utilization; 0 = one IPC handle per export.
    ipc_arena_mib: int = Field(default=1024, ge=0)


class TenantLimits(_Strict):
    max_concurrency: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + max_tokens, token bucket


class TenantsSection(_Strict):
    api_keys_file: str | None = (
        None  # YAML (e.g. a mounted Kubernetes Secret); None = single-tenant dev mode
    )


class AdmissionSection(_Strict):
    headroom: float = Field(default=0.05, ge=0, lt=1)
    quantile: float = Field(default=0.9, gt=0, le=1)
    window: int = Field(default=512, ge=1)
    min_samples: int = Field(default=8, ge=1)
    max_queue_per_tenant: int = Field(default=64, ge=0)
    max_queue_total: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    default_limits: TenantLimits = TenantLimits()
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict)
    kv_blocks_override: int | None = Field(
        default=None, ge=1
    )  # budget when the pool cannot report it


class SLOSection(_Strict):
    ttft_p99_s: float = Field(default=2.0, gt=0)
    itl_p99_s: float = Field(default=0.2, gt=0)
    e2e_p99_s: float = Field(default=60.0, gt=0)


class ObservabilitySection(_Strict):
    """Tracing (OTLP endpoint; the standard ``OTEL_*`` variables work too) and the monitors."""

    otlp_endpoint: str | None = None
    service_name: str = "baton"
    # Prompt-injection indicators: name -> regex (None: the built-in list); labels only, never text.
    injection_patterns: dict[str, str] | None = None
    injection_heuristics: bool = True
    scan_outputs: bool = True
    finish_ratio_window: int = Field(default=1000, ge=1)
    drift_recent: int = Field(default=50, ge=2)
    drift_baseline_alpha: float = Field(default=0.002, gt=0, lt=1)
    drift_min_samples: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _check_patterns(self) -> ObservabilitySection:
        import re

        for name, rx in (self.injection_patterns or {}).items():
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"injection_patterns[{name!r}]: {exc}") from None
        return self


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=9000, ge=0, le=65535)  # 0: no gRPC front end
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    router_replicas: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)


class ServeConfig(_Strict):
    model: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    pools: PoolsSection = PoolsSection()
    tenants: TenantsSection = TenantsSection()
    admission: AdmissionSection = AdmissionSection()
    slo: SLOSection = SLOSection()
    observability: ObservabilitySection = ObservabilitySection()
    server: ServerSection = ServerSection()

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.pools.mode == "disaggregated" and self.pools.decode.replicas < 1:
            raise ValueError("pools.decode.replicas must be >= 1 in disaggregated mode")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> ServeConfig:
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the serve config must be a mapping at the top level")
        return cls.model_validate(data)

    def engine_config(self) -> EngineConfig:
        return self.engine.to_engine_config(self.model)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` onto ``base`` (CLI flags over a config file); neither is modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
