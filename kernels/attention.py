"""The one attention seam between the model runner and the kernels.

Contract (shared by every backend, the torch reference included):

KV cache layout, per layer: ``k_cache`` and ``v_cache`` each ``[num_blocks, block_size, num_kv_heads, head_dim]``
(views into one engine-wide tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, so a
sequence's blocks across all layers are one gather for KV transfer). The dtype is the model dtype, or
``torch.float8_e4m3fn`` with per-layer scalar scales (``k_scale``/``v_scale``: stored = real / scale).

One step packs T new tokens of B sequences (prefill chunks and decodes alike) ::

    q: [T, Hq, D]   k, v: [T, Hkv, D]          new tokens, packed in sequence order
    query_start_loc: [B+1]                     sequence b owns rows query_start_loc[b]:query_start_loc[b+1]
    seq_lens: [B]                              context length after this step (cached prefix + new tokens)
    slot_mapping: [T]                          where token t's K/V go: block_id * block_size + offset
    block_tables: [B, max_blocks]              physical block of each logical block (padding: 0)

The new tokens of sequence b sit at positions ``seq_lens[b] - qlen_b .. seq_lens[b] - 1`` and attend causally
to everything before them. ``forward`` writes the new K/V into the cache first, then attends.
Optional: ``sliding_window`` (a query at position p sees keys in (p - window, p]) and ``num_sink_tokens``
(the first positions stay visible even outside the window, StreamingLLM style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step layout of the packed batch; built once per step, shared by all layers."""

    query_start_loc: torch.Tensor  # [B+1] int32, device
    seq_lens: torch.Tensor  # [B] int32, device
    slot_mapping: torch.Tensor  # [T] int64, device
    block_tables: torch.Tensor  # [B, max_blocks] int32, device
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @staticmethod
    def build(
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Build metadata from host lists (the scheduler's view of one step)."""
        slots: list[int] = []
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
        )


@dataclass(frozen=True)
class LayerAttentionParams:
    """Static per-layer attention parameters."""

    scale: float
    sliding_window: int | None = None
    num_sink_tokens: int = 0
    k_scale: float = 1.0
    v_scale: float = 1.0


class AttentionBackend(Protocol):
    name: str

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
        """Write k/v at ``meta.slot_mapping`` and return attention output ``[T, Hq, D]`` in q's dtype."""
        ...


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    params: LayerAttentionParams,
) -> None:
    """Reshape-and-cache in plain torch (with fp8 quantization when the cache is fp8)."""
    nb, bs, h, d = k_cache.shape
    kc = k_cache.view(nb * bs, h, d)
    vc = v_cache.view(nb * bs, h, d)
    if k_cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel: copy the bytes
        kq = (k.float() / params.k_scale).to(k_cache.dtype).view(torch.uint8)
        vq = (v.float() / params.v_scale).to(v_cache.dtype).view(torch.uint8)
        kc.view(torch.uint8).index_copy_(0, slot_mapping, kq)
        vc.view(torch.uint8).index_copy_(0, slot_mapping, vq)
    else:
        kc.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        vc.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def visible_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None, num_sink_tokens: int
) -> torch.Tensor:
    """[Q, K] bool: causal, optionally windowed with sink tokens always visible."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        in_window = k_pos[None, :] > q_pos[:, None] - sliding_window
        if num_sink_tokens > 0:
            in_window = in_window | (k_pos[None, :] < num_sink_tokens)
        mask = mask & in_window
    return mask


class TorchReferenceBackend:
    """Plain-torch attention over the paged cache: the correctness oracle for the Triton kernels."""

    name = "torch"

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
        write_kv_reference(k, v, k_cache, v_cache, meta.slot_mapping, params)
        out = torch.empty_like(q)
        _, bs, hkv, d = k_cache.shape
        hq = q.shape[1]
        group = hq // hkv
        tables = meta.block_tables
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            nblocks = (slen + bs - 1) // bs
            blocks = tables[b, :nblocks].long()
            keys = k_cache[blocks].reshape(-1, hkv, d)[:slen]  # [S, Hkv, D]
            vals = v_cache[blocks].reshape(-1, hkv, d)[:slen]
            if k_cache.dtype == torch.float8_e4m3fn:
                keys = keys.float() * params.k_scale
                vals = vals.float() * params.v_scale
            keys = keys.to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
            vals = vals.to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
            qs = q[start : start + qlen].transpose(0, 1)  # [Hq, Q, D]
            scores = torch.matmul(qs, keys.transpose(1, 2)) * params.scale  # [Hq, Q, S]
            q_pos = torch.arange(slen - qlen, slen, device=q.device)
            k_pos = torch.arange(slen, device=q.device)
            mask = visible_mask(q_pos, k_pos, params.sliding_window, params.num_sink_tokens)
            scores = scores.masked_fill(~mask[None], float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out[start : start + qlen] = torch.matmul(probs, vals).transpose(0, 1)
            start += qlen
        return out


def get_backend(name: str) -> AttentionBackend:
    """``torch`` (reference) or ``triton`` (kernels/, also on CPU under TRITON_INTERPRET=1)."""
    if name == "torch":
        return TorchReferenceBackend()
    if name == "triton":
        from baton.kernels.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; expected 'torch' or 'triton'")
