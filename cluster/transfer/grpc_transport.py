"""gRPC transport for hosts without a shared fabric: the source serves ``baton.v1.KVTransfer``; the sink pulls the
held export as a stream of ordered chunks (bounded message size, one deadline for the whole stream)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import torch
from baton.cluster.transfer.base import KVTransport, TransferError, TransportCaps
from baton.workers.kv_handle import KVHandle, torch_dtype

CHUNK_BYTES = 1 << 20


def _stubs():
    from baton.protos.build import ensure_generated

    ensure_generated()
    from baton.protos.baton.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

    return kv_transfer_pb2, kv_transfer_pb2_grpc


class GrpcTransport(KVTransport):
    name = "grpc"
    caps = TransportCaps(
        same_host_only=False,
        needs_pair_group=False,
        device_buffers=False,
        source_serves=True,
        exports_payload=False,
    )

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES, **kw) -> None:
        super().__init__(**kw)
        self.chunk_bytes = chunk_bytes
        self._server: grpc.Server | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def serve(self, lookup, on_sent=None) -> str:
        super().serve(lookup, on_sent)
        pb2, pb2_grpc = _stubs()
        transport = self

        class Servicer(pb2_grpc.KVTransferServicer):
            def Pull(self, request, context):  # noqa: N802 - gRPC method name
                held = transport._lookup(request.request_id) if transport._lookup else None
                if held is None:
                    context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"no held KV for {request.request_id!r} (lease expired?)",
                    )
                _, buffer = held
                raw = buffer.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
                total = raw.nbytes
                step = request.chunk_bytes or transport.chunk_bytes
                faults = transport.faults
                drop = faults.drop_stream_next > 0
                if drop:  # injected (tests): stop after half the bytes, in several chunks
                    faults.drop_stream_next -= 1
                    step = max(1, min(step, total // 4))
                view = memoryview(raw)
                for off in range(0, total, step):
                    if drop and off >= total // 2:
                        if faults.drop_stream_mode == "truncate":
                            return
                        context.abort(grpc.StatusCode.UNAVAILABLE, "injected: stream dropped")
                    yield pb2.KVChunk(
                        offset=off, total_bytes=total, data=bytes(view[off : off + step])
                    )
                transport._on_sent(total)

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb2_grpc.add_KVTransferServicer_to_server(Servicer(), self._server)
        port = self._server.add_insecure_port(f"{self.host}:0")
        self._server.start()
        return f"{self.host}:{port}"

    def _channel(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = grpc.insecure_channel(endpoint)
                self._channels[endpoint] = ch
            return ch

    def _receive(
        self, handle: KVHandle, endpoint: str, payload: bytes, peer_id: str, transfer_id: int
    ) -> torch.Tensor:
        pb2, pb2_grpc = _stubs()
        stub = pb2_grpc.KVTransferStub(self._channel(endpoint))
        expected = handle.nbytes
        data = bytearray(expected)
        got = 0
        req = pb2.PullRequest(
            request_id=handle.request_id, transfer_id=transfer_id, chunk_bytes=self.chunk_bytes
        )
        try:
            for chunk in stub.Pull(req, timeout=self.timeout_s):
                if chunk.total_bytes != expected or chunk.offset != got:
                    raise TransferError(
                        f"unexpected chunk at {chunk.offset} of {chunk.total_bytes}"
                    )
                data[got : got + len(chunk.data)] = chunk.data
                got += len(chunk.data)
        except grpc.RpcError as exc:
            raise TransferError(f"grpc pull of {handle.request_id!r}: {exc.code().name}") from exc
        if got != expected:
            raise TransferError(
                f"grpc pull of {handle.request_id!r} ended at {got}/{expected} bytes"
            )
        buf = torch.frombuffer(data, dtype=torch_dtype(handle.dtype)).reshape(handle.shape)
        return buf if self.device.type == "cpu" else buf.to(self.device)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5)
            self._server = None
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
