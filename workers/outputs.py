"""What the engine hands back: one ``RequestOutput`` per request per step in which it changed.

Deltas (``delta_token_ids``/``delta_text``) are what crosses a process for streaming; the cumulative fields
(``token_ids``/``text``) are what the offline ``LLM.generate`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, stop token id or stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled by the caller (abort, disconnect)
    ERROR = "error"  # terminal error (reported once, with a message)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(
        default_factory=dict
    )  # top-n alternatives (incl. the token itself)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    error: str | None = None  # set with finish_reason "error"
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # arrival/first-token/finish times (monotonic)
    prefill_chunks: list[tuple[float, int]] = field(default_factory=list)  # (monotonic end, tokens)
    kv_evicted: bool = (
        False  # sink-window eviction dropped middle tokens' KV (attention is windowed)
    )
    num_evicted_tokens: int = 0
