"""The Triton attention backend: cache write, then paged decode or extend attention.

Implements ``baton.kernels.attention.AttentionBackend``. A decode-only step (every sequence brings one
token) runs the split-K decode kernel; any other step, including prefill chunks mixed with decodes,
runs the extend kernel over the whole packed batch (a decode is an extend chunk of one token), so a
mixed step is one launch and still exact. Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from baton.kernels.attention import AttentionMetadata, LayerAttentionParams
from baton.kernels.cache_ops import reshape_and_cache
from baton.kernels.decode_attention import decode_attention
from baton.kernels.extend_attention import extend_attention


class TritonBackend:
    """Paged attention through the Triton kernels in ``baton.kernels``."""

    name = "triton"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        params: LayerAttentionParams,
    ) -> torch.Tensor:
        """Write k/v at ``meta.slot_mapping`` and return attention output ``[T, Hq, D]``."""
        reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, params.k_scale, params.v_scale)
        if q.shape[0] == 0:
            return torch.empty_like(q)
        common = dict(
            sliding_window=params.sliding_window,
            num_sink_tokens=params.num_sink_tokens,
            k_scale=params.k_scale,
            v_scale=params.v_scale,
        )
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, params.scale,
                max_seq_len=meta.max_seq_len, **common,
            )  # fmt: skip
        return extend_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            params.scale, max_query_len=meta.max_query_len, **common,
        )  # fmt: skip
