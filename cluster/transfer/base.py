"""The KV transport interface: one small contract, capability flags instead of names.

A transport moves one held export (``KVHandle`` + contiguous buffer) from a prefill process (the source) to a
decode process (the sink). The sink always drives (pull). What the orchestrator must do around ``receive``
depends only on the capability flags:

- ``needs_pair_group``: a two-rank process group per (source, sink) pair is opened once with ``open_pair`` on both
  sides at the same time, and each transfer needs the source to call ``send`` while the sink is in ``receive``.
- ``exports_payload``: the source turns the buffer into a small payload (``export_payload``) that travels with
  the handle (CUDA IPC memory handles); the sink needs nothing else.
- ``source_serves``: the source runs a server at ``endpoint``; the sink pulls from it with no source-side call.
- ``same_host_only``: only valid when both ends are on one node. ``device_buffers``: moves device memory without
  staging through host memory.

Every blocking call takes the transport's ``timeout_s``. ``receive`` does not verify checksums;
``receive_verified`` (what the decode worker calls) does, once: by default a full recompute after the copy, while
a transport that checksums while it copies (cuda_ipc) checks the sums it already has. Both apply injected
``TransferFaults`` (tests: delay, corrupt a byte in transit) so that the verification and recovery paths are
exercised end to end; a corrupted copy is always verified by a full recompute.

Export arenas: a transport that exports payloads may carve the source's exports out of one pre-shared buffer of
``export_arena_bytes`` (``export_allocator``); the prefill role then gathers the KV straight into it.
"""

from __future__ import annotations

import logging
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from baton.workers.kv_handle import ExportAlloc, KVHandle, torch_dtype, verify

log = logging.getLogger(__name__)

BufferLookup = Callable[[str], "tuple[KVHandle, torch.Tensor] | None"]


class TransferError(RuntimeError):
    """A transfer did not complete (timeout, peer gone, lease expired, bad bytes): the sink recomputes."""


class ChecksumMismatch(TransferError):
    """The bytes arrived complete but differ from the handle's checksum (the channel itself is fine)."""


@dataclass(frozen=True)
class TransportCaps:
    same_host_only: bool
    needs_pair_group: bool
    device_buffers: bool
    source_serves: bool
    exports_payload: bool


@dataclass
class TransferFaults:
    """Faults injected on the sink side (tests only): the edge of the world, not a code path of its own."""

    corrupt_next: int = 0  # flip one byte of the next N received buffers
    delay_s: float = 0.0  # sleep before each transfer starts (e.g. past the lease)
    fail_next: int = 0  # raise TransferError on the next N receives
    # Source side (serving transports): end the next N outgoing streams halfway, with an error
    # status ("abort") or as if complete ("truncate"): the sink must notice and recompute.
    drop_stream_next: int = 0
    drop_stream_mode: str = "abort"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def empty_like_handle(handle: KVHandle, device: torch.device | str) -> torch.Tensor:
    return torch.empty(handle.shape, dtype=torch_dtype(handle.dtype), device=device)


class KVTransport(ABC):
    name: ClassVar[str]
    caps: ClassVar[TransportCaps]

    def __init__(
        self,
        *,
        worker_id: str,
        device: torch.device | str = "cpu",
        host: str = "127.0.0.1",
        timeout_s: float = 10.0,
        export_arena_bytes: int = 0,
    ) -> None:
        self.worker_id = worker_id
        self.export_arena_bytes = export_arena_bytes  # used by transports that export payloads
        self.device = torch.device(device)
        self.host = host
        self.timeout_s = timeout_s
        self.faults = TransferFaults()
        self._lookup: BufferLookup | None = None
        self._on_sent: Callable[[int], None] = lambda n: None

    # -- source side ------------------------------------------------------------------------------
    def serve(self, lookup: BufferLookup, on_sent: Callable[[int], None] | None = None) -> str:
        """Start serving held exports; returns the endpoint sinks use ("" when there is none)."""
        self._lookup = lookup
        if on_sent is not None:
            self._on_sent = on_sent
        return ""

    def _held(self, request_id: str) -> tuple[KVHandle, torch.Tensor]:
        held = self._lookup(request_id) if self._lookup is not None else None
        if held is None:
            raise TransferError(f"{self.worker_id}: no held KV for {request_id!r} (lease expired?)")
        return held

    def export_payload(self, handle: KVHandle, buffer: torch.Tensor) -> bytes:
        return b""

    def export_allocator(self) -> ExportAlloc | None:
        """Where the source should put its exports (None: anywhere; see the module docstring)."""
        return None

    def open_pair(self, peer_id: str, endpoint: str, rank: int, generation: int) -> None:
        raise NotImplementedError(f"{self.name} has no pair groups")

    def send(self, request_id: str, peer_id: str, transfer_id: int) -> int:
        raise NotImplementedError(f"{self.name} does not push")

    # -- sink side --------------------------------------------------------------------------------
    def receive(
        self,
        handle: KVHandle,
        *,
        endpoint: str = "",
        payload: bytes = b"",
        peer_id: str = "",
        transfer_id: int = 0,
    ) -> torch.Tensor:
        """The handle's bytes as a tensor on this transport's device; raises ``TransferError``."""
        self._before_receive()
        buf = self._guarded(
            handle, lambda: self._receive(handle, endpoint, payload, peer_id, transfer_id)
        )
        self._maybe_corrupt(buf)
        return buf

    def receive_verified(
        self,
        handle: KVHandle,
        *,
        endpoint: str = "",
        payload: bytes = b"",
        peer_id: str = "",
        transfer_id: int = 0,
    ) -> torch.Tensor:
        """``receive`` plus the checksum check; raises ``ChecksumMismatch`` on bad bytes."""
        buf = self.receive(
            handle, endpoint=endpoint, payload=payload, peer_id=peer_id, transfer_id=transfer_id
        )
        if not verify(handle, buf):
            raise ChecksumMismatch(f"{self.name}: checksum mismatch on {handle.request_id!r}")
        return buf

    def _before_receive(self) -> None:
        f = self.faults
        if f.delay_s > 0:
            time.sleep(f.delay_s)
        if f.fail_next > 0:
            f.fail_next -= 1
            raise TransferError("injected transfer failure")

    def _guarded(self, handle: KVHandle, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except TransferError:
            raise
        except Exception as exc:  # noqa: BLE001 - every transport failure means "recompute"
            raise TransferError(
                f"{self.name} receive of {handle.request_id!r} failed: {exc}"
            ) from exc

    def _maybe_corrupt(self, buf: torch.Tensor) -> bool:
        """Apply an armed ``corrupt_next`` fault (flip one byte); True when it did."""
        f = self.faults
        if f.corrupt_next <= 0:
            return False
        f.corrupt_next -= 1
        flat = buf.view(torch.uint8).view(-1)
        flat[flat.numel() // 2] ^= 0x01
        return True

    @abstractmethod
    def _receive(
        self, handle: KVHandle, endpoint: str, payload: bytes, peer_id: str, transfer_id: int
    ) -> torch.Tensor: ...

    def drop_pair(self, peer_id: str) -> None:
        """Forget a broken pair group (after a timeout); the next transfer opens a new generation."""

    def close(self) -> None:
        """Stop servers and drop groups."""
