"""cuda_ipc's export arena: the first-fit extent allocator, the arena's views, the prefill role gathering
straight into it (freed on ack and on lease expiry, per-buffer fallback when full), ``receive_verified``'s
default path, and (GPU) two processes: one arena opened once for many transfers, corruption caught."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest
import torch
from baton.cluster.transfer import TransferError, make_transport
from baton.cluster.transfer.base import ChecksumMismatch
from baton.cluster.transfer.cuda_ipc import (
    ArenaRef,
    ExportArena,
    ExtentAllocator,
    TensorRef,
    decode_payload,
)
from baton.kernels.checksum import verified_copier
from baton.workers.config import CacheConfig, EngineConfig
from baton.workers.engine import EngineCore
from baton.workers.kv_handle import (
    ALGO_WSUM,
    ALGO_WSUM32,
    ALGO_WSUM32_B2,
    KV_LAYOUT,
    KVHandle,
    dtype_name,
    kv_checksum,
)
from baton.workers.roles import EngineLoop, PrefillRole
from baton.workers.sampling_params import SamplingParams
from test_transfer import held

pytestmark = pytest.mark.timeout(120)


# -- the extent allocator ---------------------------------------------------------------------------
def test_extents_are_aligned_first_fit_and_coalesce():
    a = ExtentAllocator(4096, align=256)
    x, y, z = a.alloc(1), a.alloc(300), a.alloc(256)
    assert (x, y, z) == (0, 256, 768)  # sizes round up to 256
    assert a.used_bytes == 1024
    a.free(y)  # a 512-byte hole at 256
    assert a.alloc(600) == 1024  # does not fit the hole: first fit goes past it
    assert a.alloc(200) == 256  # fits the hole
    a.free(256)
    a.free(x)
    a.free(z)
    a.free(1024)
    assert a.used_bytes == 0 and a.num_free_extents == 1 and a.largest_free == 4096


def test_full_arena_returns_none_and_fragmentation_is_undone():
    a = ExtentAllocator(2048, align=256)
    offs = [a.alloc(256) for _ in range(8)]
    assert offs == [i * 256 for i in range(8)] and a.alloc(1) is None
    for off in offs[::2]:
        a.free(off)  # four 256-byte holes: 1024 bytes free, none contiguous
    assert a.largest_free == 256 and a.alloc(512) is None
    for off in offs[1::2]:
        a.free(off)
    assert a.num_free_extents == 1 and a.alloc(2048) == 0
    with pytest.raises(ValueError):
        a.free(256)  # not an extent
    with pytest.raises(ValueError):
        a.alloc(0)


def test_random_churn_never_overlaps():
    rng = random.Random(0)
    a = ExtentAllocator(1 << 16, align=256)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.free(off)
            del live[off]
        else:
            n = rng.randint(1, 5000)
            off = a.alloc(n)
            if off is not None:
                assert off % 256 == 0 and off + n <= a.capacity
                for o, m in live.items():
                    assert off + n <= o or o + m <= off
                live[off] = n
    for off in list(live):
        a.free(off)
    assert a.num_free_extents == 1 and a.used_bytes == 0


def test_threads_allocate_disjoint_extents():
    a = ExtentAllocator(1 << 20, align=256)
    got: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        for _ in range(300):
            off = a.alloc(512)
            assert off is not None
            got[i].append(off)
            if len(got[i]) > 50:
                a.free(got[i].pop(0))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    live = [o for g in got for o in g]
    assert len(live) == len(set(live)) == 4 * 50
    assert a.used_bytes == 4 * 50 * 512


# -- the arena and the prefill role ----------------------------------------------------------------
def test_arena_views_and_locate():
    arena = ExportArena(1 << 16, "cpu")
    view, release = arena.alloc((2, 2, 3, 16, 2, 8), torch.bfloat16)
    assert view.is_contiguous() and view.dtype == torch.bfloat16
    off = arena.locate(view)
    assert off is not None and off % 256 == 0
    view.fill_(1.5)
    nbytes = view.numel() * 2
    assert torch.equal(arena.buffer[off : off + nbytes].view(torch.bfloat16), view.reshape(-1))
    assert arena.locate(torch.empty(4)) is None
    assert arena.alloc((1 << 20,), torch.uint8) is None  # larger than the arena
    release()
    assert arena.extents.used_bytes == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefill_with_arena(tiny_model_dir):
    cfg = EngineConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=48),
    )
    loop = EngineLoop(EngineCore(cfg, worker_id="p0"))
    clock = FakeClock()
    # One [L=2, 2, n, 16, H, D] float32 block is small: size the arena for about three of the prompts.
    cache = loop.engine.runner.kv_cache
    per_block = cache[:, :, :1].numel() * cache.element_size()
    arena = ExportArena(per_block * 7, "cpu")
    role = PrefillRole(loop, lease_s=5.0, clock=clock, export_alloc=arena.alloc)
    yield role, arena, clock
    loop.call(lambda e: e.check_integrity()).result(10)
    loop.stop()


def test_prefill_gathers_into_the_arena_and_frees_on_ack_and_expiry(prefill_with_arena):
    role, arena, clock = prefill_with_arena
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = {"a": list(range(3, 40)), "b": list(range(5, 30)), "c": list(range(7, 50))}
    for rid, p in prompts.items():
        role.prefill(rid, p, sp).result(60)
    inside = {}
    for rid in prompts:
        h, buf = role.buffer_for(rid)
        inside[rid] = arena.locate(buf)
        want = role.loop.call(lambda e, r=rid: e.export_kv(r)).result(10)
        assert torch.equal(buf, want) and kv_checksum(buf) == h.checksum
    # a (3 blocks) and b (2) fit in 7 blocks; c (3) does not: it falls back to its own buffer
    assert inside["a"] is not None and inside["b"] is not None and inside["c"] is None
    used = arena.extents.used_bytes
    assert role.ack("a")
    assert arena.extents.used_bytes < used
    clock.now += 10  # b's and c's leases expire on the loop thread
    deadline = time.monotonic() + 10
    while role.num_held() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert role.num_held() == 0 and arena.extents.used_bytes == 0


# -- receive_verified, default path (no GPU) -------------------------------------------------------
def _concurrently(send, receive):
    """Run the source's ``send`` beside the sink's ``receive`` (a pair transfer); receive's result."""
    errs: list[BaseException] = []

    def run_send():
        try:
            send()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errs.append(e)

    t = threading.Thread(target=run_send)
    t.start()
    try:
        return receive()
    finally:
        t.join(30)
        assert not t.is_alive()
        if errs:
            raise errs[0]


