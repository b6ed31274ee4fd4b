"""Sampling from the last-position logits of a batch, one row per request.

Greedy rows take the argmax of the (penalised) logits. Other rows: penalties, temperature, top-k, top-p, min-p,
then the exponential-race trick (argmax of p / E with E ~ Exp(1)) so that a seeded request draws its noise from
its own generator and its tokens do not depend on what else shares the batch. Logprobs are those of the model's
raw distribution (before temperature/top-k), as vLLM reports by default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from baton.workers.outputs import TokenLogprob
from baton.workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None
    blocked_token_ids: tuple[int, ...] = ()  # e.g. EOS while min_tokens is not reached


def apply_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Repetition penalty (HF semantics over prompt + output), frequency/presence (OpenAI, output only)."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
            dtype=torch.long,
            device=logits.device,
        )
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
    if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
        counts = Counter(row.output_token_ids)
        ids = torch.tensor(list(counts.keys()), dtype=torch.long, device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= p.frequency_penalty * freq + p.presence_penalty
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row (1-D)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], default_generator: torch.Generator | None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] float32 (modified in place). Returns one token (and optional logprob) per row."""
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    for i, row in enumerate(rows):
        if row.params.needs_penalties:
            apply_penalties(logits[i], row)
        if row.blocked_token_ids:
            logits[i, list(row.blocked_token_ids)] = float("-inf")
    greedy = [r.params.greedy for r in rows]
    tokens: list[int] = [0] * len(rows)
    if any(greedy):
        idx = [i for i, g in enumerate(greedy) if g]
        picked = logits[idx].argmax(dim=-1).tolist()
        for i, t in zip(idx, picked):
            tokens[i] = t
    for i, row in enumerate(rows):
        if greedy[i]:
            continue
        probs = torch.softmax(_filter(logits[i], row.params), dim=-1)
        gen = row.generator if row.generator is not None else default_generator
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens[i] = int(torch.argmax(probs / noise))
    out_logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, row in enumerate(rows):
            if not want_logprobs[i]:
                continue
            lp = raw_logprobs[i]
            top: dict[int, float] = {}
            n = row.params.logprobs or 0
            if n > 0:
                vals, ids = torch.topk(lp, n)
                top = dict(zip(ids.tolist(), vals.tolist()))
            out_logprobs[i] = TokenLogprob(tokens[i], float(lp[tokens[i]]), top)
    return tokens, out_logprobs
