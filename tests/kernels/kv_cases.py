"""Random paged-KV cases shared by the kernel tests (small shapes: the interpreter is slow)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

FP8 = torch.float8_e4m3fn
# Max abs error allowed against the float32 torch reference, by query/output dtype.
ATOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def kernel_device() -> torch.device:
    """CUDA when there is one (and no interpreter asked for), else CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    return torch.device("cpu")


@dataclass(frozen=True)
class PagedKV:
    k_cache: torch.Tensor  # [N, bs, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    tables: list[list[int]]
    seq_lens: torch.Tensor  # [B] int32


def make_paged(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    kv_dtype: torch.dtype,
    device: torch.device,
    kv_scale: float = 1.0,
    seed: int = 0,
) -> PagedKV:
    """Filled cache whose blocks are shuffled (block 0 left unused, as padding points there)."""
    gen = torch.Generator().manual_seed(seed)
    need = sum((s + block_size - 1) // block_size for s in seq_lens)
    num_blocks = need + 3
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, i = [], 0
    for s in seq_lens:
        n = (s + block_size - 1) // block_size
        tables.append(perm[i : i + n])
        i += n
    width = max(len(t) for t in tables) or 1
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen) * kv_scale
    v = torch.randn(shape, generator=gen) * kv_scale
    if kv_dtype == FP8:
        k, v = (k / kv_scale).to(FP8), (v / kv_scale).to(FP8)
    return PagedKV(
        k_cache=k.to(kv_dtype).to(device),
        v_cache=v.to(kv_dtype).to(device),
        block_tables=padded.to(device),
        tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err:.3g} > {ATOL[dtype]:.1g} ({dtype})"
