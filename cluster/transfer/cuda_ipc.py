"""CUDA IPC transport (same host, including the same GPU): the sink maps the source's device memory and
copies it device to device.

Source: exports live in one device buffer per worker, the export arena (``export_arena_bytes``), whose IPC
handle is taken once (``reduce_tensor``) and whose bytes are carved into 256-byte aligned extents by a
first-fit ``ExtentAllocator``. The prefill role gathers the KV straight into an extent
(``export_allocator``) and frees it when the held export is released (ack, abort, lease expiry). The payload
is then ``ArenaRef`` (arena id, offset, bytes, plus the arena's pickled handle for a sink that has not
opened it yet). When the arena is off, full or fails to allocate, an export is any CUDA tensor and the
payload is ``TensorRef``: its own handle, taken per export (the slow path: the sink opens it per transfer).

Sink: opened arenas are kept (``arena id -> uint8 view``, LRU-bounded, dropped on ``close``), so a source's
handle is opened once, not per transfer. The copy is ``copy_with_wsum64`` (Triton), which checksums while
it copies: ``receive_verified`` checks those sums (one host sync) instead of re-reading the bytes.

Lifetime: the sink acks after its copy has completed (the checksum's host sync), so an extent is reused
only after its reader is done. A sink still copying when the lease expired may read an extent that is
being reused: its checksum then fails and it recomputes, as for any bad transfer.
"""

from __future__ import annotations

import bisect
import logging
import pickle
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
    empty_like_handle,
)
from baton.workers.kv_handle import ALGO_WSUM, KVHandle, dtype_name, verify, wsum_digest

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


@dataclass(frozen=True)
class ArenaRef:
    """An export inside a source's arena."""

    arena_id: str
    offset: int
    nbytes: int
    opener: bytes  # ExportArena.opener(): used only by a sink that has not mapped this arena yet


@dataclass(frozen=True)
class TensorRef:
    """An export outside any arena: its own ``reduce_tensor`` (opened per transfer)."""

    reduced: tuple


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

    # -- source side ------------------------------------------------------------------------------
    def export_allocator(self) -> ExportAlloc | None:
        return self._alloc_export if self.export_arena_bytes > 0 else None

    def _alloc_export(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, Callable[[], None]] | None:
        arena = self._ensure_arena()
        return arena.alloc(shape, dtype) if arena is not None else None

    def _ensure_arena(self) -> ExportArena | None:
        """The arena, allocated on first use (decode workers never pay for it)."""
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
        return pickle.dumps(ref)

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

    def _copy_in(self, handle: KVHandle, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """(a fresh copy of the export on this device, its ``[2]`` wsum64 sums); not yet synced."""
        from baton.kernels.checksum import copy_with_wsum64

        if not payload:
            raise TransferError("cuda_ipc receive without an exported handle")
        ref = pickle.loads(payload)
        dst = empty_like_handle(handle, self.device)
        if isinstance(ref, ArenaRef):
            arena = self._arena_view(ref)
            if ref.nbytes != handle.nbytes or ref.offset + ref.nbytes > arena.numel():
                raise TransferError(f"cuda_ipc extent of {ref.nbytes} B does not match the handle")
            return dst, copy_with_wsum64(arena[ref.offset : ref.offset + ref.nbytes], dst)
        if not isinstance(ref, TensorRef):
            raise TransferError(f"cuda_ipc payload of unknown kind {type(ref).__name__}")
        rebuild, args = ref.reduced
        src = rebuild(*args)  # a view on the source's memory, unmapped when dropped
        if tuple(src.shape) != tuple(handle.shape) or dtype_name(src.dtype) != handle.dtype:
            raise TransferError(f"cuda_ipc buffer {tuple(src.shape)} does not match the handle")
        with torch.cuda.device(self.device):
            sums = copy_with_wsum64(src, dst)
            torch.cuda.current_stream(self.device).synchronize()  # before src is unmapped
        del src
        return dst, sums

    def _receive(
        self, handle: KVHandle, endpoint: str, payload: bytes, peer_id: str, transfer_id: int
    ) -> torch.Tensor:
        dst, _ = self._copy_in(handle, payload)
        torch.cuda.current_stream(self.device).synchronize()
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
        """One pass: copy and checksum together, then compare (one host sync). An injected corruption
        is applied to the copy and caught by a full recompute, like any other transport's."""
        self._before_receive()

        def copy_and_check() -> tuple[torch.Tensor, bool]:
            dst, sums = self._copy_in(handle, payload)
            if self._maybe_corrupt(dst) or handle.checksum_algo != ALGO_WSUM:
                return dst, verify(handle, dst)
            return dst, wsum_digest(sums, dst.numel(), tuple(dst.shape)) == handle.checksum

        dst, ok = self._guarded(handle, copy_and_check)
        if not ok:
            raise ChecksumMismatch(f"{self.name}: checksum mismatch on {handle.request_id!r}")
        return dst

    def close(self) -> None:
        with self._open_lock:
            self._opened.clear()
        with self._arena_lock:
            self._arena, self._arena_failed = None, True
