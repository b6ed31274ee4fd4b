"""Per-request sampling parameters, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """What vLLM users know; every field is validated in ``__post_init__`` with the offending value named.

    ``temperature == 0`` means greedy. ``top_k <= 0`` (or -1) disables top-k. ``seed`` makes sampling of this
    request reproducible regardless of what else is in the batch. ``logprobs`` asks for the top-n logprobs of each
    generated token (the sampled token's own logprob is always returned when it is set).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    priority: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "must be an integer >= 1",
        )
        _check(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            "must be a finite number >= 0",
        )
        _check(
            _finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]"
        )
        _check(
            isinstance(self.top_k, int) and (self.top_k >= 1 or self.top_k in (0, -1)),
            "top_k",
            self.top_k,
            "must be -1/0 (disabled) or an integer >= 1",
        )
        _check(
            _finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]"
        )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "must be a finite number > 0",
        )
        _check(
            _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            self.frequency_penalty,
            "must be in [-2, 2]",
        )
        _check(
            _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            self.presence_penalty,
            "must be in [-2, 2]",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs",
            self.logprobs,
            "must be an integer in [0, 20]",
        )
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"must be in [0, max_tokens={self.max_tokens}]",
        )
        _check(
            self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an integer"
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            self.stop,
            "must be non-empty strings",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"invalid sampling parameter {name}={value!r}: {why}")
