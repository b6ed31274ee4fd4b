"""Admission by KV occupancy plus *predicted* output length (DESIGN.md, "Admission").

A request is admitted only if the blocks of every running request's current tokens plus its predicted remaining
tokens, plus the new request's prompt and prediction, fit under the KV budget minus headroom. The prediction is
``min(max_tokens, quantile of recently observed output lengths)`` per key (tenant namespace / route), learned
online. When a request outgrows its prediction the scheduler preempts instead of aborting, so a wrong prediction
costs latency, never a request. Used by the engine's scheduler and, with pool-wide numbers, by the router.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field


@dataclass
class OutputLengthPredictor:
    """Online quantile of observed output lengths over a bounded window per key."""

    quantile: float = 0.9
    window: int = 512
    min_samples: int = 8
    _samples: dict[str, deque[int]] = field(default_factory=dict)
    _sorted: dict[str, list[int]] = field(default_factory=dict)

    def observe(self, key: str, output_len: int) -> None:
        q = self._samples.setdefault(key, deque())
        s = self._sorted.setdefault(key, [])
        if len(q) >= self.window:
            old = q.popleft()
            del s[bisect.bisect_left(s, old)]
        q.append(output_len)
        bisect.insort(s, output_len)

    def predict(self, key: str, max_tokens: int) -> int:
        s = self._sorted.get(key)
        if not s or len(s) < self.min_samples:
            return max_tokens
        idx = min(len(s) - 1, int(self.quantile * len(s)))
        return max(1, min(max_tokens, s[idx]))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass(frozen=True)
class AdmissionPolicy:
    """Decides whether one more sequence fits, given what the running ones are predicted to need."""

    total_blocks: int
    block_size: int
    headroom: float = 0.05

    @property
    def budget_blocks(self) -> int:
        return max(1, int(self.total_blocks * (1.0 - self.headroom)))

    def projected_blocks(self, current_tokens: int, predicted_remaining: int) -> int:
        return blocks_for(current_tokens + max(0, predicted_remaining), self.block_size)

    def can_admit(self, committed_blocks: int, new_tokens: int, new_predicted: int) -> bool:
        """``committed_blocks``: sum of ``projected_blocks`` over running sequences."""
        return (
            committed_blocks + self.projected_blocks(new_tokens, new_predicted)
            <= self.budget_blocks
        )
