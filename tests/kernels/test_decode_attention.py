"""Paged decode kernel vs its torch reference: GQA ratios, block sizes, ragged lengths, split-K,
sliding window + sinks, fp8 KV. Tolerances per dtype in kv_cases.ATOL."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.decode_attention import (
    MAX_SPLITS,
    choose_num_splits,
    decode_attention,
    decode_attention_reference,
)
from kv_cases import FP8, assert_close, kernel_device, make_paged

# 1-token, exact block multiples (16, 64) and ragged lengths in one batch.
LENS = [1, 16, 37, 64, 100]


def _run(
    lens, hq, hkv, dim, bs, dtype, kv_dtype=None, splits=None, window=None, sinks=0, kv_scale=1.0,
    bound=None,
):  # fmt: skip
    dev = kernel_device()
    kv_dtype = kv_dtype or dtype
    kv = make_paged(lens, hkv, dim, bs, kv_dtype, dev, kv_scale=kv_scale)
    q = torch.randn(len(lens), hq, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = q.to(dev)
    kw = dict(sliding_window=window, num_sink_tokens=sinks, k_scale=kv_scale, v_scale=kv_scale)
    out = decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, dim**-0.5,
        max_seq_len=bound or max(lens), num_splits=splits, **kw,
    )  # fmt: skip
    ref = decode_attention_reference(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, dim**-0.5, **kw
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "hq,hkv", [(4, 4), (4, 2), (8, 2), (4, 1)], ids=["mha", "gqa2", "gqa4", "mqa"]
)
@pytest.mark.parametrize("bs", [16, 32])
def test_gqa_ratios_and_block_sizes(hq, hkv, bs):
    _run(LENS, hq, hkv, 64, bs, torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_split_k_matches_single_pass(splits):
    """Forced splits, including more splits than a short sequence has tiles (empty splits)."""
    _run([1, 70, 300], 8, 2, 64, 16, torch.float32, splits=splits)


@pytest.mark.parametrize("window,sinks", [(None, 0), (40, 4)])
def test_grid_for_a_longer_context(window, sinks):
    """``max_seq_len`` only bounds the lengths (a CUDA graph is captured once for the model's whole
    context): the heuristic's many splits are cut from each sequence's own length on the device."""
    _run([1, 70, 300], 8, 2, 64, 16, torch.float32, bound=8192, window=window, sinks=sinks)
    _run([1, 70, 300], 8, 2, 64, 16, torch.float32, splits=16, bound=8192)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    _run(LENS, 8, 2, 64, 16, dtype, splits=2)


@pytest.mark.parametrize("dim", [128, 256])
def test_head_dims(dim):
    _run([1, 33, 80], 4, 2, dim, 16, torch.float32, splits=2)


@pytest.mark.parametrize("window,sinks,splits", [(8, 0, 1), (20, 4, 1), (33, 4, 4), (64, 2, 2)])
def test_sliding_window_and_sinks(window, sinks, splits):
    _run(
        [1, 5, 21, 64, 150], 4, 2, 64, 16, torch.float32, window=window, sinks=sinks, splits=splits
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kv_with_scales(dtype):
    _run(LENS, 8, 2, 64, 16, dtype, kv_dtype=FP8, splits=2, kv_scale=0.5)


def test_fp8_matches_unquantized_closely():
    """fp8 KV is a quantisation of the real KV: the output moves by about e4m3's relative step."""
    dev = kernel_device()
    lens = [40, 90]
    kv = make_paged(lens, 2, 64, 16, torch.float32, dev)
    kq = (kv.k_cache / 0.25).to(FP8)
    vq = (kv.v_cache / 0.25).to(FP8)
    q = torch.randn(2, 4, 64, device=dev)
    args = (kv.block_tables, kv.seq_lens, 0.125)
    full = decode_attention(q, kv.k_cache, kv.v_cache, *args, max_seq_len=90)
    quant = decode_attention(q, kq, vq, *args, max_seq_len=90, k_scale=0.25, v_scale=0.25)
    assert (full - quant).abs().max().item() < 0.1
    assert not torch.equal(full, quant)


def test_split_heuristic_shapes():
    sms = 132
    # long context, one sequence: split until the GPU is full
    assert choose_num_splits(1, 8, 32768, sms) == 64 == MAX_SPLITS
    # big batch: enough programs already, no reduction pass
    assert choose_num_splits(256, 8, 4096, sms) == 1
    assert choose_num_splits(64, 8, 4096, sms) == 1
    # short context, few programs: split down to one 64-key tile, never thinner
    assert choose_num_splits(1, 8, 512, sms) == 8
    assert choose_num_splits(1, 8, 100, sms) == 1
    assert choose_num_splits(16, 8, 512, sms) == 4
    s = choose_num_splits(16, 8, 16384, sms)
    assert s in (4, 8) and s & (s - 1) == 0


def test_rejects_bad_shapes():
    dev = kernel_device()
    kv = make_paged([4], 3, 64, 16, torch.float32, dev)
    q = torch.randn(1, 4, 64, device=dev)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0, max_seq_len=4
        )