def test_receive_verified_default_catches_injected_corruption():
    # gloo needs no generated gRPC stubs (the GPU box has no grpc_tools)
    src = make_transport("gloo", worker_id="p0", timeout_s=5.0)
    dst = make_transport("gloo", worker_id="d0", timeout_s=5.0)
    table = dict([("a", held("a"))])
    endpoint = src.serve(table.get)
    try:
        _concurrently(
            lambda: src.open_pair("d0", "", 0, 1), lambda: dst.open_pair("p0", endpoint, 1, 1)
        )
        h, buf = table["a"]

        def transfer(i: int) -> torch.Tensor:
            return _concurrently(
                lambda: src.send("a", "d0", i),
                lambda: dst.receive_verified(h, peer_id="p0", transfer_id=i),
            )

        assert torch.equal(transfer(0), buf)
        dst.faults.corrupt_next = 1
        with pytest.raises(ChecksumMismatch, match="checksum"):
            transfer(1)
        assert torch.equal(transfer(2), buf)  # one-shot fault
    finally:
        src.close()
        dst.close()


def test_payloads_round_trip_and_unknown_ones_are_refused():
    ref = ArenaRef("ab" * 16, 256 * 7, 3 << 20, b"opener-bytes")
    assert decode_payload(ref.encode()) == ref
    tref = TensorRef((len, ("xyz",)))
    assert decode_payload(tref.encode()) == tref
    for bad in (b"", b"KVA1short", b"nope" + ref.encode()[4:]):
        with pytest.raises(TransferError, match="unknown kind"):
            decode_payload(bad)


