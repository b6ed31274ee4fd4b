"""``KVHandle``: what a prefill worker hands out for a sequence's KV blocks, and the byte checksum both ends use.

The handle describes one contiguous ``[L, 2, n_blocks, block_size, H_kv, D]`` export of the prompt's blocks (the
unit of transfer), who holds it, and until when (``lease_deadline``, wall-clock seconds so that it means the same
in every process). It carries no transport detail: transports add what they need beside it.

Checksums: on CPU, BLAKE2b over the raw bytes. On CUDA, hashing the bytes would need a device-to-host copy of the
whole buffer, so position-weighted word sums are computed on the device. ``wsum32x2`` (the CUDA default) reads
the bytes as int32 words ``x_i`` and takes ``sum (2i+1) * x_i`` and ``sum x_i``, both mod 2**32: int32
arithmetic only, so the Triton kernel runs at copy bandwidth. The weights are odd, hence invertible mod 2**32,
so any single corrupted 32-bit word changes the weighted sum (and the plain one). Its checksum string is the
two sums themselves (16 hex digits; shape and dtype are checked beside it), so a receiver can compare on the
device without a host round trip (cuda_ipc's verified copy). Older handles still verify: ``wsum32x2+blake2b``
(the same sums hashed with BLAKE2b together with numel and shape) and ``wsum64`` (64-bit sums, hashed).
The algorithm is named in the handle, so the receiver verifies with the sender's algorithm whatever its own
device. On CUDA each sum is one Triton pass (``baton.kernels.checksum``, also fused into the cuda_ipc sink's
copy); ``wsum32x2_reference`` / ``wsum64_reference`` here are their plain-torch references and the CPU path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

KV_LAYOUT = "L,2,blocks,block_size,kv_heads,head_dim"
ALGO_BLAKE2B = "blake2b"
ALGO_WSUM = "wsum64+blake2b"  # handles made before wsum32x2: still verified
ALGO_WSUM32 = "wsum32x2"  # the CUDA default: the checksum is the two sums, in hex
ALGO_WSUM32_B2 = "wsum32x2+blake2b"  # handles made before the sums travelled in the clear
_WSUM_COLS = 4096
_MASK32 = 0xFFFFFFFF
_REF_CHUNK = 1 << 22  # words per reference step (bounds its int64 temporaries to 32 MiB each)

# Where a prefill role gathers an export: (shape, dtype) -> (a buffer to export into, the callable that
# frees it), or None to allocate as usual. A transport passes one in (cuda_ipc's pre-shared arena), so
# workers/ never sees the transport itself.
ExportAlloc = Callable[
    [tuple[int, ...], torch.dtype], "tuple[torch.Tensor, Callable[[], None]] | None"
]


@dataclass(frozen=True)
class KVHandle:
    worker_id: str
    request_id: str
    block_ids: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    layout: str
    checksum: str
    checksum_algo: str
    lease_deadline: float  # time.time() seconds; the holder frees the blocks after it
    num_prompt_tokens: int
    num_cached_tokens: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch_dtype(self.dtype).itemsize


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown KV dtype {name!r}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_algo(buffer: torch.Tensor) -> str:
    return ALGO_WSUM32 if buffer.device.type == "cuda" else ALGO_BLAKE2B


def _as_words(buffer: torch.Tensor) -> torch.Tensor:
    """The buffer's bytes as int32 words (zero-padded to a multiple of 4 bytes)."""
    raw = buffer.contiguous().view(torch.uint8).reshape(-1)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    elif raw.storage_offset() % 4:  # a byte view off the 4-byte grid
        raw = raw.clone()
    return raw.view(torch.int32)


