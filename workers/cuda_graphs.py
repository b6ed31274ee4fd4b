"""CUDA graphs for decode-only steps: one captured forward per padded batch size.

Decode is launch-bound at small batch: a 16-layer model issues ~250 kernels per step. Replaying a captured graph
turns them into one launch. Every batch bucket is captured once when the engine starts (largest first, one shared
memory pool), so no serving step stalls on a capture: a lazy capture costs ~100 ms and, keyed by context as well,
it recurred whenever a sequence crossed a context bucket (the suspected cause of the 0.36-0.5 s p99 gap after a
disaggregated first token; speculative steps met new row counts mid-run on an H100). A graph serves every context up to
``max_model_len``: it is captured with that bound, which only picks the decode kernel's split count; each
sequence's key ranges are cut from its own length on the device. Padded rows get ``seq_len 0`` and slot ``-1``
(the cache write skips them); their outputs are discarded.

Static layout (the graph reads these buffers; a replay first copies the step's values in)::

    input_ids, positions, slot_mapping: [B_max]    seq_lens: [B_max]    query_start_loc: [B_max + 1]
    block_tables: [B_max, max_blocks_per_seq]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from baton.kernels.attention import AttentionMetadata

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [B, hidden] static output


class DecodeGraphs:
    def __init__(
        self, model, kv_cache: torch.Tensor, block_size: int, max_num_seqs: int, max_model_len: int
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.buckets = tuple(b for b in BATCH_BUCKETS if b <= max(max_num_seqs, 1)) or (1,)
        self.max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        width = (max_model_len + block_size - 1) // block_size
        dev = self.device
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, width, dtype=torch.int32, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every batch bucket now (largest first: smaller graphs reuse its pool blocks);
        returns the seconds it took."""
        t0 = time.perf_counter()
        for batch in sorted(self.buckets, reverse=True):
            if batch not in self.graphs:
                self.graphs[batch] = self._capture(batch)
        torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (up to %d rows) in %.1f s",
            len(self.graphs),
            self.max_batch,
            took,
        )
        return took

    def can_run(self, batch: int, max_seq_len: int) -> bool:
        return batch <= self.max_batch and max_seq_len <= self.max_model_len

    def _meta(self, batch: int) -> AttentionMetadata:
        ctx = self.max_model_len
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            max_query_len=1,
            max_seq_len=ctx,
            query_lens_host=(1,) * batch,
            seq_lens_host=(ctx,) * batch,
        )

    def _capture(self, batch: int) -> _Graph:
        meta = self._meta(batch)
        args = (self.input_ids[:batch], self.positions[:batch], self.kv_cache, meta)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile Triton kernels and settle the allocator outside capture
                self.model.forward(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of this process (KV transfers receiving into the cache, CUDA IPC
        # handle opens) keep running while this thread captures; "global" would make their CUDA calls
        # invalidate the capture and fail the step.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            hidden = self.model.forward(*args)
        log.debug("captured decode graph batch=%d", batch)
        return _Graph(graph, hidden)

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Replay (capturing on first use) and return ``[B, hidden]`` for the real rows."""
        n = len(input_ids)
        batch = _bucket(n, self.buckets)
        assert batch is not None
        pad = batch - n
        width = max(len(t) for t in block_tables)
        table = torch.zeros(n, width, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        host = torch.tensor(
            [
                input_ids + [0] * pad,
                positions + [0] * pad,
                slots + [-1] * pad,
                seq_lens + [0] * pad,
            ],
            dtype=torch.int64,
        ).pin_memory()
        dev = host.to(self.device, non_blocking=True)
        self.input_ids[:batch].copy_(dev[0])
        self.positions[:batch].copy_(dev[1])
        self.slot_mapping[:batch].copy_(dev[2])
        self.seq_lens[:batch].copy_(dev[3])
        self.block_tables[:n, :width].copy_(table.pin_memory().to(self.device, non_blocking=True))
        g = self.graphs.get(batch)
        if g is None:  # capture_all was not called
            g = self.graphs[batch] = self._capture(batch)
        g.graph.replay()
        self.num_replays += 1
        return g.hidden[:n]
