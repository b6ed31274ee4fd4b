"""Seeded serving workloads (no download): each is a list of ``RequestSpec`` with arrival offsets.

Prompts are token ids (sent to ``/v1/completions`` as a list), so lengths are exact whatever the
tokenizer; ``vocab_size`` bounds the ids (the router refuses ids outside its tokenizer's
vocabulary). Every generator takes a ``LengthScale`` so the same shapes run in seconds on CPU
(``scale=0.05``) or at full size on a GPU.

(a) ``shared_system_prompt``: products A (chat, ~50 output tokens) and B (reports, ~1500) share a
    220-token system prompt; user prompts 20-2000 tokens (log-uniform); 50/50 mix; A and B use two
    tenants' API keys that the operator put in one prefix namespace. Poisson (or burst) arrivals.
(b) ``long_prefill_interference``: steady decode streams from t=0, plus periodic 8000-token prompts
    from ``long_start_s`` on; the streams' ITL before vs after ``long_start_s`` isolates the stall.
(c) ``sharegpt_like``: log-normal prompt/output lengths shaped like ShareGPT conversations (seeded).
(d) ``burst``: ``n`` requests at once (the caller picks n = 10x the server's capacity).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT_TOKENS = 220
LONG_PROMPT_TOKENS = 8000


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: ``arrival_s`` is the offset from the start of the run."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    arrival_s: float
    api_key: str | None = None
    tag: str = ""  # product / role in the workload: "A", "B", "stream", "long", "burst", ...


@dataclass(frozen=True)
class LengthScale:
    """Multiplies prompt and output lengths (each stays >= 1 token); 1.0 is full size."""

    prompt: float = 1.0
    output: float = 1.0

    def __post_init__(self) -> None:
        if not (self.prompt > 0 and self.output > 0):
            raise ValueError(
                f"invalid LengthScale prompt={self.prompt} output={self.output}: must be > 0"
            )

    def p(self, n: float) -> int:
        return max(1, round(n * self.prompt))

    def o(self, n: float) -> int:
        return max(1, round(n * self.output))


@dataclass(frozen=True)
class Workload:
    name: str
    specs: tuple[RequestSpec, ...]
    meta: dict[str, Any] = field(default_factory=dict)


def _ids(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    lo = min(
        16, vocab_size // 4
    )  # keep clear of the special tokens at the start of most vocabularies
    return tuple(rng.randrange(lo, vocab_size) for _ in range(n))


def arrivals(
    rate: float, duration_s: float, rng: random.Random, kind: str = "poisson"
) -> list[float]:
    """Arrival offsets in [0, duration_s): Poisson, uniform (fixed gaps) or burst (all at 0)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate}) and duration_s ({duration_s}) must be > 0")
    n_fixed = max(1, round(rate * duration_s))
    if kind == "burst":
        return [0.0] * n_fixed
    if kind == "uniform":
        return [i / rate for i in range(n_fixed)]
    if kind != "poisson":
        raise ValueError(f"unknown arrival kind {kind!r} (poisson | uniform | burst)")
    out, t = [], rng.expovariate(rate)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out or [0.0]


def shared_system_prompt(
    rate: float,
    duration_s: float,
    *,
    vocab_size: int,
    api_keys: tuple[str | None, str | None] = (None, None),
    scale: LengthScale = LengthScale(),
    seed: int = 0,
    arrival: str = "poisson",
) -> Workload:
    """Workload (a). Product A uses ``api_keys[0]``, B ``api_keys[1]``."""
    rng = random.Random(seed)
    system = _ids(random.Random(seed ^ 0x5EED), scale.p(SYSTEM_PROMPT_TOKENS), vocab_size)
    lo, hi = math.log(scale.p(20)), math.log(max(scale.p(20), scale.p(2000)))
    specs = []
    for t in arrivals(rate, duration_s, rng, arrival):
        product = "A" if rng.random() < 0.5 else "B"
        user = _ids(rng, round(math.exp(rng.uniform(lo, hi))), vocab_size)
        mean, sd = (50, 10) if product == "A" else (1500, 150)
        out = scale.o(max(1.0, rng.gauss(mean, sd)))
        specs.append(RequestSpec(system + user, out, t, api_keys[product == "B"], product))
    return Workload(
        "shared_system_prompt",
        tuple(specs),
        {
            "rate": rate,
            "duration_s": duration_s,
            "arrival": arrival,
            "system_prompt_tokens": len(system),
            "scale": scale.__dict__,
            "seed": seed,
        },
    )


