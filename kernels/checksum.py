"""The KV transfer checksum on the device: a position-weighted 64-bit sum, alone or fused into a copy.

Both kernels compute EXACTLY ``workers/kv_handle.py``'s torch reference (``wsum64_reference``): the
buffer's bytes as int32 words ``x_i`` (zero-padded to a multiple of 4 bytes, sign-extended to int64),

    weighted = sum_i (2 * (i // 4096) + 1) * (2 * (i % 4096) + 1) * x_i      (mod 2**64)
    plain    = sum_i x_i                                                      (mod 2**64)

Addition mod 2**64 is order-free, so each program sums its own blocks into two int64 partials and
torch adds the partials afterwards: the result is a ``[2]`` int64 tensor on the device and nothing
here waits for the host (the caller syncs once, for both scalars).

``copy_with_wsum64`` copies ``src`` into ``dst`` in the same pass (one read, one write): the KV
sink receives and checksums at copy bandwidth instead of copying, then re-reading to verify.

    words:  | row 0: 4096 words          | row 1            | ...
    blocks: | b0 | b1 | b2 | b3 (BLOCK)  | b4 | ...          grid-stride: program p takes
            row = b // (4096 // BLOCK), col = (b % (4096 // BLOCK)) * BLOCK + lane   b = p, p+G, ...
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

WSUM_COLS = 4096  # words per weight row (kv_handle's layout; changing it changes every checksum)
_BLOCK = 2048  # words per program iteration (8 KiB, 16-byte vectors per thread); divides WSUM_COLS
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 4  # the interpreter: a few programs still exercise the partial sums


@triton.jit
def _wsum64_kernel(
    src_ptr,
    dst_ptr,
    part_ptr,
    n_words,
    n_blocks,
    COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Grid: (G,). Program p sums blocks p, p+G, ...; writes part[p] (weighted), part[G+p] (plain).
    The tensors may have any dtype: their bytes are read (and written) as int32 words."""
    src = src_ptr.to(tl.pointer_type(tl.int32))
    dst = dst_ptr.to(tl.pointer_type(tl.int32))
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc_w = tl.zeros([BLOCK], dtype=tl.int64)
    acc_p = tl.zeros([BLOCK], dtype=tl.int64)
    per_row = COLS // BLOCK
    for blk in range(pid, n_blocks, nprog):
        b = tl.cast(blk, tl.int64)  # offsets past 2**31 words
        offs = b * BLOCK + lanes
        if EVEN:
            x = tl.load(src + offs)
        else:
            mask = offs < n_words
            x = tl.load(src + offs, mask=mask, other=0)
        if COPY:
            if EVEN:
                tl.store(dst + offs, x)
            else:
                tl.store(dst + offs, x, mask=mask)
        xs = x.to(tl.int64)  # sign-extended
        row_w = (b // per_row) * 2 + 1
        col_w = ((b % per_row).to(tl.int32) * BLOCK + lanes) * 2 + 1  # < 2 * COLS: int32 suffices
        acc_w += xs * (col_w.to(tl.int64) * row_w)  # wraps mod 2**64, like the reference
        acc_p += xs
    tl.store(part_ptr + pid, tl.sum(acc_w, axis=0))
    tl.store(part_ptr + nprog + pid, tl.sum(acc_p, axis=0))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(n_blocks: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(n_blocks, _CPU_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_blocks, _sm_count(index) * _PROGRAMS_PER_SM))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tail_sums(raw: torch.Tensor, n_words: int) -> torch.Tensor:
    """(weighted, plain) of the bytes past the last full word, zero-padded into word ``n_words``."""
    word = torch.zeros(4, dtype=torch.uint8, device=raw.device)
    tail = raw[n_words * 4 :]
    word[: tail.numel()] = tail
    x = word.view(torch.int32).to(torch.int64)  # [1]
    weight = (2 * (n_words // WSUM_COLS) + 1) * (2 * (n_words % WSUM_COLS) + 1)
    return torch.cat([x * weight, x])


_PLAIN_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + (torch.float16, torch.bfloat16, torch.float32, torch.float64)
)


def _kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """fp8/bool and other exotic dtypes go in as bytes (no Triton pointer type needed for them)."""
    return t if t.dtype in _PLAIN_DTYPES else t.view(torch.uint8)


def _launch(src: torch.Tensor, dst: torch.Tensor | None, n_words: int) -> torch.Tensor:
    """``[2]`` sums of the first ``n_words`` words of contiguous, 4-byte aligned ``src`` (copied
    into ``dst`` when given): no views needed, the kernel reads the bytes through int32 pointers."""
    if n_words == 0:
        return torch.zeros(2, dtype=torch.int64, device=src.device)
    n_blocks = triton.cdiv(n_words, _BLOCK)
    grid = _num_programs(n_blocks, src.device)
    parts = torch.empty(2, grid, dtype=torch.int64, device=src.device)
    copy = dst is not None
    with torch.cuda.device(src.device) if src.is_cuda else nullcontext():
        _wsum64_kernel[(grid,)](
            _kernel_arg(src), _kernel_arg(dst if dst is not None else src), parts, n_words,
            n_blocks,
            COLS=WSUM_COLS, BLOCK=_BLOCK, COPY=copy, EVEN=n_words % _BLOCK == 0, num_warps=8,
        )  # fmt: skip
    return parts.sum(dim=1)  # int64 sums wrap mod 2**64


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def wsum64(buffer: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 (weighted, plain) of ``buffer``'s bytes, on its device (no host sync)."""
    buf = buffer.detach().contiguous()
    if buf.data_ptr() % 4:  # a byte view off the 4-byte grid: checksum an aligned copy
        buf = buf.clone()
    nbytes = _nbytes(buf)
    sums = _launch(buf, None, nbytes // 4)
    if nbytes % 4:
        sums = sums + _tail_sums(_flat_bytes(buf), nbytes // 4)
    return sums


def copy_with_wsum64(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy ``src``'s bytes into ``dst`` (same byte count, any dtypes/shapes, both contiguous) and
    return their ``wsum64`` from the same pass; no host sync (the sums are ready when the copy is)."""
    if not src.is_contiguous() or not dst.is_contiguous():
        raise ValueError("src and dst must be contiguous")
    nbytes = _nbytes(src)
    if nbytes != _nbytes(dst):
        raise ValueError(f"src has {nbytes} bytes, dst {_nbytes(dst)}")
    if src.data_ptr() % 4 or dst.data_ptr() % 4 or src.device != dst.device:
        # misaligned byte views or two devices (peer memory): a plain copy, then checksum it
        _flat_bytes(dst).copy_(_flat_bytes(src.detach()))
        return wsum64(dst)
    sums = _launch(src.detach(), dst, nbytes // 4)
    if nbytes % 4:
        s, d = _flat_bytes(src.detach()), _flat_bytes(dst)
        d[(nbytes // 4) * 4 :] = s[(nbytes // 4) * 4 :]
        sums = sums + _tail_sums(s, nbytes // 4)
    return sums
