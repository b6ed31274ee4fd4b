"""Swap preemption: a bounded host pool that holds preempted sequences' KV blocks.

Accounting and data are split like on the device: ``HostBlockAllocator`` (pure bookkeeping, owned by
the scheduler, checked by ``check_integrity``) hands out host block ids; ``SwapSpace`` owns the host
tensor and does the copies the scheduler asked for in ``SchedulerOutput`` before the step's forward.

Host layout is block-major, ``[num_host_blocks, L, 2, bs, H, D]``, so one host block is one contiguous
range and a run of consecutive host ids is one DMA copy. Pinned (page-locked) only when CUDA is
available: that is what lets ``copy_(non_blocking=True)`` overlap, and pinning without CUDA fails.
Order inside one step: swap-outs gather from blocks that were freed in ``schedule()`` before any
swap-in or forward writes them (the same stream orders it on CUDA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class HostBlockAllocator:
    """Free list of host block ids (lowest first, so a swap-out tends to get one contiguous run)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: set[int] = set(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} host blocks, {len(self._free)} free")
        out = sorted(self._free)[:n]
        self._free.difference_update(out)
        return out

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i in self._free or not 0 <= i < self.num_blocks:
                raise RuntimeError(f"double free of host block {i}")
            self._free.add(i)

    def check_integrity(self, held: list[int]) -> None:
        """Every host block is free or held by exactly one swapped request."""
        if len(held) != len(set(held)):
            raise AssertionError("a host block is held twice")
        if set(held) & self._free:
            raise AssertionError("a host block is both free and held")
        if len(held) + len(self._free) != self.num_blocks:
            raise AssertionError(
                f"host blocks leaked: {len(held)} held + {len(self._free)} free != {self.num_blocks}"
            )


@dataclass(frozen=True)
class SwapOp:
    """Copy ``device_ids[i]`` <-> ``host_ids[i]`` (one entry per live block of one request)."""

    request_id: str
    device_ids: tuple[int, ...]
    host_ids: tuple[int, ...]


@dataclass
class SwapStats:
    blocks_out: int = 0
    blocks_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds_out: float = 0.0
    seconds_in: float = 0.0


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) for each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            out.append((start, ids[start], i - start))
            start = i
    return out


@dataclass
class SwapSpace:
    """The host tensor and the copies; ``runner`` gives ``gather_blocks``/``scatter_blocks``."""

    runner: object
    num_blocks: int
    stats: SwapStats = field(default_factory=SwapStats)

    def __post_init__(self) -> None:
        kv = self.runner.kv_cache  # [L, 2, N, bs, H, D]
        layers, _, _, bs, heads, dim = kv.shape
        self.block_shape = (layers, 2, bs, heads, dim)
        self.block_bytes = kv[:, :, :1].numel() * kv.element_size()
        pin = torch.cuda.is_available() and kv.device.type == "cuda"
        self.host = torch.empty(
            (self.num_blocks, *self.block_shape), dtype=kv.dtype, device="cpu", pin_memory=pin
        )
        self.device = kv.device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def swap_out(self, op: SwapOp) -> None:
        """Device blocks -> host blocks (device side packs with the runner's gather)."""
        t0 = time.perf_counter()
        packed = self.runner.gather_blocks(list(op.device_ids))  # [L, 2, n, bs, H, D]
        blocks = packed.permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, L, 2, bs, H, D]
        for pos, first, n in _runs(list(op.host_ids)):
            self.host[first : first + n].copy_(blocks[pos : pos + n], non_blocking=True)
        self._sync()
        self.stats.blocks_out += len(op.host_ids)
        self.stats.bytes_out += len(op.host_ids) * self.block_bytes
        self.stats.seconds_out += time.perf_counter() - t0

    def swap_in(self, op: SwapOp) -> None:
        """Host blocks -> device blocks (device side unpacks with the runner's scatter)."""
        t0 = time.perf_counter()
        n_all = len(op.host_ids)
        staged = torch.empty((n_all, *self.block_shape), dtype=self.host.dtype, device=self.device)
        for pos, first, n in _runs(list(op.host_ids)):
            staged[pos : pos + n].copy_(self.host[first : first + n], non_blocking=True)
        packed = staged.permute(1, 2, 0, 3, 4, 5).contiguous()  # [L, 2, n, bs, H, D]
        self.runner.scatter_blocks(packed, list(op.device_ids))
        self._sync()
        self.stats.blocks_in += n_all
        self.stats.bytes_in += n_all * self.block_bytes
        self.stats.seconds_in += time.perf_counter() - t0
