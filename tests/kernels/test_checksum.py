"""The Triton checksums (wsum32x2, the default, and wsum64, kept for older handles; alone and fused into
a copy) vs kv_handle's torch references: bit-identical on random words (negatives included), sizes off
the blocks/rows, odd byte counts and every KV dtype; wsum32x2 also against a plain-Python definition."""

from __future__ import annotations

import pytest
import torch
from baton.kernels.checksum import (
    W32_BLOCK,
    VerifiedCopier,
    copy_with_wsum32x2,
    copy_with_wsum64,
    wsum32x2,
    wsum64,
)
from baton.workers.kv_handle import (
    ALGO_WSUM,
    ALGO_WSUM32,
    ALGO_WSUM32_B2,
    default_algo,
    kv_checksum,
    wsum32_digest,
    wsum32_expected,
    wsum32_fold,
    wsum32x2_reference,
    wsum64_reference,
    wsum_digest,
)
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


# -- wsum32x2 ---------------------------------------------------------------------------------------
# Byte counts: tiny, odd, one word short of / past a block, several blocks plus ragged tails.
W32_NBYTES = [0, 1, 3, 4, 7, 4 * (W32_BLOCK - 1), 4 * W32_BLOCK + 2, 4 * W32_BLOCK * 5 + 4]
W32_NBYTES += [4 * W32_BLOCK * 9 + 13, 4 * W32_BLOCK * 6]


def _python_wsum32(raw: torch.Tensor) -> tuple[int, int]:
    """The definition, word by word in Python integers: (sum (2i+1) x_i, sum x_i) mod 2**32."""
    data = bytes(raw.tolist()) + b"\0" * (-raw.numel() % 4)
    words = [int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, len(data), 4)]
    return (
        sum((2 * i + 1) * x for i, x in enumerate(words)) % 2**32,
        sum(words) % 2**32,
    )


@pytest.mark.parametrize("nbytes", W32_NBYTES)
def test_wsum32x2_and_fused_copy_match_reference_and_definition(nbytes):
    dev = kernel_device()
    src = _random_bytes(nbytes, nbytes + 1).to(dev)
    want = _python_wsum32(src.cpu())
    assert tuple(wsum32x2_reference(src.cpu()).tolist()) == want
    parts = wsum32x2(src)
    assert parts.dtype == torch.int32 and parts.shape[0] == 2 and parts.device == src.device
    assert wsum32_fold(parts) == want
    dst = torch.full_like(src, 0xAB)
    assert wsum32_fold(copy_with_wsum32x2(src, dst)) == want
    assert torch.equal(dst, src)  # every byte copied, the ragged tail included


def test_wsum32x2_negative_and_extreme_words_wrap_like_the_reference():
    dev = kernel_device()
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(
        -(2**31), 2**31 - 1, (W32_BLOCK * 7 + 5,), dtype=torch.int32, generator=gen
    )
    words[W32_BLOCK * 4 :] = -(2**31)  # the most negative word at large weights
    words[:100] = 2**31 - 1
    want = wsum32x2_reference(words)
    assert wsum32_fold(wsum32x2(words.to(dev))) == tuple(want.tolist())
    assert tuple(want.tolist()) == _python_wsum32(words.view(torch.uint8))
    assert min(words.tolist()) < 0 and all(0 <= v < 2**32 for v in want.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8, torch.uint8, torch.float32])
def test_wsum32x2_kv_shaped_views_of_every_dtype(dtype):
    dev = kernel_device()
    shape = (2, 2, 3, 16, 3, 33) if dtype.itemsize == 1 else (2, 2, 3, 16, 2, 32)
    raw = _random_bytes(torch.Size(shape).numel() * dtype.itemsize, 9)
    buf = raw.view(dtype).view(shape).to(dev)
    want = wsum32x2_reference(buf.cpu())
    assert wsum32_fold(wsum32x2(buf)) == tuple(want.tolist())
    dst = torch.empty_like(buf)
    parts = copy_with_wsum32x2(buf, dst)
    assert torch.equal(dst.view(torch.uint8), buf.view(torch.uint8))
    digest = wsum32_digest(parts, buf.numel(), shape)
    assert digest == wsum32_digest(want, buf.numel(), shape)
    assert digest == kv_checksum(buf.cpu(), ALGO_WSUM32) == kv_checksum(buf, ALGO_WSUM32)
    assert digest != kv_checksum(buf.cpu(), ALGO_WSUM)  # the algorithms never share a digest


def test_every_single_word_corruption_changes_both_sums():
    dev = kernel_device()
    src = _random_bytes(4 * W32_BLOCK * 2 + 8, 13).to(dev)
    good = wsum32_fold(copy_with_wsum32x2(src, torch.empty_like(src)))
    gen = torch.Generator().manual_seed(5)
    for pos in (0, 5, 4 * W32_BLOCK + 1, src.numel() - 1):
        for delta in (1, 0x80, int(torch.randint(1, 256, (1,), generator=gen))):
            bad = src.clone()
            bad[pos] ^= delta
            w, p = wsum32_fold(copy_with_wsum32x2(bad, torch.empty_like(bad)))
            assert w != good[0] and p != good[1]
    swapped = src.clone()  # two words exchanged: the plain sum cannot see it, the weighted one does
    swapped[0:4], swapped[8:12] = src[8:12].clone(), src[0:4].clone()
    if not torch.equal(swapped, src):
        assert wsum32_fold(wsum32x2(swapped))[0] != good[0]


