"""One ``Request`` per sequence. No prefill/decode flag: progress is ``num_computed_tokens`` against
``num_tokens``, which covers chunked prefill, prefix hits, preemption by recompute and remote KV alike."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch
from baton.workers.outputs import TokenLogprob
from baton.workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    PREFILLED = "prefilled"  # prefill-only request done; blocks held for transfer until released
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    namespace: str = "default"
    prefill_only: bool = False  # the prefill role: stop after the first token, hold KV for transfer
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, in order
    num_published_blocks: int = 0  # leading full blocks already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    predicted_output_len: int = 0
    generator: torch.Generator | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    finish_time: float | None = None
    prefill_chunks: list[tuple[float, int]] = field(default_factory=list)  # (monotonic end, tokens)
    error: str | None = None
    # Swap preemption: host blocks holding this request's live KV while it waits (None: not swapped).
    swap_host_ids: list[int] | None = None
    swap_slots: list[int] | None = None  # block-table indices those host blocks go back to
    # Sink-window eviction: block-table entries [sink blocks, evict_cursor) were checked; evicted ones
    # point at the null block 0 (the attention mask never reads them).
    evict_cursor: int = 0
    num_evicted_blocks: int = 0
    exact_context: bool = False  # opted out of eviction (must then fit in the window)
    # Speculative decoding: drafts for the next step (never part of the sequence until accepted).
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def live_block_ids(self) -> list[int]:
        """Blocks this request references (evicted table slots point at the null block 0)."""
        return [b for b in self.block_ids if b != 0]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
