"""CUDA IPC transport (same host, including the same GPU): the sink maps the source's device memory and
copies it device to device.

Source: exports live in one device buffer per worker, the export arena (``export_arena_bytes``), whose IPC
handle is taken once (``reduce_tensor``) and whose bytes are carved into 256-byte aligned extents by a
first-fit ``ExtentAllocator``. The prefill role gathers the KV straight into an extent
(``export_allocator``) and frees it when the held export is released (ack, abort, lease expiry). The payload
is then ``ArenaRef`` (arena id, offset, bytes, plus the arena's pickled handle for a sink that has not
opened it yet), packed with ``struct`` so the sink parses it in a microsecond (``decode_payload``). When the
arena is off, full or fails to allocate, an export is any CUDA tensor and the payload is ``TensorRef``: its
own handle, taken per export (the slow path: the sink opens it per transfer).

Sink: opened arenas are kept (``arena id -> uint8 view``, LRU-bounded, dropped on ``close``), so a source's
handle is opened once, not per transfer. The copy is the handle's checksum fused into it, so the bytes are
read once. For the default checksum (``wsum32x2``, whose checksum string is the two sums) the comparison
is on the device too (``kernels.checksum.VerifiedCopier``): an arena export costs one direct launch of the
compiled kernel, then the host polls one word of pinned memory that the kernel writes last (match or
mismatch), with no stream sync. That path is lean because a receive's fixed cost is host time: at 64 MiB
the copy itself is ~50 us on an H100.
Older handles (``wsum32x2+blake2b``, ``wsum64``) copy with their fused sums and compare on the host.

Lifetime: the sink acks after its copy has completed (the host saw the verdict, which the last program
writes after every program's reads; or the host sync of the older paths), so an extent is reused only
after its reader is done. A sink still copying when the lease expired may read an extent that is
being reused: its checksum then fails and it recomputes, as for any bad transfer.
"""

from __future__ import annotations

import bisect
import logging
import pickle
import struct
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from baton.cluster.transfer.base import (
    ChecksumMismatch,
    ExportAlloc,
    KVTransport,
    TransferError,
    TransportCaps,
)
from baton.workers.kv_handle import (
    ALGO_WSUM,
    ALGO_WSUM32,
    ALGO_WSUM32_B2,
    KVHandle,
    dtype_name,
    torch_dtype,
    verify,
    wsum32_b2_digest,
    wsum32_digest,
    wsum32_expected,
    wsum_digest,
)

log = logging.getLogger(__name__)

ARENA_ALIGN = 256
MAX_OPEN_ARENAS = 16  # sources whose arenas a sink keeps mapped (one per prefill worker)


class ExtentAllocator:
    """First-fit byte extents of a ``capacity``-byte arena: offsets ``align``-aligned, sizes rounded up,
    neighbours coalesced on free. Thread-safe (exports are allocated on the engine thread and freed from
    the actor's, or the engine's on lease expiry)."""

    def __init__(self, capacity: int, align: int = ARENA_ALIGN) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        self.align = align
        self.capacity = capacity - capacity % align
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity > 0 else []
        self._used: dict[int, int] = {}  # offset -> rounded size
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free extent of at least ``nbytes`` (None when none is large enough)."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        size = -(-nbytes // self.align) * self.align
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, free - size)
                    self._used[off] = size
                    return off
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset, None)
            if size is None:
                raise ValueError(f"offset {offset} is not an allocated extent")
            i = bisect.bisect_left(self._free, (offset, 0))
            start, end = offset, offset + size
            if i < len(self._free) and self._free[i][0] == end:  # merge the next free extent
                end += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == start:  # and the previous one
                start = self._free.pop(i - 1)[0]
                i -= 1
            self._free.insert(i, (start, end - start))

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max((size for _, size in self._free), default=0)

    @property
    def num_free_extents(self) -> int:
        with self._lock:
            return len(self._free)


