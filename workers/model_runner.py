"""Executes one ``SchedulerOutput`` on the model: packs the step's tokens, runs the forward over the paged KV
cache, and returns the logits of the positions that sample. Owns the KV cache tensor.

KV cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (see kernels/attention.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from baton.kernels.attention import AttentionMetadata
from baton.workers.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


def kv_cache_dtype_for(name: str, model_dtype: torch.dtype) -> torch.dtype:
    table = {
        "auto": model_dtype,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "fp8": torch.float8_e4m3fn,
        "fp8_e4m3": torch.float8_e4m3fn,
    }
    return table[name]


def block_bytes(spec: Any, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: Any,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        *,
        cuda_graphs: bool = False,
        max_num_seqs: int = 256,
        max_model_len: int = 4096,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self.device = device
        self.block_size = block_size
        self.kv_cache = torch.zeros(
            self.spec.num_layers,
            2,
            num_blocks,
            block_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            dtype=kv_dtype,
            device=device,
        )
        self.graphs = None
        self.graph_failures = 0
        if cuda_graphs and device.type == "cuda":
            from baton.workers.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                model, self.kv_cache, block_size, max_num_seqs, max_model_len
            )
            try:
                self.graphs.capture_all()  # at start, not in a serving step
            except RuntimeError:
                log.exception("CUDA graph capture failed at start; decode runs eagerly")
                self.graphs = None
                self.graph_failures += 1

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Returns float32 logits ``[rows, vocab]``: ``1 + num_draft`` rows per sampling chunk, in order."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        # A step of decodes and draft verifications only runs as a decode batch of one row per
        # token: the j-th token of a verified chunk becomes its own query at position start + j that
        # sees start + j + 1 keys of the same block table (its own and the earlier drafts' K/V are
        # written to the cache before attention reads it). So verification takes the decode kernel
        # and the decode CUDA graphs instead of the eager extend path.
        as_rows = all(c.num_tokens == 1 + c.num_draft and c.sample for c in out.chunks)
        for chunk in out.chunks:
            n = chunk.num_tokens
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            if as_rows:
                query_lens.extend([1] * n)
                seq_lens.extend(range(chunk.start + 1, chunk.start + n + 1))
                tables.extend([list(chunk.block_ids)] * n)
            else:
                query_lens.append(n)
                seq_lens.append(chunk.start + n)
                tables.append(list(chunk.block_ids))
            if chunk.sample:  # with drafts: the last num_draft + 1 rows (verification)
                sample_rows.extend(range(len(input_ids) - 1 - chunk.num_draft, len(input_ids)))
        decode_only = len(input_ids) == len(query_lens)
        if (
            self.graphs is not None
            and decode_only
            and self.graphs.can_run(len(input_ids), max(seq_lens))
        ):
            bs = self.block_size
            slots = [t[(p) // bs] * bs + p % bs for t, p in zip(tables, positions)]
            try:
                hidden = self.graphs.run(input_ids, positions, slots, seq_lens, tables)
            except RuntimeError:
                # A capture that fails must not fail the step (and every request in it): log it,
                # fall back to eager decode for good, and run this step eagerly.
                log.exception("CUDA graph capture/replay failed; decode runs eagerly from now on")
                self.graphs = None
                self.graph_failures += 1
                return self.execute(out)
        else:
            meta = AttentionMetadata.build(
                query_lens, seq_lens, tables, self.block_size, self.device
            )
            ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            hidden = self.model.forward(ids, pos, self.kv_cache, meta)  # [T, hidden]
        if not sample_rows:
            return torch.empty(0, self.spec.vocab_size, dtype=torch.float32, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    # -- KV transfer ------------------------------------------------------------------------------
    def gather_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """A sequence's blocks across all layers as one contiguous ``[L, 2, n, bs, H, D]`` buffer
        (written into ``out`` when given: e.g. a transport's pre-shared export arena).

        Triton kernel on CUDA; on CPU torch's own index_select is the fast path (and the kernel's reference).
        """
        from baton.kernels import cache_ops

        ids = torch.tensor(block_ids, dtype=torch.int32, device=self.device)
        if self.device.type == "cuda":
            return cache_ops.gather_kv_blocks(self.kv_cache, ids, out=out)
        packed = cache_ops.gather_kv_blocks_reference(self.kv_cache, ids)
        if out is None:
            return packed
        if out.shape != packed.shape or out.dtype != packed.dtype:
            raise ValueError(f"out must be {tuple(packed.shape)} {packed.dtype}")
        return out.copy_(packed)

    def scatter_blocks(self, buffer: torch.Tensor, block_ids: list[int]) -> None:
        from baton.kernels import cache_ops

        ids = torch.tensor(block_ids, dtype=torch.int32, device=self.device)
        buffer = buffer.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            cache_ops.scatter_kv_blocks(buffer, self.kv_cache, ids)
        else:
            cache_ops.scatter_kv_blocks_reference(buffer, self.kv_cache, ids)
