"""KV cache write (with fp8 quantisation) and block gather/scatter vs their torch references."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.cache_ops import (
    gather_kv_blocks,
    gather_kv_blocks_reference,
    reshape_and_cache,
    reshape_and_cache_reference,
    scatter_kv_blocks,
    scatter_kv_blocks_reference,
)
from kv_cases import FP8, kernel_device


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize(
    "kv_dtype,heads,dim",
    [(torch.float32, 2, 64), (torch.bfloat16, 3, 64), (FP8, 2, 128)],
    ids=["fp32", "bf16-3heads", "fp8"],
)
def test_reshape_and_cache_matches_reference(kv_dtype, heads, dim):
    dev = kernel_device()
    gen = torch.Generator().manual_seed(3)
    nb, bs, t = 6, 16, 21
    src_dtype = torch.bfloat16 if kv_dtype != torch.float32 else torch.float32
    k = (torch.randn(t, heads, dim, generator=gen) * 3).to(src_dtype).to(dev)
    v = torch.randn(t, heads, dim, generator=gen).to(src_dtype).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:t].to(dev)
    slots[5] = -1  # padding row: skipped
    caches = [torch.zeros(nb, bs, heads, dim, device=dev).to(kv_dtype) for _ in range(4)]
    reshape_and_cache(k, v, caches[0], caches[1], slots, k_scale=0.5, v_scale=2.0)
    reshape_and_cache_reference(k, v, caches[2], caches[3], slots, k_scale=0.5, v_scale=2.0)
    assert torch.equal(_bytes(caches[0]), _bytes(caches[2]))
    assert torch.equal(_bytes(caches[1]), _bytes(caches[3]))
    assert caches[0].float().abs().sum() > 0


def test_fp8_rounding_is_nearest_even_and_saturates():
    dev = kernel_device()
    vals = torch.tensor(
        [1.9, 1.95, 0.49, 7.9, 1.0625, 1.1875, -3.3, 0.001, 500.0, -1000.0, -1e-4, 0.0037, -0.01]
    )
    k = vals.view(-1, 1, 1).expand(-1, 1, 16).contiguous().to(dev)
    kc = torch.zeros(1, 16, 1, 16, device=dev).to(FP8)
    vc = kc.clone()
    reshape_and_cache(k, k, kc, vc, torch.arange(len(vals), device=dev))
    got = kc[0, : len(vals), 0, 0].cpu().view(torch.uint8)
    want = vals.clamp(-448, 448).to(FP8).view(torch.uint8)  # bytes: -0.0 must stay -0.0
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_gather_scatter_roundtrip(dtype):
    dev = kernel_device()
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 2, 9, 16, 2, 8, generator=gen).to(dtype).to(dev)
    ids = torch.tensor([7, 2, 5], dtype=torch.int32, device=dev)
    packed = gather_kv_blocks(cache, ids)
    assert packed.shape == (2, 2, 3, 16, 2, 8) and packed.is_contiguous()
    assert torch.equal(_bytes(packed), _bytes(gather_kv_blocks_reference(cache, ids)))
    dst = torch.zeros_like(cache.float()).to(dtype)
    dst_ref = dst.clone()
    new_ids = torch.tensor([0, 8, 3], dtype=torch.int64, device=dev)
    scatter_kv_blocks(packed, dst, new_ids)
    scatter_kv_blocks_reference(packed, dst_ref, new_ids)
    assert torch.equal(_bytes(dst), _bytes(dst_ref))
    assert torch.equal(_bytes(dst[:, :, 8]), _bytes(cache[:, :, 2]))
    assert _bytes(dst[:, :, 1]).float().abs().sum() == 0  # untouched blocks stay untouched


def test_gather_rejects_wrong_layout():
    dev = kernel_device()
    with pytest.raises(ValueError, match="L, 2"):
        gather_kv_blocks(torch.zeros(2, 3, 4, 16, 2, 8, device=dev), torch.tensor([0], device=dev))
