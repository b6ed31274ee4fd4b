"""TritonBackend vs TorchReferenceBackend through the attention seam: decode-only steps, prefill,
and mixed steps (prefill chunks + decodes in one call), including the cache they leave behind."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.attention import (
    AttentionMetadata,
    LayerAttentionParams,
    TorchReferenceBackend,
    get_backend,
)
from kv_cases import ATOL, FP8, kernel_device


def _step(qlens, slens, dtype, kv_dtype, params, bs=16, hq=8, hkv=2, dim=64):
    dev = kernel_device()
    gen = torch.Generator().manual_seed(5)
    nb = sum((s + bs - 1) // bs for s in slens) + 2
    perm = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    tables, i = [], 0
    for s in slens:
        n = (s + bs - 1) // bs
        tables.append(perm[i : i + n])
        i += n
    meta = AttentionMetadata.build(qlens, slens, tables, bs, dev)
    t = sum(qlens)
    q, k, v = (torch.randn(t, h, dim, generator=gen).to(dtype).to(dev) for h in (hq, hkv, hkv))
    cache = torch.randn(2, nb, bs, hkv, dim, generator=gen).to(kv_dtype).to(dev)
    ref_cache = cache.clone()
    out = get_backend("triton").forward(q, k, v, cache[0], cache[1], meta, params)
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache[0], ref_cache[1], meta, params)
    as_bytes = (lambda x: x.view(torch.uint8)) if kv_dtype == FP8 else (lambda x: x)
    assert torch.equal(as_bytes(cache), as_bytes(ref_cache)), "cache writes differ"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= ATOL[dtype], err


@pytest.mark.parametrize(
    "qlens,slens",
    [([1, 1, 1], [1, 16, 77]), ([12, 1, 5, 1], [12, 40, 37, 1]), ([32], [64])],
    ids=["decode", "mixed", "chunk"],
)
def test_backend_matches_reference(qlens, slens):
    _step(qlens, slens, torch.float32, torch.float32, LayerAttentionParams(scale=0.125))


def test_backend_fp8_window_sinks_bf16():
    params = LayerAttentionParams(
        scale=0.125, sliding_window=16, num_sink_tokens=2, k_scale=0.5, v_scale=0.5
    )
    _step([1, 1], [30, 70], torch.bfloat16, FP8, params)
    _step([9, 1], [30, 70], torch.bfloat16, FP8, params)


def test_backend_name():
    assert get_backend("triton").name == "triton"
