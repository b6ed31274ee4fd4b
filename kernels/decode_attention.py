"""Paged decode attention (one query token per sequence), split-K flash-decoding in Triton.

Contract: ``q [B, Hq, D]`` attends to the first ``seq_lens[b]`` tokens of sequence b, which live in
``k_cache/v_cache [num_blocks, block_size, Hkv, D]`` at the physical blocks ``block_tables[b]``.
The query sits at position ``seq_lens[b] - 1`` (its own K/V are already in the cache).

Grid of the main kernel: ``(B, Hkv, num_splits)``. One program owns one KV head, so the GROUP = Hq/Hkv
query heads that share it are packed into the rows of one ``tl.dot`` and each KV byte is read once::

    keys of seq b:  [win_start ......................................... seq_len)
                    |-- split 0 --|-- split 1 --|-- ... --|-- split S-1 --|
    sinks [0, min(num_sinks, win_start)) are folded into split 0. The ranges are cut from seq b's
    own length on the device (tile-aligned, so the last ones may be empty): S comes from the
    host, the lengths never do.

With one split the kernel writes the normalised output directly; with more it writes per-split
``(out_s, lse_s)`` in float32 and ``_reduce_kernel`` merges them. (Merging inside the last-arriving
split instead, with an atomic counter, measured slower on H100: 61 vs 54 us at 1x32k.) ``choose_num_splits`` picks S so that
B*Hkv*S fills the GPU without cutting a sequence into slivers (vllm#48076: a wrong pick costs ~2x).
Scores live in the log2 domain (scale folded with log2(e)) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from baton.kernels.attention import visible_mask
from baton.kernels.cache_ops import dot_types

LOG2E = 1.4426950408889634
FP8_DTYPE = torch.float8_e4m3fn
MAX_SPLITS = 64
# A split shorter than this many keys is not worth its partial write and the reduction. One BLOCK_N
# tile: on an H200, 1x512 ran 16.5/11.3/8.2/6.5 us at 1/2/4/8 splits (cuDNN SDPA 8.5 us) and every
# small-batch shape kept gaining down to one tile per split
# (bench/results/decode_small_sweep_h200.json); a 256-key floor left 1x512 at 0.75x SDPA.
MIN_TOKENS_PER_SPLIT = 64
# Programs resident per SM that keep HBM busy (measured on H100, see bench/decode_attention.py).
TARGET_PROGRAMS_PER_SM = 4


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    n0,
    lo,
    hi,
    table_row,
    k_head,
    v_head,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    scale_log2,
    offs_d,
    dmask,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys n0..n0+BLOCK_N restricted to [lo, hi)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = (offs_n >= lo) & (offs_n < hi)
    page = tl.load(table_row + offs_n // PAGE, mask=offs_n < hi, other=0).to(tl.int64)
    tok = offs_n % PAGE
    kmask = nmask[:, None] & dmask[None, :]
    k = tl.load(
        k_head + (page * stride_kb + tok * stride_kt)[:, None] + offs_d[None, :],
        mask=kmask,
        other=0.0,
    )
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC, out_dtype=tl.float32)
    qk = qk * scale_log2  # [G, N]
    qk = tl.where(nmask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_head + (page * stride_vb + tok * stride_vt)[:, None] + offs_d[None, :],
        mask=kmask,
        other=0.0,
    )
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC, out_dtype=tl.float32)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    v_scale,
    sliding_window,
    num_sinks,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_pt,
    stride_ph,
    stride_ps,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    win_start = 0
    if USE_WINDOW:
        win_start = tl.maximum(seq_len - sliding_window, 0)
    # This sequence's keys from its (tile-aligned) window start, cut into num_programs(2) equal
    # tile-aligned ranges on the device: a grid chosen for a longer context (a CUDA graph captured
    # once for every context) still spreads a short or ragged sequence over the splits.
    base = (win_start // BLOCK_N) * BLOCK_N
    split_tokens = tl.cdiv(tl.cdiv(seq_len - base, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = base + s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    if USE_WINDOW:
        if s == 0:
            sink_end = tl.minimum(num_sinks, win_start)
            for n0 in range(0, sink_end, BLOCK_N):
                acc, m_i, l_i = _attend_tile(
                    q, acc, m_i, l_i, n0, 0, sink_end, table_row, k_head, v_head,
                    stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, offs_d, dmask,
                    PAGE, BLOCK_N, DOT_PREC,
                )  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, win_start, end, table_row, k_head, v_head,
            stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, offs_d, dmask,
            PAGE, BLOCK_N, DOT_PREC,
        )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + b * stride_pt + heads * stride_ph + s, lse, mask=gmask)
        dst = part_out_ptr + b * stride_pt * HEAD_DIM + heads[:, None] * stride_ph * HEAD_DIM
        tl.store(dst + s * HEAD_DIM + offs_d[None, :], o, mask=omask)
    else:
        o = o * v_scale
        dst = out_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    v_scale,
    num_splits,
    stride_pt,
    stride_ph,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge per-split (out_s, lse_s) of one (sequence, query head): out = sum w_s out_s / sum w_s."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    lse = tl.load(
        part_lse_ptr + b * stride_pt + h * stride_ph + offs_s, mask=smask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [S]
    base = part_out_ptr + (b * stride_pt + h * stride_ph) * HEAD_DIM
    o = tl.load(
        base + offs_s[:, None] * HEAD_DIM + offs_d[None, :],
        mask=smask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    total = tl.sum(w, 0)
    total = tl.where(total == 0.0, 1.0, total)
    res = tl.sum(o * w[:, None], 0) / total * v_scale
    tl.store(
        out_ptr + b * stride_ot + h * stride_oh + offs_d,
        res.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a small "GPU" so the heuristic still exercises split-K


def choose_num_splits(
    batch: int, num_kv_heads: int, max_span: int, num_sms: int, block_n: int = 64
) -> int:
    """How many key ranges each (sequence, KV head) is cut into.

    Enough programs to give every SM ``TARGET_PROGRAMS_PER_SM`` of them, but never a split shorter
    than ``MIN_TOKENS_PER_SPLIT`` keys, never more than ``MAX_SPLITS``. A power of two, so the
    reduction kernel compiles for few shapes. Large batch or short context -> 1 (no reduction pass).
    """
    programs = batch * num_kv_heads
    want = (TARGET_PROGRAMS_PER_SM * num_sms) // max(programs, 1)
    by_len = max(1, max_span // max(MIN_TOKENS_PER_SPLIT, block_n))
    splits = max(1, min(want, by_len, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


def _default_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the main kernel."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 4, 3


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Paged decode attention; returns ``[B, Hq, D]`` in q's dtype.

    ``max_seq_len`` is a host-side upper bound of ``seq_lens`` (no device sync here): it only
    picks the grid (split count); each sequence's key ranges come from its own ``seq_lens`` entry
    on the device, so a larger bound (a CUDA graph captured for every context up to the model's
    length) stays correct. ``num_splits`` and ``config`` (BLOCK_N, num_warps, num_stages) override
    the heuristics (tests, tuning).
    """
    bsz, hq, dim = q.shape
    nb, page, hkv, dk = k_cache.shape
    if dk != dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if page & (page - 1):
        raise ValueError(f"block_size {page} must be a power of two")
    if block_tables.shape[0] != bsz or seq_lens.shape[0] != bsz:
        raise ValueError("block_tables/seq_lens must have one row per query")
    out = torch.empty_like(q) if out is None else out
    if bsz == 0:
        return out
    group = hq // hkv
    block_n, num_warps, num_stages = config or _default_config(dim, q.dtype)
    block_n = max(block_n, 16)
    use_window = sliding_window is not None and sliding_window > 0
    dot_dtype, prec = dot_types(q)
    max_span = max_seq_len if not use_window else min(max_seq_len, sliding_window + block_n)
    if num_splits is None:
        num_splits = choose_num_splits(bsz, hkv, max_span, _sm_count(q.device), block_n)
    num_splits = max(1, min(num_splits, triton.cdiv(max(max_span, 1), block_n)))
    kv_scale_log2 = scale * k_scale * LOG2E
    split = num_splits > 1
    if split:
        part_out = torch.empty(bsz, hq, num_splits, dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = triton.next_power_of_2(dim)
    _decode_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        kv_scale_log2, v_scale, sliding_window or 0, num_sink_tokens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        hq * num_splits, num_splits, 1,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n, USE_WINDOW=use_window, SPLIT=split,
        DOT_PREC=prec, DOT_DTYPE=dot_dtype, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _reduce_kernel[(bsz, hq)](
            part_out, part_lse, out, v_scale, num_splits,
            hq * num_splits, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if dim <= 128 else 8,
        )  # fmt: skip
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch oracle for ``decode_attention`` (float32 math)."""
    out = torch.empty_like(q)
    _, page, hkv, dim = k_cache.shape
    group = q.shape[1] // hkv
    for b, slen in enumerate(seq_lens.tolist()):
        blocks = block_tables[b, : (slen + page - 1) // page].long()
        keys = k_cache[blocks].reshape(-1, hkv, dim)[:slen].float() * k_scale
        vals = v_cache[blocks].reshape(-1, hkv, dim)[:slen].float() * v_scale
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hsd->hs", q[b].float(), keys) * scale
        pos = torch.arange(slen, device=q.device)
        mask = visible_mask(pos[-1:], pos, sliding_window, num_sink_tokens)[0]
        probs = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
        out[b] = torch.einsum("hs,hsd->hd", probs, vals).to(q.dtype)
    return out
