"""KV cache writes and block packing for transfer, in Triton, each with a plain-torch reference.

- ``reshape_and_cache``: scatter the step's new K/V rows ``[T, Hkv, D]`` into the paged cache at
  ``slot_mapping[t] = block_id * block_size + offset`` (a negative slot skips the row: padding).
  When the cache is ``float8_e4m3fn`` the rows are quantised on the way in: ``stored = real / scale``.
- ``gather_kv_blocks``: ``kv_cache [L, 2, N, bs, H, D]`` + ``block_ids [n]`` -> one contiguous
  ``[L, 2, n, bs, H, D]`` buffer (what the KV transfer plane ships); ``scatter_kv_blocks`` is its
  inverse on the receiving side. Both copy raw bytes, so every cache dtype (fp8 included) works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
_COPY_BLOCK = 1024
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_types(q: torch.Tensor) -> tuple[tl.dtype, str]:
    """(operand dtype, input_precision) of the attention ``tl.dot``s for queries ``q``.

    fp32 models get IEEE fp32 dots (tf32 would break token-exactness). On CPU the interpreter
    multiplies bf16 operands as raw uint16 (triton 3.9), so there everything is computed in fp32.
    """
    if q.dtype == torch.float32 or q.device.type != "cuda":
        return tl.float32, "ieee"
    return _TL_DTYPES[q.dtype], "tf32"


@triton.jit
def _round_to_e4m3(x):
    """Round fp32 to the nearest-even e4m3 value (saturating at +-448), still as fp32.

    The cast that follows is then exact. Done by hand because triton's interpreter drops the
    carry into the exponent (1.95 -> 1.0); on GPU it is a few ALU ops in a memory-bound kernel.
    """
    ax = tl.minimum(tl.abs(x), 448.0)
    expo = ((ax.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    expo = tl.maximum(expo, -6)  # below 2^-6 the e4m3 grid is uniform (subnormals), step 2^-9
    # Powers of two built from their bits: exact on GPU too (ex2.approx and div.full are not).
    step = ((expo - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - expo + 3) << 23).to(tl.float32, bitcast=True)
    y = ax * inv_step
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
    # Copy x's sign bit (Triton negates as 0 - v, which would turn -0.0 into +0.0).
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return ((r * step).to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    inv_k_scale,
    inv_v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ckb,
    stride_ckt,
    stride_ckh,
    stride_cvb,
    stride_cvt,
    stride_cvh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // PAGE
        off = slot % PAGE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(
            k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask
        )
        v = tl.load(
            v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask
        )
        if QUANT:
            k = _round_to_e4m3(k.to(tl.float32) * inv_k_scale)
            v = _round_to_e4m3(v.to(tl.float32) * inv_v_scale)
        kdst = k_cache_ptr + blk * stride_ckb + off * stride_ckt
        vdst = v_cache_ptr + blk * stride_cvb + off * stride_cvt
        kdst = kdst + offs_h[:, None] * stride_ckh + offs_d[None, :]
        vdst = vdst + offs_h[:, None] * stride_cvh + offs_d[None, :]
        tl.store(kdst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into ``k_cache, v_cache [N, bs, Hkv, D]`` at ``slot_mapping [T]``."""
    num_tokens, heads, dim = k.shape
    _, page, hkv, dk = k_cache.shape
    if (hkv, dk) != (heads, dim) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} does not fit cache {tuple(k_cache.shape)}")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError("slot_mapping needs one slot per token")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("k, v and the caches need a contiguous last dimension")
    if num_tokens == 0:
        return
    quant = k_cache.dtype == FP8_DTYPE
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), PAGE=page, QUANT=quant,
        num_warps=4 if heads * dim >= 1024 else 1,
    )  # fmt: skip


