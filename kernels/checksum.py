"""The KV transfer checksums on the device, alone or fused into a copy (one read, one write).

``wsum32x2`` (the default for CUDA buffers) computes EXACTLY ``workers/kv_handle.py``'s
``wsum32x2_reference``: the buffer's bytes as int32 words ``x_i`` (zero-padded to a multiple of 4
bytes), with int32 arithmetic only, so it runs at copy bandwidth (64-bit multiplies are emulated
on GPUs, which held the older wsum64 kernel to about half of it):

    weighted = sum_i (2 * i + 1) * x_i      (mod 2**32)
    plain    = sum_i x_i                    (mod 2**32)

Addition mod 2**32 is order-free, so each program sums its own contiguous run of blocks into two
int32 partials and returns them as a ``[2, G]`` int32 tensor on the device: no second launch, the
caller folds the partials on the host in the same sync that brings them over (``wsum32_fold``).

    words:   | blk 0 (BLOCK) | blk 1 | ... | blk n_full-1 | tail (< BLOCK, masked) |
    program p: blocks [p * per_prog, (p + 1) * per_prog) ; the last program also takes the tail

``wsum64`` (handles made before wsum32x2) is kept so those handles still verify on the device:

    weighted = sum_i (2 * (i // 4096) + 1) * (2 * (i % 4096) + 1) * x_i    (mod 2**64)
    plain    = sum_i x_i                                                    (mod 2**64)

as a ``[2]`` int64 tensor (reference: ``wsum64_reference``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import triton
import triton.language as tl

WSUM_COLS = 4096  # wsum64: words per weight row (changing it changes every wsum64 checksum)
_BLOCK = 2048  # wsum64: words per program iteration (8 KiB); divides WSUM_COLS
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 4  # the interpreter: a few programs still exercise the partial sums

W32_BLOCK = 2048  # wsum32x2: words per block (8 KiB: 8 words, two 16-byte vectors, per thread)
_W32_WARPS = 8
_W32_PROGRAMS_PER_SM = 32  # many small programs: waves stay full whatever the kernel's occupancy
_MASK32 = 0xFFFFFFFF


# -- wsum32x2 -----------------------------------------------------------------------------------
@triton.jit
def _fence_sys():
    """A system-scope fence (PTX ``fence.sc.sys``): what the thread wrote, and what it acquired,
    is visible to the host before anything it writes next (the verdict the host polls)."""
    tl.inline_asm_elementwise(
        "fence.sc.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


# Sizes vary per transfer: specialising on them (==1, %16) would compile new variants on the first
# transfers of new size classes, on the request's path; they only bound loops and the tail mask.
@triton.jit(do_not_specialize=["n_words", "n_full", "per_prog", "exp_w", "exp_p"])
def _wsum32_kernel(
    src_ptr,
    dst_ptr,
    part_ptr,
    state_ptr,
    flag_ptr,
    n_words,
    n_full,
    per_prog,
    exp_w,
    exp_p,
    BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    TAIL: tl.constexpr,
    VERIFY: tl.constexpr,
    GROUPS: tl.constexpr = 16,
    LINE: tl.constexpr = 32,
    ADD_SEM: tl.constexpr = "relaxed",
    SYS_FENCE: tl.constexpr = False,
):
    """Grid: (G,). Program p sums the full blocks [p * per_prog, (p + 1) * per_prog) (and the last
    program the masked block ``n_full`` when TAIL); writes part[p] (weighted), part[G + p] (plain).
    The tensors may have any dtype: their bytes are read (and written) as int32 words. Every int32
    product and sum wraps mod 2**32, as in the reference.

    VERIFY: no partials; the sums are folded with int32 atomics (they wrap mod 2**32 too) in two
    levels: program p adds its sums into its group's line ``state[(1 + p % GROUPS) * LINE + 0:2]``
    and counts itself at ``+2``; a group's last arrival moves the group's totals into line 0 and
    counts the group there; the last group compares the totals with (exp_w, exp_p) and writes 1
    (match) or 2 (mismatch) to ``flag[0]``. Every line is zeroed by the program that empties it,
    ready for the next launch: the whole verification is on the device, in the copy's own launch.
    The sums go in with relaxed atomics and only the arrival counts are acq_rel: an acq_rel atomic
    is a fence that waits for the program's copy stores to land (H100, 64 MiB: 63-68 us of GPU time
    with every atomic acq_rel, 55-58 us like this, 48 us for cudaMemcpy; 1 or 16 groups measured the
    same; ``bench/checksum_kernel.py --verify-variants``). The count's release orders the
    program's adds before it; its acquire in the last arrival makes every counted add visible to
    the exchange that follows.
    SYS_FENCE (GPU): the verdict is written after a system-scope fence, so a host that sees it
    may use the copy without a stream sync."""
    src = src_ptr.to(tl.pointer_type(tl.int32))
    dst = dst_ptr.to(tl.pointer_type(tl.int32))
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    lane_w = lanes * 2 + 1  # odd
    acc_w = tl.zeros([BLOCK], dtype=tl.int32)
    acc_p = tl.zeros([BLOCK], dtype=tl.int32)
    start = pid * per_prog
    end = tl.minimum(start + per_prog, n_full)
    for blk in range(start, end):  # full blocks: no masks, so the loads stay 16-byte vectors
        b = tl.cast(blk, tl.int64)  # offsets past 2**31 words
        offs = b * BLOCK + lanes
        x = tl.load(src + offs)
        if COPY:
            tl.store(dst + offs, x)
        base = tl.cast(b * (2 * BLOCK), tl.int32)  # 2 * (first word's index) mod 2**32
        acc_w += x * (lane_w + base)
        acc_p += x
    if TAIL:
        if pid == nprog - 1:
            b = tl.cast(n_full, tl.int64)
            offs = b * BLOCK + lanes
            mask = offs < n_words
            x = tl.load(src + offs, mask=mask, other=0)
            if COPY:
                tl.store(dst + offs, x, mask=mask)
            base = tl.cast(b * (2 * BLOCK), tl.int32)
            acc_w += x * (lane_w + base)
            acc_p += x
    sum_w = tl.sum(acc_w, axis=0)
    sum_p = tl.sum(acc_p, axis=0)
    if VERIFY:
        group = pid % GROUPS
        line = state_ptr + (1 + group) * LINE
        tl.atomic_add(line, sum_w, sem=ADD_SEM)
        tl.atomic_add(line + 1, sum_p, sem=ADD_SEM)
        arrived = tl.atomic_add(line + 2, 1)  # acq_rel: orders the two adds before it
        if arrived == (nprog - 1 - group) // GROUPS:  # the group's last member
            group_w = tl.atomic_xchg(line, 0)
            group_p = tl.atomic_xchg(line + 1, 0)
            tl.atomic_xchg(line + 2, 0)
            tl.atomic_add(state_ptr, group_w, sem=ADD_SEM)
            tl.atomic_add(state_ptr + 1, group_p, sem=ADD_SEM)
            groups_in = tl.atomic_add(state_ptr + 2, 1)
            if groups_in == tl.minimum(nprog, GROUPS) - 1:  # the last group
                tot_w = tl.atomic_xchg(state_ptr, 0)
                tot_p = tl.atomic_xchg(state_ptr + 1, 0)
                tl.atomic_xchg(state_ptr + 2, 0)
                match = (tot_w == exp_w) & (tot_p == exp_p)
                if SYS_FENCE:  # every write above (and the copy's, acquired) before the verdict
                    _fence_sys()
                tl.store(flag_ptr, tl.where(match, 1, 2))
    else:
        tl.store(part_ptr + pid, sum_w)
        tl.store(part_ptr + nprog + pid, sum_p)


# -- wsum64 (older handles) ---------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_words", "n_blocks"])
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


# -- shared host-side helpers -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_programs(n_blocks: int, device: torch.device, per_sm: int = _PROGRAMS_PER_SM) -> int:
    if device.type != "cuda":
        return max(1, min(n_blocks, _CPU_PROGRAMS))
    return max(1, min(n_blocks, _sm_count(_device_index(device)) * per_sm))


def _on_device(t: torch.Tensor) -> ContextManager:
    """Triton launches on the current device: switch only when ``t`` lives elsewhere (the switch
    costs more than the check, and the sink's thread normally runs on its own device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return nullcontext()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tail_word(raw: torch.Tensor, n_words: int) -> torch.Tensor:
    """The bytes past the last full word, zero-padded into one word: ``[1]`` int64, sign-extended."""
    word = torch.zeros(4, dtype=torch.uint8, device=raw.device)
    tail = raw[n_words * 4 :]
    word[: tail.numel()] = tail
    return word.view(torch.int32).to(torch.int64)


_PLAIN_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + (torch.float16, torch.bfloat16, torch.float32, torch.float64)
)


