"""The transports in one process (no Ray): gloo pair groups over a TCPStore rendezvous and the gRPC stream move
the exact bytes; lease-expired pulls fail fast; injected corruption is caught by the checksum; auto-choice."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from baton.cluster.transfer import TransferError, choose_transport, make_transport
from baton.workers.kv_handle import (
    KV_LAYOUT,
    KVHandle,
    default_algo,
    dtype_name,
    kv_checksum,
    verify,
)

pytestmark = pytest.mark.timeout(60)


def held(rid: str, n_blocks: int = 3) -> tuple[KVHandle, torch.Tensor]:
    buf = torch.randn(2, 2, n_blocks, 16, 2, 16)
    h = KVHandle(
        "p0",
        rid,
        tuple(range(1, n_blocks + 1)),
        tuple(buf.shape),
        dtype_name(buf.dtype),
        KV_LAYOUT,
        kv_checksum(buf),
        default_algo(buf),
        time.time() + 30,
        n_blocks * 16,
    )
    return h, buf


def run_pair(name: str):
    src = make_transport(name, worker_id="p0", timeout_s=5.0)
    dst = make_transport(name, worker_id="d0", timeout_s=5.0)
    table = dict([("a", held("a")), ("b", held("b", 5))])
    sent: list[int] = []
    endpoint = src.serve(table.get, sent.append)
    return src, dst, table, endpoint, sent


def both(*fns):
    errs: list[BaseException] = []
    results: list[object] = [None] * len(fns)

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=wrap, args=(i, f)) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    if errs:
        raise errs[0]
    return results


def test_gloo_pair_moves_exact_bytes_and_reuses_group():
    src, dst, table, endpoint, sent = run_pair("gloo")
    both(lambda: src.open_pair("d0", "", 0, 1), lambda: dst.open_pair("p0", endpoint, 1, 1))
    for i, rid in enumerate(("a", "b")):
        h, buf = table[rid]
        _, got = both(
            lambda: src.send(rid, "d0", i), lambda: dst.receive(h, peer_id="p0", transfer_id=i)
        )
        assert torch.equal(got, buf) and verify(h, got)
    assert sum(sent) == sum(t[1].numel() * 4 for t in table.values())
    with pytest.raises(TransferError):  # unknown / expired on the source: fails before any wait
        src.send("gone", "d0", 9)
    dst.faults.corrupt_next = 1
    h, buf = table["a"]
    _, got = both(
        lambda: src.send("a", "d0", 7), lambda: dst.receive(h, peer_id="p0", transfer_id=7)
    )
    assert not verify(h, got)
    src.close()
    dst.close()


def test_gloo_receive_times_out_without_a_sender():
    src, dst, table, endpoint, _ = run_pair("gloo")
    dst.timeout_s = src.timeout_s = 1.0
    both(lambda: src.open_pair("d0", "", 0, 1), lambda: dst.open_pair("p0", endpoint, 1, 1))
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        dst.receive(table["a"][0], peer_id="p0", transfer_id=3)
    assert time.monotonic() - t0 < 10


def test_grpc_stream_moves_exact_bytes_and_fails_fast_when_not_held():
    src, dst, table, endpoint, sent = run_pair("grpc")
    dst.chunk_bytes = 1000  # many uneven chunks
    for rid in ("a", "b"):
        h, buf = table[rid]
        got = dst.receive(h, endpoint=endpoint)
        assert torch.equal(got, buf) and verify(h, got)
    assert sum(sent) == sum(t[1].numel() * 4 for t in table.values())
    h, _ = held("missing")
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="NOT_FOUND"):
        dst.receive(h, endpoint=endpoint)
    assert time.monotonic() - t0 < 2
    src.close()
    dst.close()


def test_auto_choice_by_locality():
    assert choose_transport("auto", device_type="cpu", same_node=True) == "gloo"
    assert choose_transport("auto", device_type="cuda", same_node=True) == "cuda_ipc"
    assert choose_transport("auto", device_type="cuda", same_node=False) == "nccl"
    assert choose_transport("grpc", device_type="cpu", same_node=False) == "grpc"
    with pytest.raises(ValueError, match="same node"):
        choose_transport("cuda_ipc", device_type="cuda", same_node=False)
    with pytest.raises(ValueError, match="CUDA"):
        choose_transport("nccl", device_type="cpu", same_node=True)
    with pytest.raises(ValueError, match="unknown"):
        choose_transport("rdma", device_type="cpu", same_node=True)


class _Work:
    """A pending NCCL op (the edge of the world here): completes at ``done_at`` (monotonic)."""

    def __init__(self, done_at: float) -> None:
        self.done_at = done_at
        self.polls = 0
        self.waited = False

    def is_completed(self) -> bool:
        self.polls += 1
        return time.monotonic() >= self.done_at

    def wait(self, timeout=None) -> bool:
        assert timeout is None and self.is_completed(), "wait() only after completion, no timeout"
        self.waited = True
        return True


def test_nccl_wait_polls_without_a_millisecond_floor_and_times_out():
    t = make_transport("gloo", worker_id="d0", timeout_s=0.3)
    t.backend = "nccl"  # the NCCL wait path, on this instance only
    lat = []
    for _ in range(20):
        w = _Work(time.monotonic() + 2e-4)
        t._await(w, "receive")
        lat.append(time.monotonic() - w.done_at)
        assert w.waited and w.polls > 1
    assert sorted(lat)[10] < 5e-4  # NCCL's own wait(timeout) sleeps 1 ms between polls
    w = _Work(time.monotonic() + 0.05)  # past the spin: sleeps with a back-off, still prompt
    t._await(w, "receive")
    assert time.monotonic() - w.done_at < 0.01
    w = _Work(time.monotonic() + 60)
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        t._await(w, "receive")
    assert 0.3 <= time.monotonic() - t0 < 2 and not w.waited


def _nccl_source(conn) -> None:
    """Serves one export from cuda:0 over an NCCL pair and sends it three times."""
    import traceback

    try:
        torch.cuda.set_device(0)
        t = make_transport("nccl", worker_id="p0", device="cuda:0", timeout_s=60)
        buf = torch.randn(2, 2, 3, 16, 2, 64, device="cuda:0").to(torch.bfloat16)
        h = KVHandle(
            "p0", "a", (1, 2, 3), tuple(buf.shape), dtype_name(buf.dtype), KV_LAYOUT,
            kv_checksum(buf), default_algo(buf), time.time() + 60, 48,
        )  # fmt: skip
        endpoint = t.serve({"a": (h, buf)}.get)
        conn.send((endpoint, h, buf.cpu()))
        t.open_pair("d0", "", 0, 1)
        for i in range(3):
            t.send("a", "d0", i)
        conn.recv()
    except Exception:  # noqa: BLE001 - reported to the test
        conn.send(("error", traceback.format_exc()))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
def test_nccl_pair_moves_verified_bytes_and_catches_corruption():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_nccl_source, args=(there,))
    proc.start()
    try:
        assert here.poll(90), "source sent nothing"
        msg = here.recv()
        assert msg[0] != "error", msg[1]
        endpoint, h, want = msg
        sink = make_transport("nccl", worker_id="d0", device="cuda:1", timeout_s=60)
        sink.open_pair("p0", endpoint, 1, 1)
        got = sink.receive_verified(h, peer_id="p0", transfer_id=0)
        assert got.device == torch.device("cuda:1") and torch.equal(got.cpu(), want)
        sink.faults.corrupt_next = 1
        with pytest.raises(TransferError, match="checksum"):
            sink.receive_verified(h, peer_id="p0", transfer_id=1)
        assert torch.equal(sink.receive_verified(h, peer_id="p0", transfer_id=2).cpu(), want)
        here.send("done")
        sink.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
