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
            if want_logprobs[i]:
                out_logprobs[i] = _token_logprob(
                    raw_logprobs[i], tokens[i], row.params.logprobs or 0
                )
    return tokens, out_logprobs


def _token_logprob(lp: torch.Tensor, token: int, n: int) -> TokenLogprob:
    top: dict[int, float] = {}
    if n > 0:
        vals, ids = torch.topk(lp, n)
        top = dict(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)


def _target_probs(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The distribution plain sampling draws from for this row (1-D logits, modified in place)."""
    if row.params.needs_penalties:
        apply_penalties(logits, row)
    if row.blocked_token_ids:
        logits[list(row.blocked_token_ids)] = float("-inf")
    return torch.softmax(_filter(logits, row.params), dim=-1)


def mask_greedy_rows(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Penalties and blocked tokens applied in place to ``logits[j]`` for ``rows[j]``: what a
    greedy row's argmax is taken over (no host sync)."""
    for j, row in enumerate(rows):
        if row.params.needs_penalties:
            apply_penalties(logits[j], row)
        if row.blocked_token_ids:
            logits[j, list(row.blocked_token_ids)] = float("-inf")


def accept_greedy(target: Sequence[int], draft: Sequence[int]) -> list[int]:
    """The longest prefix of ``draft`` equal to ``target`` plus the target token after it."""
    tokens: list[int] = []
    for j in range(len(draft) + 1):
        tokens.append(int(target[j]))
        if j == len(draft) or draft[j] != target[j]:
            break
    return tokens


def verify(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    draft: Sequence[int],
    default_generator: torch.Generator | None,
    greedy_target: Sequence[int] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Accept a prefix of ``draft`` and add one token; returns the 1..len(draft)+1 emitted tokens.

    ``greedy_target``: for a greedy row without logprobs, the argmax of every row already taken
    (``mask_greedy_rows`` then one argmax over all verifications of a step: one host sync per step,
    not one per request).

    ``logits [d+1, V]``: row j is the target model's distribution after the sequence plus
    ``draft[:j]``; ``rows[j]`` carries the output as it would be then (penalties, min_tokens).
    Greedy: the longest prefix of the draft equal to the argmax, plus the argmax after it, which is
    exactly what d+1 plain greedy steps would emit. Sampled: draft token x is accepted with
    probability p(x) (the draft distribution is a point mass), a rejection draws from the residual
    ``p`` without x, renormalised; all accepted draws a bonus from the last row. The emitted tokens
    are then distributed as plain sampling's (Leviathan et al. 2023, Chen et al. 2023).
    """
    d = len(draft)
    params = rows[0].params
    raw = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
    tokens: list[int] = []
    if params.greedy:
        if greedy_target is None:
            mask_greedy_rows(logits, rows)
            greedy_target = logits.argmax(dim=-1).tolist()
        tokens = accept_greedy(greedy_target, draft)
    else:
        gen = rows[0].generator if rows[0].generator is not None else default_generator
        probs = torch.stack([_target_probs(logits[j], rows[j]) for j in range(d + 1)])  # [d+1, V]
        drafted = torch.tensor(list(draft), dtype=torch.long, device=logits.device)
        u = torch.rand(d, generator=gen, device=logits.device)
        accepted = (u < probs[:-1].gather(1, drafted[:, None])[:, 0]).tolist()
        a = next((j for j, ok in enumerate(accepted) if not ok), d)
        tokens.extend(int(t) for t in draft[:a])
        last = probs[a].clone()
        if a < d:
            last[draft[a]] = 0.0  # residual max(0, p - q) with q a point mass at the draft
            last = last / last.sum()
        noise = torch.empty_like(last).exponential_(generator=gen)
        tokens.append(int(torch.argmax(last / noise)))
    logprobs: list[TokenLogprob | None] = [None] * len(tokens)
    if raw is not None:
        logprobs = [_token_logprob(raw[j], t, params.logprobs or 0) for j, t in enumerate(tokens)]
    return tokens, logprobs
