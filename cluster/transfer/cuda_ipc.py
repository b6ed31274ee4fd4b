"""CUDA IPC transport (same host, including the same GPU): the source exports a memory handle of the held
buffer (``torch.multiprocessing.reductions.reduce_tensor``), which travels with the KV handle; the sink opens it
and copies device to device. The source keeps the buffer alive until ``ack``, which the sink sends after its copy
has completed, so the opened memory never outlives its owner.
"""

from __future__ import annotations

import pickle

import torch
from baton.cluster.transfer.base import KVTransport, TransferError, TransportCaps
from baton.workers.kv_handle import KVHandle, dtype_name


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

    def export_payload(self, handle: KVHandle, buffer: torch.Tensor) -> bytes:
        from torch.multiprocessing.reductions import reduce_tensor

        if buffer.device.type != "cuda":
            raise TransferError("cuda_ipc can only export CUDA buffers")
        rebuild, args = reduce_tensor(buffer)
        self._on_sent(buffer.numel() * buffer.element_size())
        return pickle.dumps((rebuild, args))

    def _receive(
        self, handle: KVHandle, endpoint: str, payload: bytes, peer_id: str, transfer_id: int
    ) -> torch.Tensor:
        if not payload:
            raise TransferError("cuda_ipc receive without an exported handle")
        rebuild, args = pickle.loads(payload)
        src = rebuild(*args)  # a view on the source's memory
        if tuple(src.shape) != tuple(handle.shape) or dtype_name(src.dtype) != handle.dtype:
            raise TransferError(f"cuda_ipc buffer {tuple(src.shape)} does not match the handle")
        dst = torch.empty_like(src, device=self.device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        del src
        return dst
