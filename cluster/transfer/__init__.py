"""KV transfer plane: the ``KVTransport`` interface, four transports and the choice between them.

``choose_transport`` picks by locality and device (same node + CUDA -> cuda_ipc; CUDA across nodes -> nccl;
CPU -> gloo) unless the operator names one; ``make_transport`` builds it. Transports are imported lazily so a
CPU-only process never touches CUDA or NCCL symbols.
"""

from __future__ import annotations

import importlib

from baton.cluster.transfer.base import (
    KVTransport,
    TransferError,
    TransferFaults,
    TransportCaps,
)

TRANSPORTS: dict[str, str] = {
    "gloo": "baton.cluster.transfer.pair_group:GlooTransport",
    "nccl": "baton.cluster.transfer.pair_group:NcclTransport",
    "cuda_ipc": "baton.cluster.transfer.cuda_ipc:CudaIpcTransport",
    "grpc": "baton.cluster.transfer.grpc_transport:GrpcTransport",
}


def transport_class(name: str) -> type[KVTransport]:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}: expected one of {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def choose_transport(requested: str, *, device_type: str, same_node: bool) -> str:
    """The transport for a (prefill, decode) placement; ``requested`` "auto" decides by locality."""
    if requested == "auto":
        if device_type == "cuda":
            return "cuda_ipc" if same_node else "nccl"
        return "gloo"
    caps = transport_class(requested).caps
    if caps.same_host_only and not same_node:
        raise ValueError(f"transport {requested!r} needs prefill and decode on the same node")
    if caps.device_buffers and device_type != "cuda" and requested != "grpc":
        raise ValueError(f"transport {requested!r} needs CUDA workers (device is {device_type})")
    return requested


def make_transport(name: str, **kw) -> KVTransport:
    return transport_class(name)(**kw)


__all__ = [
    "KVTransport",
    "TransferError",
    "TransferFaults",
    "TransportCaps",
    "TRANSPORTS",
    "choose_transport",
    "make_transport",
    "transport_class",
]
