"""Engine configuration: one frozen dataclass per concern, validated at construction with the field named."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

KVEviction = Literal["none", "sink_window"]
PreemptionMode = Literal["recompute", "swap", "auto"]


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"invalid engine config {name}={value!r}: {why}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    ``num_kv_blocks`` wins when given; otherwise blocks are sized from ``gpu_memory_utilization`` (the fraction of
    device memory for weights + activations + KV, as in vLLM) on CUDA, or ``cpu_kv_cache_bytes`` on CPU.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_bytes: int = 256 * 1024 * 1024
    kv_cache_dtype: str = "auto"  # auto | float16 | bfloat16 | float32 | fp8 (e4m3)
    enable_prefix_caching: bool = True
    namespace: str = "default"
    cache_salt: str = ""
    swap_space_bytes: int = 0  # pinned host memory for swap preemption (0: recompute only)
    # StreamingLLM-style eviction: keep the first ``num_sink_tokens`` and the last ``eviction_window``
    # tokens, free whole blocks in between. Original positions are kept (attention is masked to
    # sinks + window), so a sequence is still bounded by max_model_len; only its KV is bounded.
    kv_eviction: KVEviction = "none"
    num_sink_tokens: int = 4
    eviction_window: int = 1024

    def __post_init__(self) -> None:
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
            "block_size",
            self.block_size,
            "must be a power of two in [1, 256]",
        )
        _require(
            self.num_kv_blocks is None or self.num_kv_blocks >= 2,
            "num_kv_blocks",
            self.num_kv_blocks,
            "must be >= 2",
        )
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _require(
            self.kv_cache_dtype in ("auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3"),
            "kv_cache_dtype",
            self.kv_cache_dtype,
            "must be auto, float16, bfloat16, float32 or fp8",
        )
        _require(
            self.swap_space_bytes >= 0, "swap_space_bytes", self.swap_space_bytes, "must be >= 0"
        )
        _require(
            self.kv_eviction in ("none", "sink_window"),
            "kv_eviction",
            self.kv_eviction,
            "must be 'none' or 'sink_window'",
        )
        _require(self.num_sink_tokens >= 0, "num_sink_tokens", self.num_sink_tokens, "must be >= 0")
        _require(
            self.eviction_window >= self.block_size,
            "eviction_window",
            self.eviction_window,
            f"must be >= block_size ({self.block_size})",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching with chunked prefill under a per-step token budget (decodes first)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = (
        None  # cap one prompt's chunk per step (None: budget)
    )
    enable_chunked_prefill: bool = True
    # recompute | swap (to CacheConfig.swap_space_bytes of host memory; recompute when it is full) |
    # auto (swap when the sequence has at least ``swap_min_tokens`` computed: cheaper than recomputing)
    preemption_mode: PreemptionMode = "recompute"
    swap_min_tokens: int = 512
    admission_headroom: float = 0.05  # fraction of KV blocks kept free at admission
    admission_quantile: float = 0.9
    predictor_window: int = 512

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _require(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            self.max_num_batched_tokens,
            "must be >= 1",
        )
        _require(
            self.preemption_mode in ("recompute", "swap", "auto"),
            "preemption_mode",
            self.preemption_mode,
            "must be 'recompute', 'swap' or 'auto'",
        )
        _require(self.swap_min_tokens >= 0, "swap_min_tokens", self.swap_min_tokens, "must be >= 0")
        _require(
            0 <= self.admission_headroom < 1,
            "admission_headroom",
            self.admission_headroom,
            "must be in [0, 1)",
        )
        _require(
            0 < self.admission_quantile <= 1,
            "admission_quantile",
            self.admission_quantile,
            "must be in (0, 1]",
        )


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: ``k`` drafted tokens verified in one forward pass.

    ``ngram`` (prompt lookup): the draft continues the most recent earlier occurrence of the last
    ``n_max``..``n_min`` tokens. Drafting turns itself off (per request and engine-wide, for
    ``cooldown_steps``) when the moving average of the acceptance rate falls below ``min_acceptance``.
    """

    method: Literal["ngram"] = "ngram"
    k: int = 4
    n_min: int = 2
    n_max: int = 4
    min_acceptance: float = 0.3
    ema_alpha: float = 0.1
    warmup_drafts: int = 16  # drafted tokens before the moving average may switch drafting off
    cooldown_steps: int = 256

    def __post_init__(self) -> None:
        _require(self.method == "ngram", "speculative.method", self.method, "must be 'ngram'")
        _require(1 <= self.k <= 16, "speculative.k", self.k, "must be in [1, 16]")
        _require(
            1 <= self.n_min <= self.n_max,
            "speculative.n_min",
            self.n_min,
            f"must be in [1, n_max={self.n_max}]",
        )
        _require(self.n_max <= 16, "speculative.n_max", self.n_max, "must be <= 16")
        _require(
            0 <= self.min_acceptance < 1,
            "speculative.min_acceptance",
            self.min_acceptance,
            "must be in [0, 1)",
        )
        _require(
            0 < self.ema_alpha <= 1, "speculative.ema_alpha", self.ema_alpha, "must be in (0, 1]"
        )
        _require(
            self.warmup_drafts >= 0, "speculative.warmup_drafts", self.warmup_drafts, "must be >= 0"
        )
        _require(
            self.cooldown_steps >= 1,
            "speculative.cooldown_steps",
            self.cooldown_steps,
            "must be >= 1",
        )

    @classmethod
    def from_value(cls, value: Any) -> SpeculativeConfig | None:
        """None, a ``SpeculativeConfig`` or a dict such as ``{"method": "ngram", "k": 4}``."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            _require(not unknown, "speculative", value, f"unknown keys {unknown}")
            return cls(**value)
        raise ValueError(f"invalid engine config speculative={value!r}: must be None or a dict")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs; ``model=None`` means the bundled default model (no download)."""

    model: str | None = None
    tokenizer: str | None = None  # defaults to the model directory
    skip_tokenizer_init: bool = (
        False  # token ids in and out only (benchmarks); no text, no stop strings
    )
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    load_format: str = "auto"  # auto | safetensors | dummy
    attention_backend: str = "auto"  # auto (triton on cuda, torch on cpu) | torch | triton
    enforce_eager: bool = (
        False  # True: no CUDA graphs for decode steps (they need the triton backend)
    )
    max_model_len: int | None = None
    seed: int = 0
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig | None = None  # or a dict: {"method": "ngram", "k": 4, ...}

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", SpeculativeConfig.from_value(self.speculative))
        _require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "dtype",
            self.dtype,
            "must be auto, float32, bfloat16 or float16",
        )
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )
        _require(
            self.load_format in ("auto", "safetensors", "dummy"),
            "load_format",
            self.load_format,
            "must be auto, safetensors or dummy",
        )
        _require(
            self.attention_backend in ("auto", "torch", "triton"),
            "attention_backend",
            self.attention_backend,
            "must be auto, torch or triton",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 2,
            "max_model_len",
            self.max_model_len,
            "must be >= 2",
        )