def reshape_and_cache_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Plain-torch ``reshape_and_cache`` (negative slots skipped)."""
    nb, page, h, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k, v = k[keep], v[keep]
    if k_cache.dtype == FP8_DTYPE:
        k, v = k.float() / k_scale, v.float() / v_scale
    kc = _as_words(k_cache).view(nb * page, h, d)
    vc = _as_words(v_cache).view(nb * page, h, d)
    kc.index_copy_(0, slots, _as_words(k.to(k_cache.dtype)))
    vc.index_copy_(0, slots, _as_words(v.to(v_cache.dtype)))


# Block counts vary per request: specialising on them (==1, %16) would compile a new variant on the
# first transfer of each new shape class, in a request's time to first token.
@triton.jit(do_not_specialize=["num_ids", "src_blocks", "dst_blocks"])
def _block_copy_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    num_ids,
    src_blocks,
    dst_blocks,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Copy one chunk of one block of one (layer, k|v) plane. Grid: (L*2, n, chunks)."""
    plane = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    c = tl.program_id(2)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    if GATHER:  # src: cache [L*2, N, numel], dst: packed [L*2, n, numel]
        src = src_ptr + (plane * src_blocks + blk) * BLOCK_NUMEL
        dst = dst_ptr + (plane * dst_blocks + i) * BLOCK_NUMEL
    else:  # src: packed, dst: cache
        src = src_ptr + (plane * src_blocks + i) * BLOCK_NUMEL
        dst = dst_ptr + (plane * dst_blocks + blk) * BLOCK_NUMEL
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as same-width integers, so the copy is dtype-agnostic (fp8 included)."""
    return t.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def _check_cache(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [L, 2, N, bs, H, D], got {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_ids must be a 1-D int32/int64 tensor")


def _launch_copy(
    src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, kv_cache: torch.Tensor, gather: bool
) -> None:
    layers, _, nblocks, page, heads, dim = kv_cache.shape
    numel = page * heads * dim
    n = ids.shape[0]
    if n == 0:
        return
    chunk = min(_COPY_BLOCK, triton.next_power_of_2(numel))
    grid = (layers * 2, n, triton.cdiv(numel, chunk))
    src_blocks, dst_blocks = (nblocks, n) if gather else (n, nblocks)
    _block_copy_kernel[grid](
        _as_words(src), _as_words(dst), ids, n, src_blocks, dst_blocks,
        BLOCK_NUMEL=numel, CHUNK=chunk, GATHER=gather, num_warps=4,
    )  # fmt: skip


def gather_kv_blocks(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Pack ``block_ids`` of every layer into a contiguous ``[L, 2, n, bs, H, D]`` buffer."""
    _check_cache(kv_cache, block_ids)
    layers, _, _, page, heads, dim = kv_cache.shape
    shape = (layers, 2, block_ids.shape[0], page, heads, dim)
    if out is None:
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    elif tuple(out.shape) != shape or out.dtype != kv_cache.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {kv_cache.dtype} tensor")
    _launch_copy(kv_cache, out, block_ids, kv_cache, gather=True)
    return out


def scatter_kv_blocks(
    buffer: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """Unpack a ``gather_kv_blocks`` buffer into ``block_ids`` of ``kv_cache`` (in place)."""
    _check_cache(kv_cache, block_ids)
    layers, _, _, page, heads, dim = kv_cache.shape
    shape = (layers, 2, block_ids.shape[0], page, heads, dim)
    if tuple(buffer.shape) != shape or buffer.dtype != kv_cache.dtype:
        raise ValueError(f"buffer must be {shape} {kv_cache.dtype}, got {tuple(buffer.shape)}")
    _launch_copy(buffer.contiguous(), kv_cache, block_ids, kv_cache, gather=False)


def gather_kv_blocks_reference(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``gather_kv_blocks``."""
    return _as_words(kv_cache).index_select(2, block_ids.long()).view(kv_cache.dtype).contiguous()


def scatter_kv_blocks_reference(
    buffer: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """Plain-torch ``scatter_kv_blocks``."""
    _as_words(kv_cache).index_copy_(2, block_ids.long(), _as_words(buffer))
