"""Paged prefill/extend attention: a chunk of new queries per sequence over its paged KV, one launch.

Contract: ``q [T, Hq, D]`` packs the new tokens of B sequences (``query_start_loc [B+1]``); sequence
b's new tokens sit at positions ``seq_lens[b] - qlen_b .. seq_lens[b] - 1``. Their K/V are already in
the cache (the backend writes first), so every key, cached prefix and the chunk itself alike, is read
through ``block_tables``. This covers full prefill, chunked prefill, prefix-cache hits and decodes
mixed into the same step (a decode is a chunk of one).

Grid: ``(cdiv(max_query_len, BLOCK_M), B, Hq)``. A program takes BLOCK_M queries of one head and walks
key tiles from the window start of its first query to its last query's position::

    keys:   [sinks) ... [lo ............ ctx ...... ctx + (m+1)*BLOCK_M)
    queries of tile m:                   ^ ctx + m*BLOCK_M
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from baton.kernels.attention import visible_mask
from baton.kernels.cache_ops import dot_types

LOG2E = 1.4426950408889634


@triton.jit
def _extend_tile(
    q,
    acc,
    m_i,
    l_i,
    n0,
    lo,
    seq_len,
    q_pos,
    sliding_window,
    num_sinks,
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
    USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nvalid = (offs_n >= lo) & (offs_n < seq_len)
    page = tl.load(table_row + offs_n // PAGE, mask=offs_n < seq_len, other=0).to(tl.int64)
    tok = offs_n % PAGE
    kmask = nvalid[:, None] & dmask[None, :]
    k = tl.load(
        k_head + (page * stride_kb + tok * stride_kt)[:, None] + offs_d[None, :],
        mask=kmask,
        other=0.0,
    )
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC, out_dtype=tl.float32)
    qk = qk * scale_log2  # [M, N]
    vis = nvalid[None, :] & (offs_n[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        in_win = (offs_n[None, :] > q_pos[:, None] - sliding_window) | (offs_n[None, :] < num_sinks)
        vis = vis & in_win
    qk = tl.where(vis, qk, float("-inf"))
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
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    mt = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    qlen = tl.load(query_start_ptr + b + 1) - q_start
    if mt * BLOCK_M < qlen:
        seq_len = tl.load(seq_lens_ptr + b)
        ctx = seq_len - qlen
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < qlen
        dmask = offs_d < HEAD_DIM
        q_pos = ctx + offs_m
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=mmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        kvh = h // GROUP
        table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        k_head = k_cache_ptr + kvh * stride_kh
        v_head = v_cache_ptr + kvh * stride_vh
        hi = tl.minimum(seq_len, ctx + (mt + 1) * BLOCK_M)
        lo = 0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if USE_WINDOW:
            lo = tl.maximum(ctx + mt * BLOCK_M - sliding_window + 1, 0)
            sink_end = tl.minimum(num_sinks, lo)
            for n0 in range(0, sink_end, BLOCK_N):
                acc, m_i, l_i = _extend_tile(
                    q, acc, m_i, l_i, n0, 0, sink_end, q_pos, sliding_window, num_sinks,
                    table_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
                    scale_log2, offs_d, dmask, PAGE, BLOCK_N, False, DOT_PREC,
                )  # fmt: skip
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            acc, m_i, l_i = _extend_tile(
                q, acc, m_i, l_i, n0, lo, seq_len, q_pos, sliding_window, num_sinks,
                table_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
                scale_log2, offs_d, dmask, PAGE, BLOCK_N, USE_WINDOW, DOT_PREC,
            )  # fmt: skip
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None] * v_scale
        dst = out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def _default_config(
    head_dim: int, dtype: torch.dtype, max_query_len: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 32, 4, 2
    if max_query_len <= 16:
        return 16, 64, 4, 3
    if max_query_len <= 64:
        return 64, 64, 4, 3
    return 128, 32, 4, 3  # H100 sweep: +6-10 % over (64, 64) on prefill and 512-token chunks


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Causal attention of packed new queries over paged KV; returns ``[T, Hq, D]`` in q's dtype.

    ``max_query_len`` is the host-side longest chunk (sizes the grid without a device sync).
    """
    num_tokens, hq, dim = q.shape
    _, page, hkv, dk = k_cache.shape
    bsz = seq_lens.shape[0]
    if dk != dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if page & (page - 1):
        raise ValueError(f"block_size {page} must be a power of two")
    if query_start_loc.shape[0] != bsz + 1 or block_tables.shape[0] != bsz:
        raise ValueError("query_start_loc needs B+1 entries and block_tables B rows")
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0 or bsz == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or _default_config(dim, q.dtype, max_query_len)
    use_window = sliding_window is not None and sliding_window > 0
    dot_dtype, prec = dot_types(q)
    grid = (triton.cdiv(max_query_len, block_m), bsz, hq)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * k_scale * LOG2E, v_scale, sliding_window or 0, num_sink_tokens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, USE_WINDOW=use_window,
        DOT_PREC=prec, DOT_DTYPE=dot_dtype,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def extend_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch oracle for ``extend_attention`` (float32 math)."""
    out = torch.empty_like(q)
    _, page, hkv, dim = k_cache.shape
    group = q.shape[1] // hkv
    qsl = query_start_loc.tolist()
    for b, slen in enumerate(seq_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        blocks = block_tables[b, : (slen + page - 1) // page].long()
        keys = k_cache[blocks].reshape(-1, hkv, dim)[:slen].float() * k_scale
        vals = v_cache[blocks].reshape(-1, hkv, dim)[:slen].float() * v_scale
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[start:end].float().transpose(0, 1)  # [Hq, Q, D]
        scores = torch.matmul(qs, keys.transpose(1, 2)) * scale  # [Hq, Q, S]
        q_pos = torch.arange(slen - (end - start), slen, device=q.device)
        mask = visible_mask(
            q_pos, torch.arange(slen, device=q.device), sliding_window, num_sink_tokens
        )
        probs = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
        out[start:end] = torch.matmul(probs, vals).transpose(0, 1).to(q.dtype)
    return out
