"""Speculative decoding: who drafts (``Proposer``) and when drafting is worth it (``SpecDecoder``).

A step verifies ``1 + k`` tokens of a request in one forward pass (the last real token plus k drafts);
the runner returns logits at those k + 1 positions and the engine accepts by the standard rule
(``sampler.verify``): greedy keeps the longest draft prefix equal to the argmax plus one bonus token,
so output is token-identical to plain decoding; sampled uses rejection sampling, so the output keeps
the target distribution. Rejected tokens' KV is rolled back by the scheduler (``num_computed_tokens``
and the block table are trimmed; drafted blocks are never published to the prefix cache).

``NgramProposer`` (prompt lookup): the draft is what followed the most recent earlier occurrence of
the sequence's last n tokens (n from ``n_max`` down to ``n_min``). It keeps an incremental index per
request (n-gram -> last end position), so a step costs O(n_max - n_min) dict operations, not O(len).
A draft model can implement the same ``Proposer`` protocol later (it gets the whole batch at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from baton.workers.config import SpeculativeConfig


@dataclass(frozen=True)
class DraftQuery:
    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    k: int  # at most this many drafts


class Proposer(Protocol):
    def propose(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """One draft (possibly empty, at most ``k`` tokens) per query."""
        ...

    def forget(self, request_id: str) -> None:
        """Drop per-request state (finished, aborted or preempted)."""
        ...


@dataclass
class _NgramIndex:
    tokens: list[int] = field(default_factory=list)
    # n-gram -> end position (exclusive) of its most recent occurrence that has a successor
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramProposer:
    """Prompt-lookup drafts from the request's own prompt and output."""

    def __init__(self, n_min: int = 2, n_max: int = 4, k: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n_min={n_min}, n_max={n_max}: need 1 <= n_min <= n_max")
        self.n_min, self.n_max, self.k = n_min, n_max, k
        self._index: dict[str, _NgramIndex] = {}

    def _sync(self, q: DraftQuery) -> _NgramIndex:
        idx = self._index.get(q.request_id)
        total = len(q.prompt_token_ids) + len(q.output_token_ids)
        if idx is None or len(idx.tokens) > total:
            idx = self._index[q.request_id] = _NgramIndex()
        toks = idx.tokens
        p = len(q.prompt_token_ids)
        start = len(toks)
        if start < p:
            toks.extend(q.prompt_token_ids[start:])
        toks.extend(q.output_token_ids[max(0, len(toks) - p) :])
        # Index n-grams ending at e for every e that now has a successor token (e < len(toks)).
        for end in range(max(start, 1), len(toks)):
            for n in range(self.n_min, self.n_max + 1):
                if end - n < 0:
                    break
                idx.last_end[tuple(toks[end - n : end])] = end
        return idx

    def propose_one(self, q: DraftQuery) -> list[int]:
        idx = self._sync(q)
        toks = idx.tokens
        k = min(q.k, self.k)
        if k <= 0:
            return []
        for n in range(min(self.n_max, len(toks) - 1), self.n_min - 1, -1):
            end = idx.last_end.get(tuple(toks[len(toks) - n :]))
            if end is not None:
                return toks[end : end + k]
        return []

    def propose(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        return [self.propose_one(q) for q in queries]

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)


@dataclass
class _Rate:
    ema: float
    drafted: int = 0
    off_until: int = -1


class SpecDecoder:
    """Drafting policy: a proposer plus moving averages of the acceptance rate.

    Each verified draft updates an exponential moving average (per request and engine-wide) of
    accepted / drafted. Below ``min_acceptance`` (after ``warmup_drafts`` drafted tokens) drafting
    stops for ``cooldown_steps`` steps, then probes again with the average reset to the threshold.
    Only the request's own average gates its drafts: an engine-wide gate let a few requests that do
    not repeat themselves switch drafting off for one that copies its prompt (H200, SmolLM2, batch 8:
    0.92x instead of a speed-up); the engine-wide average is reported (``active``).
    verification is not free (each drafted token is one more decode row that reads its sequence's
    KV again, and the host-side verification costs per request), so a workload that does not repeat
    itself should pay nothing.
    """

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer = proposer or NgramProposer(config.n_min, config.n_max, config.k)
        self.step_no = 0
        self.global_rate = _Rate(ema=1.0)
        self._rates: dict[str, _Rate] = {}
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verify_steps = 0

    def _enabled(self, rate: _Rate) -> bool:
        if rate.off_until < 0:
            return True
        if self.step_no >= rate.off_until:
            rate.off_until = -1
            rate.ema = max(rate.ema, self.config.min_acceptance)
            rate.drafted = 0
            return True
        return False

    @property
    def active(self) -> bool:
        """Engine-wide acceptance at or above ``min_acceptance`` (a statistic; requests gate alone)."""
        return self.global_rate.off_until < 0

    def propose(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Drafts for this step (empty where drafting is off for the request or engine-wide)."""
        self.step_no += 1
        self._enabled(
            self.global_rate
        )  # advances the engine-wide probe clock (reported, not a gate)
        if not queries:
            return []
        keep = [
            i
            for i, q in enumerate(queries)
            if self._enabled(self._rates.setdefault(q.request_id, _Rate(ema=1.0)))
        ]
        drafts: list[list[int]] = [[] for _ in queries]
        for i, d in zip(keep, self.proposer.propose([queries[i] for i in keep])):
            drafts[i] = list(d)
        return drafts

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.num_drafted += drafted
        self.num_accepted += accepted
        self.num_verify_steps += 1
        for rate in (self.global_rate, self._rates.setdefault(request_id, _Rate(ema=1.0))):
            a = self.config.ema_alpha
            rate.ema = (1 - a) * rate.ema + a * (accepted / drafted)
            rate.drafted += drafted
            if rate.drafted >= self.config.warmup_drafts and rate.ema < self.config.min_acceptance:
                rate.off_until = self.step_no + self.config.cooldown_steps

    def forget(self, request_id: str) -> None:
        self._rates.pop(request_id, None)
        self.proposer.forget(request_id)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0