def _kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """fp8/bool and other exotic dtypes go in as bytes (no Triton pointer type needed for them)."""
    return t if t.dtype in _PLAIN_DTYPES else t.view(torch.uint8)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _aligned(buffer: torch.Tensor) -> torch.Tensor:
    buf = buffer.detach().contiguous()
    return buf.clone() if buf.data_ptr() % 4 else buf  # a byte view off the 4-byte grid


def _checked_pair(src: torch.Tensor, dst: torch.Tensor) -> int:
    if not src.is_contiguous() or not dst.is_contiguous():
        raise ValueError("src and dst must be contiguous")
    nbytes = _nbytes(src)
    if nbytes != _nbytes(dst):
        raise ValueError(f"src has {nbytes} bytes, dst {_nbytes(dst)}")
    return nbytes


def _fused_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    launch: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor],
    alone: Callable[[torch.Tensor], torch.Tensor],
    tail: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    nbytes = _checked_pair(src, dst)
    if src.data_ptr() % 4 or dst.data_ptr() % 4 or src.device != dst.device:
        # misaligned byte views or two devices (peer memory): a plain copy, then checksum it
        _flat_bytes(dst).copy_(_flat_bytes(src.detach()))
        return alone(dst)
    sums = launch(src.detach(), dst, nbytes // 4)
    if nbytes % 4:
        s, d = _flat_bytes(src.detach()), _flat_bytes(dst)
        d[(nbytes // 4) * 4 :] = s[(nbytes // 4) * 4 :]
        sums = tail(sums, s)
    return sums


# -- wsum32x2 API -------------------------------------------------------------------------------
def _w32_grid(n_words: int, device: torch.device) -> tuple[int, int, int, bool]:
    """(programs, full blocks, full blocks per program, tail block?) for ``n_words`` words."""
    n_full = n_words // W32_BLOCK
    tail = n_words % W32_BLOCK != 0
    grid = _num_programs(n_full, device, _W32_PROGRAMS_PER_SM)
    per_prog = triton.cdiv(n_full, grid) if n_full else 0
    grid = triton.cdiv(n_full, per_prog) if per_prog else 1
    return grid, n_full, per_prog, tail


def _w32_launch(src: torch.Tensor, dst: torch.Tensor | None, n_words: int) -> torch.Tensor:
    """``[2, G]`` int32 partials of the first ``n_words`` words of contiguous, 4-byte aligned
    ``src`` (copied into ``dst`` when given)."""
    grid, n_full, per_prog, tail = _w32_grid(n_words, src.device)
    parts = torch.empty(2, grid, dtype=torch.int32, device=src.device)
    if n_words == 0:
        return parts.zero_()
    with _on_device(src):
        _wsum32_kernel[(grid,)](
            _kernel_arg(src), _kernel_arg(dst if dst is not None else src), parts, parts, parts,
            n_words, n_full, per_prog, 0, 0,
            BLOCK=W32_BLOCK, COPY=dst is not None, TAIL=tail, VERIFY=False, num_warps=_W32_WARPS,
        )  # fmt: skip
    return parts


def _w32_tail(parts: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``parts`` with one more column: the zero-padded word past the last full one, weighted."""
    n_words = raw.numel() // 4
    x = _tail_word(raw, n_words)
    col = torch.cat([x * (2 * n_words + 1), x]) & _MASK32  # [2] int64 in [0, 2**32)
    col = col - ((col >> 31) << 32)  # as signed int32 values (same residues mod 2**32)
    return torch.cat([parts, col.to(torch.int32).view(2, 1)], dim=1)


def wsum32x2(buffer: torch.Tensor) -> torch.Tensor:
    """``[2, G]`` int32 partials (weighted, plain) of ``buffer``'s bytes, on its device, no host
    sync: ``wsum32_fold`` (kv_handle) turns them into the two sums mod 2**32."""
    buf = _aligned(buffer)
    nbytes = _nbytes(buf)
    parts = _w32_launch(buf, None, nbytes // 4)
    return _w32_tail(parts, _flat_bytes(buf)) if nbytes % 4 else parts


def copy_with_wsum32x2(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy ``src``'s bytes into ``dst`` (same byte count, any dtypes/shapes, both contiguous) and
    return their ``wsum32x2`` partials from the same pass; no host sync."""
    return _fused_copy(src, dst, _w32_launch, wsum32x2, _w32_tail)


# -- wsum64 API ---------------------------------------------------------------------------------
def _launch(src: torch.Tensor, dst: torch.Tensor | None, n_words: int) -> torch.Tensor:
    """``[2]`` wsum64 sums of the first ``n_words`` words of contiguous, 4-byte aligned ``src``
    (copied into ``dst`` when given): the kernel reads the bytes through int32 pointers."""
    if n_words == 0:
        return torch.zeros(2, dtype=torch.int64, device=src.device)
    n_blocks = triton.cdiv(n_words, _BLOCK)
    grid = _num_programs(n_blocks, src.device)
    parts = torch.empty(2, grid, dtype=torch.int64, device=src.device)
    with _on_device(src):
        _wsum64_kernel[(grid,)](
            _kernel_arg(src), _kernel_arg(dst if dst is not None else src), parts, n_words,
            n_blocks,
            COLS=WSUM_COLS, BLOCK=_BLOCK, COPY=dst is not None, EVEN=n_words % _BLOCK == 0,
            num_warps=8,
        )  # fmt: skip
    return parts.sum(dim=1)  # int64 sums wrap mod 2**64


def _w64_tail(sums: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    n_words = raw.numel() // 4
    x = _tail_word(raw, n_words)
    weight = (2 * (n_words // WSUM_COLS) + 1) * (2 * (n_words % WSUM_COLS) + 1)
    return sums + torch.cat([x * weight, x])


def wsum64(buffer: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 (weighted, plain) of ``buffer``'s bytes, on its device (no host sync)."""
    buf = _aligned(buffer)
    nbytes = _nbytes(buf)
    sums = _launch(buf, None, nbytes // 4)
    return _w64_tail(sums, _flat_bytes(buf)) if nbytes % 4 else sums


def copy_with_wsum64(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy ``src``'s bytes into ``dst`` (same byte count, any dtypes/shapes, both contiguous) and
    return their ``wsum64`` from the same pass; no host sync (the sums are ready when the copy is)."""
    return _fused_copy(src, dst, _launch, wsum64, _w64_tail)


# -- copy verified on the device ------------------------------------------------------------------
_GROUPS = 16  # the kernel's GROUPS: first-level accumulators per verified copy
_LINE = 32  # the kernel's LINE: int32 per accumulator line (128 bytes: one cache line each)
_SLOT_WORDS = (1 + _GROUPS) * _LINE  # int32 of device state per slot (keeps 16-byte alignment)
_VERDICT_WORDS = 4  # int32 per verdict (16 bytes: every verdict pointer stays 16-byte aligned)
_ALIGN = 16


class VerifiedCopier:
    """Copies bytes and checks their ``wsum32x2`` sums against the sender's in the same launch,
    so a verified receive costs one launch and no host fold.

    Built for the cuda_ipc sink, whose fixed cost per transfer is host time (a 64 MiB copy is
    ~50 us of GPU time on an H100, a Python-driven launch and sync ~20-30 us of host time). On
    CUDA, once a kernel variant is compiled (first use, or the engine's warm-up), launches go
    straight to the compiled kernel's launcher with integer pointers and the stream: no JIT
    dispatch, no ``cuPointerGetAttribute`` per pointer. Each launch takes a slot: device state
    (running sums and arrival counts, zeroed again by the kernel) and a verdict word in pinned
    host memory that the kernel writes last, after a system-scope fence; ``wait`` polls that word
    instead of synchronising the stream (the same handshake NCCL's proxies use), and falls back
    to a stream sync after ``spin_s``. Slots make concurrent receives (several threads, streams)
    independent. Thread-safe."""

    def __init__(self, device: torch.device | str, slots: int = 64, spin_s: float = 0.002) -> None:
        self.device = _indexed(torch.device(device))
        cuda = self.device.type == "cuda"
        self.spin_s = spin_s
        self._state = torch.zeros(slots, _SLOT_WORDS, dtype=torch.int32, device=self.device)
        self._verdicts = torch.zeros(slots, _VERDICT_WORDS, dtype=torch.int32, pin_memory=cuda)
        self._verdict_view = self._verdicts.numpy()  # the host's view of the kernel's writes
        self._streams: list[int] = [0] * slots  # the stream each slot's copy went on
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self._compiled: dict[bool, object] = {}  # TAIL -> compiled kernel (CUDA)
        self._constexprs: dict[bool, tuple] = {}  # TAIL -> the constexprs, in parameter order
        self._grids: dict[int, tuple[int, int, int, bool]] = {}  # words -> _w32_grid (sizes recur)
        self._direct_ok = cuda
        self.direct_launches = 0  # how many launches skipped the JIT path (tests, benchmarks)
        self.stream_syncs = 0  # waits that fell back to a stream sync (tests, benchmarks)

    def copy(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        nbytes: int,
        expected: tuple[int, int],
        src_offset: int = 0,
    ) -> bool:
        """Copy ``nbytes`` of ``src`` from byte ``src_offset`` on (a contiguous buffer on this
        device, e.g. a mapped peer arena) into contiguous ``dst`` and say whether their sums equal
        ``expected`` (signed int32 weighted, plain: ``kv_handle.wsum32_expected``). Returns once
        the copy is complete."""
        return self.wait(self.launch(src, dst, nbytes, expected, src_offset))

    def launch(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        nbytes: int,
        expected: tuple[int, int],
        src_offset: int = 0,
    ) -> int:
        """Enqueue the copy on this device's current stream; returns the slot ``wait`` takes.
        ``nbytes`` must be a multiple of 4 (KV buffers always are) and match ``dst``."""
        if nbytes <= 0 or nbytes % 4 or nbytes != dst.nbytes or not dst.is_contiguous():
            raise ValueError(f"a verified copy needs 4-byte words and a {nbytes}-byte dst")
        if not src.is_contiguous() or src_offset < 0 or src_offset + nbytes > src.nbytes:
            raise ValueError(f"bytes [{src_offset}, +{nbytes}) lie outside the (contiguous) source")
        with self._lock:
            if not self._free:
                raise RuntimeError("all verified-copy slots are in use")
            slot = self._free.pop()
        try:
            self._verdict_view[slot, 0] = 0
            self._launch(src, src_offset, dst, nbytes // 4, expected, slot)
        except BaseException:
            self._release(slot)
            raise
        return slot

    def wait(self, slot: int) -> bool:
        """The slot's verdict once its copy is complete; frees the slot."""
        try:
            verdict = self._poll(slot) if self.device.type == "cuda" else 0
            if verdict == 0:
                self.stream_syncs += int(self.device.type == "cuda")
                self._sync(slot)
                verdict = int(self._verdict_view[slot, 0])
        finally:
            self._release(slot)
        if verdict == 0:
            raise RuntimeError("the verified copy left no verdict")
        return verdict == 1

    def _poll(self, slot: int) -> int:
        """Spin on the slot's verdict word for up to ``spin_s`` (0: not there yet)."""
        view, deadline = self._verdict_view, time.perf_counter() + self.spin_s
        while True:
            for _ in range(256):
                verdict = int(view[slot, 0])
                if verdict:
                    return verdict
            if time.perf_counter() > deadline:
                return 0

    def _sync(self, slot: int) -> None:
        if self.device.type != "cuda":
            return
        raw = self._streams[slot]
        if raw:  # the stream of a direct launch
            torch.cuda.ExternalStream(raw, device=self.device).synchronize()
        else:
            torch.cuda.current_stream(self.device).synchronize()

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def _launch(
        self,
        src: torch.Tensor,
        src_offset: int,
        dst: torch.Tensor,
        n_words: int,
        expected: tuple[int, int],
        slot: int,
    ) -> None:
        shape = self._grids.get(n_words)
        if shape is None:
            shape = self._grids.setdefault(n_words, _w32_grid(n_words, self.device))
        grid, n_full, per_prog, tail = shape
        exp_w, exp_p = expected
        src_ptr = src.data_ptr() + src_offset
        dst_ptr = dst.data_ptr()
        aligned = not (src_ptr | dst_ptr) % _ALIGN
        compiled = self._compiled.get(tail)
        self._streams[slot] = 0
        if compiled is not None and self._direct_ok and aligned:
            state = self._state.data_ptr() + slot * _SLOT_WORDS * 4
            verdict = self._verdicts.data_ptr() + slot * _VERDICT_WORDS * 4
            index = self.device.index
            switch = (
                nullcontext()
                if torch.cuda.current_device() == index
                else torch.cuda.device(self.device)
            )
            try:
                with switch:
                    stream = torch._C._cuda_getCurrentRawStream(index)
                    compiled.run(
                        grid, 1, 1, stream, compiled.function, compiled.packed_metadata,
                        None, None, None,  # launch metadata and hooks: none on this path
                        src_ptr, dst_ptr, dst_ptr, state, verdict, n_words, n_full, per_prog,
                        exp_w, exp_p, *self._constexprs[tail],
                    )  # fmt: skip
                self._streams[slot] = stream
                self.direct_launches += 1
                return
            except (TypeError, ValueError, AttributeError) as exc:  # another Triton's launcher
                self._direct_ok = False
                logging.getLogger(__name__).warning("direct Triton launch unavailable: %s", exc)
        if src.device != dst.device or (src_ptr | dst_ptr) % 4:
            raise ValueError("a verified copy needs 4-byte aligned buffers on one device")
        src_bytes = _flat_bytes(src.detach())[src_offset : src_offset + n_words * 4]
        with _on_device(dst):
            ran = _wsum32_kernel[(grid,)](
                src_bytes, _kernel_arg(dst), dst, self._state[slot], self._verdicts[slot],
                n_words, n_full, per_prog, exp_w, exp_p,
                **self._constexpr_kw(tail), num_warps=_W32_WARPS,
            )  # fmt: skip
        if self._direct_ok and aligned and tail not in self._compiled:
            self._compiled[tail] = ran  # compiled for 16-byte aligned pointers: reuse directly
            kw = self._constexpr_kw(tail)
            self._constexprs[tail] = tuple(kw[n] for n in _wsum32_kernel.arg_names if n in kw)

    def _constexpr_kw(self, tail: bool) -> dict:
        """The verify variant's constexprs; a direct launch passes them positionally, in the
        kernel's parameter order (defaulted ones included: the launcher takes every one)."""
        return dict(
            BLOCK=W32_BLOCK, COPY=True, TAIL=tail, VERIFY=True, GROUPS=_GROUPS, LINE=_LINE,
            ADD_SEM="relaxed", SYS_FENCE=self.device.type == "cuda",
        )  # fmt: skip


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: one name per GPU (a direct launch checks the index)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def verified_copier(device: torch.device | str) -> VerifiedCopier:
    """This process's ``VerifiedCopier`` for ``device`` (one per device: the engine's warm-up
    compiles the kernel variants that the transport's receives then launch directly)."""
    return _copier_for(_indexed(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _copier_for(device: torch.device) -> VerifiedCopier:
    return VerifiedCopier(device)