def wsum64_reference(buffer: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 (weighted, plain) word sums of the buffer's bytes in plain torch: the
    reference of ``baton.kernels.checksum.wsum64`` (used on CPU and by the tests)."""
    words = _as_words(buffer.detach())
    pad = (-words.numel()) % _WSUM_COLS
    if pad:
        words = torch.cat([words, words.new_zeros(pad)])
    grid = words.view(-1, _WSUM_COLS).to(torch.int64)  # [rows, C]
    col_w = torch.arange(_WSUM_COLS, device=grid.device, dtype=torch.int64) * 2 + 1  # odd
    row_w = torch.arange(grid.shape[0], device=grid.device, dtype=torch.int64) * 2 + 1
    weighted = ((grid * col_w).sum(1) * row_w).sum()  # wraps mod 2**64: still odd-weighted
    return torch.stack([weighted, grid.sum()])


def wsum32x2_reference(buffer: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 (weighted, plain) in ``[0, 2**32)``: the buffer's bytes as int32 words ``x_i``,
    ``sum (2i+1) * x_i`` and ``sum x_i`` mod 2**32, in plain torch: the reference of
    ``baton.kernels.checksum.wsum32x2`` (used on CPU and by the tests). int64 sums wrap mod 2**64,
    which keeps them exact mod 2**32."""
    words = _as_words(buffer.detach())
    acc = torch.zeros(2, dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _REF_CHUNK):
        x = words[start : start + _REF_CHUNK].to(torch.int64)
        w = torch.arange(start, start + x.numel(), device=x.device, dtype=torch.int64) * 2 + 1
        acc = acc + torch.stack([(x * w).sum(), x.sum()])
    return acc & _MASK32


def wsum32_fold(parts: torch.Tensor) -> tuple[int, int]:
    """(weighted, plain) mod 2**32 from ``wsum32x2``'s ``[2, G]`` partials (or the reference's
    ``[2]``): brings them to the host (the only host sync) and adds them there."""
    host = parts.cpu().numpy().reshape(2, -1).astype("int64")  # G < 2**31 terms below 2**32
    w, p = host.sum(axis=1).tolist()
    return w & _MASK32, p & _MASK32


def wsum32_digest(parts: torch.Tensor, numel: int, shape: tuple[int, ...]) -> str:
    """The ``ALGO_WSUM32`` checksum from the partials: the two sums as 16 hex digits (``numel``
    and ``shape`` are unused: the handle carries them, and ``verify`` checks them)."""
    w, p = wsum32_fold(parts)
    return f"{w:08x}{p:08x}"


def wsum32_b2_digest(parts: torch.Tensor, numel: int, shape: tuple[int, ...]) -> str:
    """The ``ALGO_WSUM32_B2`` checksum (older handles): the sums hashed with numel and shape."""
    w, p = wsum32_fold(parts)
    tag = f"w32:{w}:{p}:{numel}:{tuple(shape)}"
    return hashlib.blake2b(tag.encode(), digest_size=16).hexdigest()


def wsum32_expected(checksum: str) -> tuple[int, int] | None:
    """An ``ALGO_WSUM32`` checksum's (weighted, plain) sums as signed int32 values (what a device
    comparison takes), or None when the string is not 16 hex digits."""
    if len(checksum) != 16:
        return None
    try:
        w, p = int(checksum[:8], 16), int(checksum[8:], 16)
    except ValueError:
        return None
    return w - ((w >> 31) << 32), p - ((p >> 31) << 32)


def wsum_digest(sums: torch.Tensor, numel: int, shape: tuple[int, ...]) -> str:
    """The ``ALGO_WSUM`` (wsum64) checksum from the ``[2]`` sums of a tensor with ``numel``/``shape``."""
    pair = sums.cpu().tolist()  # the only host sync
    tag = f"{pair[0]}:{pair[1]}:{numel}:{tuple(shape)}"
    return hashlib.blake2b(tag.encode(), digest_size=16).hexdigest()


@torch.inference_mode()
def kv_checksum(buffer: torch.Tensor, algo: str | None = None) -> str:
    """Checksum of the buffer's bytes (see the module docstring for the algorithms)."""
    algo = algo or default_algo(buffer)
    if algo == ALGO_BLAKE2B:
        data = buffer.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
        return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()
    cuda = buffer.device.type == "cuda"
    shape = tuple(buffer.shape)
    if algo in (ALGO_WSUM32, ALGO_WSUM32_B2):
        digest = wsum32_digest if algo == ALGO_WSUM32 else wsum32_b2_digest
        if cuda:  # one pass over the bytes (Triton)
            from baton.kernels.checksum import wsum32x2

            return digest(wsum32x2(buffer), buffer.numel(), shape)
        return digest(wsum32x2_reference(buffer), buffer.numel(), shape)
    if algo == ALGO_WSUM:
        if cuda:
            from baton.kernels.checksum import wsum64

            return wsum_digest(wsum64(buffer), buffer.numel(), shape)
        return wsum_digest(wsum64_reference(buffer), buffer.numel(), shape)
    raise ValueError(f"unknown checksum algorithm {algo!r}")


def verify(handle: KVHandle, buffer: torch.Tensor) -> bool:
    """True when ``buffer`` has the handle's shape, dtype and bytes."""
    if tuple(buffer.shape) != tuple(handle.shape) or dtype_name(buffer.dtype) != handle.dtype:
        return False
    return kv_checksum(buffer, handle.checksum_algo) == handle.checksum