def long_prefill_interference(
    duration_s: float,
    *,
    vocab_size: int,
    num_streams: int = 16,
    stream_prompt: int = 128,
    stream_tokens: int = 2000,
    long_start_s: float | None = None,
    long_every_s: float = 3.0,
    long_tokens: int = LONG_PROMPT_TOKENS,
    long_output: int = 8,
    api_key: str | None = None,
    scale: LengthScale = LengthScale(),
    seed: int = 0,
) -> Workload:
    """Workload (b). Streams start in the first 0.5 s and decode ``stream_tokens`` each (make that
    outlast ``duration_s``); long prompts arrive every ``long_every_s`` from ``long_start_s``
    (default: half way)."""
    rng = random.Random(seed)
    start = duration_s / 2 if long_start_s is None else long_start_s
    specs = [
        RequestSpec(
            _ids(rng, scale.p(stream_prompt), vocab_size),
            stream_tokens,
            0.5 * i / max(1, num_streams),
            api_key,
            "stream",
        )
        for i in range(num_streams)
    ]
    t = start
    while t < duration_s:
        specs.append(
            RequestSpec(
                _ids(rng, scale.p(long_tokens), vocab_size), long_output, t, api_key, "long"
            )
        )
        t += long_every_s
    return Workload(
        "long_prefill_interference",
        tuple(specs),
        {
            "duration_s": duration_s,
            "num_streams": num_streams,
            "long_start_s": start,
            "long_every_s": long_every_s,
            "long_prompt_tokens": scale.p(long_tokens),
            "stream_tokens": stream_tokens,
            "scale": scale.__dict__,
            "seed": seed,
        },
    )


def sharegpt_like(
    rate: float,
    duration_s: float,
    *,
    vocab_size: int,
    api_key: str | None = None,
    scale: LengthScale = LengthScale(),
    seed: int = 0,
    arrival: str = "poisson",
    max_len: int = 4096,
) -> Workload:
    """Workload (c): log-normal lengths with ShareGPT's rough shape (prompt median ~120, output
    ~180, both heavy-tailed), clipped to [4, max_len]; generated, never downloaded."""
    rng = random.Random(seed)
    specs = []
    for t in arrivals(rate, duration_s, rng, arrival):
        p = min(max_len, max(4, round(rng.lognormvariate(math.log(120), 1.1))))
        o = min(max_len // 2, max(4, round(rng.lognormvariate(math.log(180), 0.9))))
        specs.append(
            RequestSpec(_ids(rng, scale.p(p), vocab_size), scale.o(o), t, api_key, "sharegpt")
        )
    return Workload(
        "sharegpt_like",
        tuple(specs),
        {
            "rate": rate,
            "duration_s": duration_s,
            "arrival": arrival,
            "scale": scale.__dict__,
            "seed": seed,
        },
    )


def burst(
    n: int,
    *,
    vocab_size: int,
    prompt_tokens: int = 1536,
    max_tokens: int = 64,
    api_keys: tuple[str | None, ...] = (None,),
    scale: LengthScale = LengthScale(),
    seed: int = 0,
) -> Workload:
    """Workload (d): ``n`` requests at t=0, keys round-robin (so every tenant queue fills)."""
    if n < 1:
        raise ValueError(f"burst size must be >= 1, got {n}")
    rng = random.Random(seed)
    specs = tuple(
        RequestSpec(
            _ids(rng, scale.p(prompt_tokens), vocab_size),
            scale.o(max_tokens),
            0.0,
            api_keys[i % len(api_keys)],
            "burst",
        )
        for i in range(n)
    )
    return Workload(
        "burst",
        specs,
        {
            "n": n,
            "prompt_tokens": scale.p(prompt_tokens),
            "max_tokens": scale.o(max_tokens),
            "seed": seed,
        },
    )


def burst_size(
    capacity_blocks: int,
    block_size: int,
    prompt_tokens: int,
    max_tokens: int,
    factor: float = 10.0,
    cap: int = 2000,
) -> tuple[int, int]:
    """(capacity, burst size): how many such requests fit the KV budget at once, times factor."""
    per_request = -(-(prompt_tokens + max_tokens) // block_size)
    capacity = max(1, capacity_blocks // per_request)
    return capacity, min(cap, max(1, round(factor * capacity)))
