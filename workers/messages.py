"""Typed messages between the router and the worker roles (small structs carrying diffs, no dicts of flags).

They live in workers/ because the roles (engine side, no Ray) produce them; the router and cluster import them."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.workers.outputs import TokenLogprob
from baton.workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One accepted request, tokenized and checked by the router.

    ``namespace`` is the tenant's prefix-cache namespace, decided server-side from the API key.
    ``trace_context`` carries the W3C ``traceparent``/``tracestate`` of the router's span.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    namespace: str = "default"
    tenant: str = "default"
    trace_context: dict[str, str] = field(default_factory=dict)
    deadline_s: float | None = None  # monotonic-independent: seconds allowed from submission


@dataclass(frozen=True)
class GenerateDelta:
    """What a request produced since the last delta; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    num_preemptions: int = 0
    worker_id: str = ""
