"""The Triton wsum64 checksum (alone and fused into a copy) vs kv_handle's torch reference: bit-identical
on random words (negatives included), sizes off the 4096-word rows, odd byte counts and every KV dtype."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.checksum import copy_with_wsum64, wsum64
from baton.workers.kv_handle import ALGO_WSUM, kv_checksum, wsum64_reference, wsum_digest
from kv_cases import FP8, kernel_device

pytestmark = pytest.mark.timeout(120)

# Byte counts: tiny, odd, one word short of / past a 4096-word row, several rows plus a ragged tail.
NBYTES = [1, 3, 4, 7, 4 * 4095, 4 * 4096 + 2, 4 * 2048 * 5 + 4, 4 * 4096 * 3 + 13]


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("nbytes", NBYTES)
def test_wsum64_and_fused_copy_match_reference(nbytes):
    dev = kernel_device()
    src = _random_bytes(nbytes, nbytes).to(dev)
    want = wsum64_reference(src.cpu())
    assert torch.equal(wsum64(src).cpu(), want)
    dst = torch.full_like(src, 0xAB)
    got = copy_with_wsum64(src, dst)
    assert torch.equal(dst, src)  # every byte copied, the ragged tail included
    assert torch.equal(got.cpu(), want)


def test_extreme_words_wrap_like_the_reference():
    dev = kernel_device()
    gen = torch.Generator().manual_seed(1)
    words = torch.randint(-(2**31), 2**31 - 1, (4096 * 40 + 100,), dtype=torch.int32, generator=gen)
    words[4096 * 30 :] = -(2**31)  # large negatives at large weights: the sum leaves int64
    want = wsum64_reference(words)
    assert torch.equal(wsum64(words.to(dev)).cpu(), want)
    exact = sum(
        (2 * (i // 4096) + 1) * (2 * (i % 4096) + 1) * x for i, x in enumerate(words.tolist())
    )
    assert not -(2**63) <= exact < 2**63  # it did wrap, and mod 2**64 it is the exact sum
    assert (want[0].item() - exact) % 2**64 == 0
    assert (want[1].item() - sum(words.tolist())) % 2**64 == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8, torch.uint8, torch.float32])
def test_kv_shaped_views_of_every_dtype(dtype):
    dev = kernel_device()
    # [L, 2, n, bs, H, D] with an odd element count for the 1-byte dtypes
    shape = (2, 2, 3, 16, 3, 33) if dtype.itemsize == 1 else (2, 2, 3, 16, 2, 32)
    raw = _random_bytes(torch.Size(shape).numel() * dtype.itemsize, 7)
    buf = raw.view(dtype).view(shape).to(dev)
    want = wsum64_reference(buf.cpu())
    assert torch.equal(wsum64(buf).cpu(), want)
    dst = torch.empty_like(buf)
    assert torch.equal(copy_with_wsum64(buf, dst).cpu(), want)
    assert torch.equal(dst.view(torch.uint8), buf.view(torch.uint8))
    # the digest the handle carries is the same whichever path made the sums
    digest = wsum_digest(want, buf.numel(), shape)
    assert digest == kv_checksum(buf.cpu(), ALGO_WSUM) == kv_checksum(buf, ALGO_WSUM)


def test_one_flipped_byte_changes_the_fused_sums():
    dev = kernel_device()
    src = _random_bytes(4 * 4096 * 2 + 8, 11).to(dev)
    good = copy_with_wsum64(src, torch.empty_like(src)).cpu()
    for pos in (0, 5, 4 * 4096 + 1, src.numel() - 1):
        bad = src.clone()
        bad[pos] ^= 0x01
        assert not torch.equal(copy_with_wsum64(bad, torch.empty_like(bad)).cpu(), good)


def test_misaligned_and_mismatched_views():
    dev = kernel_device()
    base = _random_bytes(4 * 4096 + 9, 5).to(dev)
    view = base[1:]  # a byte view off the 4-byte grid: checksummed from an aligned copy
    want = wsum64_reference(view.cpu())
    assert torch.equal(wsum64(view).cpu(), want)
    dst = torch.empty(view.numel() + 3, dtype=torch.uint8, device=dev)[3:]
    assert torch.equal(copy_with_wsum64(view, dst).cpu(), want)
    assert torch.equal(dst, view)
    with pytest.raises(ValueError):
        copy_with_wsum64(base, torch.empty(base.numel() - 1, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError):
        copy_with_wsum64(base, torch.empty(2 * base.numel(), dtype=torch.uint8, device=dev)[::2])
