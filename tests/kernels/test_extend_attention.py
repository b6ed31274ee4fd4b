"""Paged extend kernel vs its torch reference: prefill, chunks over cached prefixes, decodes mixed in,
GQA ratios, block sizes, sliding window + sinks, fp8 KV. Tolerances per dtype in kv_cases.ATOL."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.extend_attention import extend_attention, extend_attention_reference
from kv_cases import FP8, assert_close, kernel_device, make_paged

# (new tokens, context after the step): full prefill, chunk on a block-aligned prefix, a decode,
# a 1-token prompt, a chunk ending exactly on a block boundary, a long chunk over a ragged prefix.
CASES = [(20, 20), (16, 48), (1, 37), (1, 1), (17, 64), (40, 90)]


def _run(
    cases, hq, hkv, dim, bs, dtype, kv_dtype=None, window=None, sinks=0, kv_scale=1.0, cfg=None
):
    dev = kernel_device()
    kv_dtype = kv_dtype or dtype
    qlens = [c[0] for c in cases]
    kv = make_paged([c[1] for c in cases], hkv, dim, bs, kv_dtype, dev, kv_scale=kv_scale)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(qlens), hq, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    q = q.to(dev)
    kw = dict(sliding_window=window, num_sink_tokens=sinks, k_scale=kv_scale, v_scale=kv_scale)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, qsl, dim**-0.5)
    out = extend_attention(*args, max_query_len=max(qlens), config=cfg, **kw)
    ref = extend_attention_reference(*args, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "hq,hkv", [(4, 4), (4, 2), (8, 2), (4, 1)], ids=["mha", "gqa2", "gqa4", "mqa"]
)
def test_gqa_ratios(hq, hkv):
    _run(CASES, hq, hkv, 64, 16, torch.float32)


def test_block_size_32_and_small_tiles():
    """Tiles smaller than a block and queries spanning several tiles."""
    _run(CASES, 4, 2, 64, 32, torch.float32, cfg=(16, 16, 4, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    _run(CASES, 4, 2, 64, 16, dtype)


@pytest.mark.parametrize("window,sinks", [(8, 0), (12, 3)])
def test_sliding_window_and_sinks(window, sinks):
    _run(CASES, 4, 2, 64, 16, torch.float32, window=window, sinks=sinks, cfg=(16, 16, 4, 1))


def test_fp8_kv_and_head_dim_128():
    _run(CASES[:3], 4, 2, 128, 16, torch.bfloat16, kv_dtype=FP8, kv_scale=0.5)