class ExportArena:
    """One byte buffer on ``device`` carved by an ``ExtentAllocator``; its IPC handle is taken once."""

    def __init__(self, nbytes: int, device: torch.device | str) -> None:
        self.arena_id = uuid.uuid4().hex
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.extents = ExtentAllocator(nbytes)
        self._opener: bytes | None = None
        self._lock = threading.Lock()

    def alloc(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """A contiguous ``shape``/``dtype`` view on a free extent and the callable that frees it."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        off = self.extents.alloc(max(nbytes, 1))
        if off is None:
            return None
        view = self.buffer[off : off + nbytes].view(dtype).view(shape)
        return view, lambda: self.extents.free(off)

    def locate(self, buffer: torch.Tensor) -> int | None:
        """``buffer``'s byte offset in the arena, or None when it does not lie inside it."""
        if buffer.device != self.buffer.device or not buffer.is_contiguous():
            return None
        start = buffer.data_ptr() - self.buffer.data_ptr()
        end = start + buffer.numel() * buffer.element_size()
        return start if 0 <= start and end <= self.buffer.numel() else None

    def opener(self) -> bytes:
        """The pickled ``reduce_tensor`` of the whole arena (taken once): what a sink opens."""
        with self._lock:
            if self._opener is None:
                from torch.multiprocessing.reductions import reduce_tensor

                self._opener = pickle.dumps(reduce_tensor(self.buffer))
            return self._opener


_ARENA_TAG, _TENSOR_TAG = b"KVA1", b"KVT1"
# tag, arena id (uuid bytes), offset, nbytes; the opener follows
_ARENA_HEAD = struct.Struct("<4s16sQQ")


@dataclass(frozen=True)
class ArenaRef:
    """An export inside a source's arena."""

    arena_id: str  # uuid hex
    offset: int
    nbytes: int
    opener: bytes  # ExportArena.opener(): used only by a sink that has not mapped this arena yet

    def encode(self) -> bytes:
        head = _ARENA_HEAD.pack(_ARENA_TAG, bytes.fromhex(self.arena_id), self.offset, self.nbytes)
        return head + self.opener


@dataclass(frozen=True)
class TensorRef:
    """An export outside any arena: its own ``reduce_tensor`` (opened per transfer)."""

    reduced: tuple

    def encode(self) -> bytes:
        return _TENSOR_TAG + pickle.dumps(self.reduced)


def decode_payload(payload: bytes) -> ArenaRef | TensorRef:
    """The export a cuda_ipc payload names; ``TransferError`` for anything else."""
    tag = payload[:4]
    if tag == _ARENA_TAG and len(payload) >= _ARENA_HEAD.size:
        _, arena_id, offset, nbytes = _ARENA_HEAD.unpack_from(payload)
        return ArenaRef(arena_id.hex(), offset, nbytes, payload[_ARENA_HEAD.size :])
    if tag == _TENSOR_TAG:
        return TensorRef(pickle.loads(payload[4:]))
    raise TransferError(f"cuda_ipc payload of unknown kind {bytes(tag)!r}")


def _fused_copies() -> dict[str, tuple[Callable, Callable]]:
    """checksum algorithm -> (copy fused with its sums, digest of those sums)."""
    from baton.kernels.checksum import copy_with_wsum32x2, copy_with_wsum64

    return {
        ALGO_WSUM32: (copy_with_wsum32x2, wsum32_digest),
        ALGO_WSUM32_B2: (copy_with_wsum32x2, wsum32_b2_digest),
        ALGO_WSUM: (copy_with_wsum64, wsum_digest),
    }


class CudaIpcTransport(KVTransport):
    name = "cuda_ipc"
    caps = TransportCaps(
        same_host_only=True,
        needs_pair_group=False,
        device_buffers=True,
        source_serves=False,
        exports_payload=True,
    )

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        if self.device.type != "cuda":
            raise ValueError("the cuda_ipc transport needs a CUDA device")
        self._arena: ExportArena | None = None
        self._arena_failed = self.export_arena_bytes <= 0
        self._arena_lock = threading.Lock()
        self._opened: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._open_lock = threading.Lock()
        self.arenas_opened = 0  # how many times a sink mapped an arena (tests, metrics)
        self._fused = _fused_copies()
        self._copier = None  # kernels.checksum.VerifiedCopier, taken on the first receive

    # -- source side ------------------------------------------------------------------------------
    def export_allocator(self) -> ExportAlloc | None:
        """Asked once by a worker that exports (prefill or colocated) when it starts: the arena is
        allocated and its handle taken now, not in the first request's time to first token."""
        if self.export_arena_bytes <= 0:
            return None
        self._ensure_arena()
        return self._alloc_export

    def _alloc_export(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, Callable[[], None]] | None:
        arena = self._ensure_arena()
        return arena.alloc(shape, dtype) if arena is not None else None

    def _ensure_arena(self) -> ExportArena | None:
        """The arena, allocated once (decode workers, which never ask for the allocator, never pay
        for it); a failed allocation is not retried."""
        with self._arena_lock:
            if self._arena is None and not self._arena_failed:
                try:
                    self._arena = ExportArena(self.export_arena_bytes, self.device)
                    self._arena.opener()
                except Exception as exc:  # noqa: BLE001 - out of memory: per-export handles instead
                    self._arena, self._arena_failed = None, True
                    log.warning(
                        "%s: no %d-byte cuda_ipc export arena (%s); exporting per buffer",
                        self.worker_id,
                        self.export_arena_bytes,
                        exc,
                    )
            return self._arena

    def export_payload(self, handle: KVHandle, buffer: torch.Tensor) -> bytes:
        if buffer.device.type != "cuda":
            raise TransferError("cuda_ipc can only export CUDA buffers")
        nbytes = buffer.numel() * buffer.element_size()
        arena = self._arena
        offset = arena.locate(buffer) if arena is not None else None
        if arena is not None and offset is not None:
            ref: ArenaRef | TensorRef = ArenaRef(arena.arena_id, offset, nbytes, arena.opener())
        else:
            from torch.multiprocessing.reductions import reduce_tensor

            ref = TensorRef(reduce_tensor(buffer))
        self._on_sent(nbytes)
        return ref.encode()

    # -- sink side --------------------------------------------------------------------------------
    def _arena_view(self, ref: ArenaRef) -> torch.Tensor:
        with self._open_lock:
            view = self._opened.get(ref.arena_id)
            if view is not None:
                self._opened.move_to_end(ref.arena_id)
                return view
            rebuild, args = pickle.loads(ref.opener)
            view = rebuild(*args)  # maps the source's arena into this process (once)
            if view.dtype != torch.uint8 or view.dim() != 1:
                raise TransferError(f"cuda_ipc arena {ref.arena_id} is not a byte buffer")
            self._opened[ref.arena_id] = view
            self.arenas_opened += 1
            while len(self._opened) > MAX_OPEN_ARENAS:
                self._opened.popitem(last=False)
            return view

    def _copy_in(
        self, handle: KVHandle, payload: bytes, fused: Callable | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(a fresh copy of the export on this device, the checksum sums ``fused`` made while it
        copied, or None with ``fused`` None). Not synced on the arena path (the caller's one sync)."""
        if not payload:
            raise TransferError("cuda_ipc receive without an exported handle")
        ref = decode_payload(payload)
        dst = torch.empty(handle.shape, dtype=torch_dtype(handle.dtype), device=self.device)
        if isinstance(ref, ArenaRef):
            arena = self._arena_view(ref)
            if ref.nbytes != handle.nbytes or ref.offset + ref.nbytes > arena.numel():
                raise TransferError(f"cuda_ipc extent of {ref.nbytes} B does not match the handle")
            return dst, _copy(arena[ref.offset : ref.offset + ref.nbytes], dst, fused)
        rebuild, args = ref.reduced
        src = rebuild(*args)  # a view on the source's memory, unmapped when dropped
        if tuple(src.shape) != tuple(handle.shape) or dtype_name(src.dtype) != handle.dtype:
            raise TransferError(f"cuda_ipc buffer {tuple(src.shape)} does not match the handle")
        with torch.cuda.device(self.device):
            sums = _copy(src, dst, fused)
            torch.cuda.current_stream(self.device).synchronize()  # before src is unmapped
        del src
        return dst, sums

    def _receive(
        self, handle: KVHandle, endpoint: str, payload: bytes, peer_id: str, transfer_id: int
    ) -> torch.Tensor:
        dst, _ = self._copy_in(handle, payload, None)
        torch.cuda.current_stream(self.device).synchronize()  # the copy is done before the ack
        return dst

    def receive_verified(
        self,
        handle: KVHandle,
        *,
        endpoint: str = "",
        payload: bytes = b"",
        peer_id: str = "",
        transfer_id: int = 0,
    ) -> torch.Tensor:
        """One pass: copy and checksum together, then compare (on the device for an arena export
        with the default checksum). An injected corruption (or an algorithm with no fused copy)
        takes a plain copy and a full recompute, like any other transport's."""
        self._before_receive()
        if (
            handle.checksum_algo == ALGO_WSUM32
            and payload[:4] == _ARENA_TAG
            and self.faults.corrupt_next <= 0
        ):
            try:
                dst = self._receive_on_device(handle, payload)
            except TransferError:
                raise
            except Exception as exc:  # noqa: BLE001 - every transport failure means "recompute"
                raise TransferError(f"cuda_ipc receive of {handle.request_id!r}: {exc}") from exc
            if dst is not None:
                return dst
        fused = self._fused.get(handle.checksum_algo)
        if self.faults.corrupt_next > 0:
            fused = None

        def copy_and_check() -> tuple[torch.Tensor, bool]:
            if fused is None:
                dst = self._receive(handle, endpoint, payload, peer_id, transfer_id)
                self._maybe_corrupt(dst)
                return dst, verify(handle, dst)
            dst, sums = self._copy_in(handle, payload, fused[0])
            return dst, fused[1](sums, dst.numel(), handle.shape) == handle.checksum

        dst, ok = self._guarded(handle, copy_and_check)
        if not ok:
            raise ChecksumMismatch(f"{self.name}: checksum mismatch on {handle.request_id!r}")
        return dst

    def _receive_on_device(self, handle: KVHandle, payload: bytes) -> torch.Tensor | None:
        """An arena export verified on the device (the module docstring); None when the payload
        or the checksum does not fit that path (the caller takes the general one). Every step
        here is on the transfer's critical path in host time, hence the raw header parse."""
        expected = wsum32_expected(handle.checksum)
        if expected is None or len(payload) < _ARENA_HEAD.size:
            return None
        nbytes = handle.nbytes
        if nbytes % 4:
            return None
        _, raw_id, offset, ref_nbytes = _ARENA_HEAD.unpack_from(payload)
        with self._open_lock:
            arena = self._opened.get(raw_id.hex())
        if arena is None:
            arena = self._arena_view(decode_payload(payload))
        if ref_nbytes != nbytes or offset + nbytes > arena.numel():
            raise TransferError(f"cuda_ipc extent of {ref_nbytes} B does not match the handle")
        if self._copier is None:
            from baton.kernels.checksum import verified_copier

            self._copier = verified_copier(self.device)
        raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        slot = self._copier.launch(arena, raw, nbytes, expected, offset)
        dst = raw.view(torch_dtype(handle.dtype)).view(handle.shape)  # while the GPU copies
        if not self._copier.wait(slot):
            raise ChecksumMismatch(f"{self.name}: checksum mismatch on {handle.request_id!r}")
        return dst

    def close(self) -> None:
        with self._open_lock:
            self._opened.clear()
        with self._arena_lock:
            self._arena, self._arena_failed = None, True


def _copy(src: torch.Tensor, dst: torch.Tensor, fused: Callable | None) -> torch.Tensor | None:
    """``src``'s bytes into ``dst``: through ``fused`` (returning its sums) or a plain copy."""
    if fused is not None:
        return fused(src, dst)
    dst.reshape(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8))
    return None