# -- two processes on one GPU ----------------------------------------------------------------------
def _gpu_source(arena_mib: int, conn) -> None:
    """Holds three exports (in one arena when it is on) and sends (handle, payload, bytes): one
    per checksum algorithm (the default wsum32x2, verified on the device for arena exports; the
    older wsum64 and wsum32x2+blake2b, verified by their fused copies and a host comparison)."""
    import traceback

    try:
        t = make_transport(
            "cuda_ipc", worker_id="p0", device="cuda", export_arena_bytes=arena_mib << 20
        )
        alloc = t.export_allocator()
        keep = []
        algos = (ALGO_WSUM32, ALGO_WSUM, ALGO_WSUM32_B2)
        for i, n in enumerate((3, 5, 4)):
            data = torch.randn(2, 2, n, 16, 2, 64, device="cuda").to(torch.bfloat16)
            slot = alloc(tuple(data.shape), data.dtype) if alloc is not None else None
            buf = slot[0].copy_(data) if slot is not None else data
            keep.append(buf)
            h = KVHandle(
                "p0",
                f"r{i}",
                tuple(range(n)),
                tuple(buf.shape),
                dtype_name(buf.dtype),
                KV_LAYOUT,
                kv_checksum(buf, algos[i]),
                algos[i],
                time.time() + 60,
                n * 16,
            )
            conn.send((h, t.export_payload(h, buf), buf.cpu()))
        conn.recv()  # the sink is done: only now may the memory go
    except Exception:  # noqa: BLE001 - reported to the test
        conn.send(("error", traceback.format_exc()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arena_mib", [64, 0], ids=["arena", "per-buffer"])
def test_two_processes_open_the_arena_once_and_catch_corruption(arena_mib):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_gpu_source, args=(arena_mib, there))
    proc.start()
    sink = make_transport("cuda_ipc", worker_id="d0", device="cuda")
    try:
        msgs = []
        for _ in range(3):
            assert here.poll(90), "source sent nothing"
            msg = here.recv()
            assert msg[0] != "error", msg[1]
            msgs.append(msg)
        refs = [decode_payload(p) for _, p, _ in msgs]
        assert [h.checksum_algo for h, _, _ in msgs] == [ALGO_WSUM32, ALGO_WSUM, ALGO_WSUM32_B2]
        assert all(isinstance(r, ArenaRef) for r in refs) == bool(arena_mib)
        copier = verified_copier("cuda")
        direct, syncs = copier.direct_launches, copier.stream_syncs
        for _ in range(2):  # the second round launches the compiled kernel directly
            for h, payload, want in msgs:
                got = sink.receive_verified(h, payload=payload)
                assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
        assert sink.arenas_opened == (1 if arena_mib else 0)
        assert copier.direct_launches >= direct + (1 if arena_mib else 0)
        assert copier.stream_syncs == syncs  # verdicts polled from pinned memory
        for h, payload, _ in msgs:  # the sums are compared, not trusted (on the device for msgs[0])
            wrong = "0" * (16 if h.checksum_algo == ALGO_WSUM32 else 32)
            with pytest.raises(ChecksumMismatch):
                sink.receive_verified(replace(h, checksum=wrong), payload=payload)
        got = sink.receive_verified(msgs[0][0], payload=msgs[0][1])  # the state was reset
        assert torch.equal(got.cpu(), msgs[0][2])
        h, payload, want = msgs[2]
        sink.faults.corrupt_next = 1
        with pytest.raises(TransferError, match="checksum"):
            sink.receive_verified(h, payload=payload)
        got = sink.receive(h, payload=payload)  # the unverified path moves the same bytes
        assert torch.equal(got.cpu(), want)
        assert sink.arenas_opened == (1 if arena_mib else 0)
        here.send("done")
    finally:
        sink.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