def test_wsum32x2_misaligned_views_and_default_algo():
    dev = kernel_device()
    base = _random_bytes(4 * W32_BLOCK + 9, 6).to(dev)
    view = base[1:]  # off the 4-byte grid: checksummed from an aligned copy
    want = tuple(wsum32x2_reference(view.cpu()).tolist())
    assert wsum32_fold(wsum32x2(view)) == want
    dst = torch.empty(view.numel() + 3, dtype=torch.uint8, device=dev)[3:]
    assert wsum32_fold(copy_with_wsum32x2(view, dst)) == want and torch.equal(dst, view)
    with pytest.raises(ValueError):
        copy_with_wsum32x2(base, torch.empty(base.numel() - 1, dtype=torch.uint8, device=dev))
    assert default_algo(base.cpu()) == "blake2b"  # CPU buffers hash their bytes
    if base.is_cuda:
        assert default_algo(base) == ALGO_WSUM32


@pytest.mark.parametrize("groups", [16, 3])
@pytest.mark.parametrize("nbytes", [4 * W32_BLOCK * 8, 4 * W32_BLOCK * 4 + 12, 8])
def test_verified_copy_says_match_and_mismatch_on_the_device(nbytes, groups, monkeypatch):
    """The copy compares its own sums with the sender's: a match copies and says so; a wrong
    expected sum or a corrupted source says mismatch; the device state is reset after each launch
    (a good copy after a bad one still matches), with and without a tail block, from an offset.
    ``groups`` 3: the first-level groups of the fold hold several programs, unevenly."""
    from baton.kernels import checksum

    monkeypatch.setattr(checksum, "_GROUPS", groups)
    dev = kernel_device()
    copier = VerifiedCopier(dev, slots=2)
    arena = _random_bytes(nbytes + 64, 21).to(dev)
    src = arena[32 : 32 + nbytes]
    want = wsum32_expected(kv_checksum(src, ALGO_WSUM32))
    assert want is not None
    assert want == wsum32_expected("%08x%08x" % tuple(wsum32x2_reference(src.cpu()).tolist()))
    dst = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)  # any dtype on the far side
    assert copier.copy(arena, dst, nbytes, want, src_offset=32)
    assert torch.equal(dst.view(torch.uint8), src)
    assert not copier.copy(arena, dst, nbytes, (want[0], want[1] ^ 1), src_offset=32)
    bad = arena.clone()
    bad[32 + nbytes - 1] ^= 0x10  # the last byte: the tail block (or the last full one)
    assert not copier.copy(bad, dst, nbytes, want, src_offset=32)
    assert copier.copy(arena, dst, nbytes, want, src_offset=32)
    with pytest.raises(ValueError, match="outside"):
        copier.copy(arena, dst, nbytes, want, src_offset=64 + 4)
    with pytest.raises(ValueError, match="4-byte words"):
        copier.copy(arena, dst, nbytes - 2, want)
    assert len(copier._free) == 2  # every slot came back, failures included


def test_wsum32_checksum_is_its_sums_and_older_handles_still_verify():
    buf = _random_bytes(4 * 1000 + 3, 22)
    w, p = wsum32x2_reference(buf).tolist()
    assert kv_checksum(buf, ALGO_WSUM32) == f"{w:08x}{p:08x}"
    sw, sp = wsum32_expected(kv_checksum(buf, ALGO_WSUM32))
    assert (sw % 2**32, sp % 2**32) == (w, p) and -(2**31) <= min(sw, sp) and max(sw, sp) < 2**31
    old = kv_checksum(buf, ALGO_WSUM32_B2)
    assert len(old) == 32 and old != kv_checksum(buf[:-1], ALGO_WSUM32_B2)
    assert wsum32_expected(old) is None and wsum32_expected("zz" * 8) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verified_copy_direct_launches_and_polled_verdicts_hold_up():
    """GPU: after the first (JIT) launch of each variant, copies go through the compiled kernel's
    launcher and the host reads the verdict the kernel wrote after its system fence, with no
    stream sync: 300 copies of varied sizes and offsets, interleaved with wrong sums, every verdict
    right and every byte copied (a missing fence or a racy fold would show up as a wrong verdict
    or stale bytes here)."""
    copier = VerifiedCopier("cuda", slots=4)
    gen = torch.Generator().manual_seed(31)
    arena = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int32, generator=gen)
    arena = arena.cuda()
    raw = arena.view(torch.uint8)
    for i in range(300):
        words = int(torch.randint(1, 200_000, (1,), generator=gen))
        off = 16 * int(torch.randint(0, 4096, (1,), generator=gen))
        src = raw[off : off + 4 * words]
        want = wsum32_expected(kv_checksum(src, ALGO_WSUM32))
        dst = torch.empty(4 * words, dtype=torch.uint8, device="cuda")
        wrong = i % 7 == 3
        exp = (want[0], want[1] + 1) if wrong else want
        assert copier.copy(raw, dst, 4 * words, exp, src_offset=off) != wrong
        assert torch.equal(dst, src)
        raw[off] ^= 1  # the next copy must see fresh bytes, not a cached verdict
    assert copier.direct_launches >= 290 and copier.stream_syncs == 0
