"""Swap preemption: with a KV budget too small for the burst, greedy outputs are identical with swap
and with recompute preemption, and neither device nor host blocks leak (integrity after every step)."""

from __future__ import annotations

import pytest
import torch
from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.workers.engine import EngineCore
from baton.workers.model_runner import block_bytes
from baton.workers.sampling_params import SamplingParams
from baton.workers.swap import HostBlockAllocator

MAX_TOKENS = 24


def make_engine(
    model_dir, mode: str, host_blocks: int, *, spec=None, eviction=None, min_tokens: int = 0
) -> EngineCore:
    probe = EngineConfig(model=str(model_dir), device="cpu", dtype="float32")
    cache = dict(block_size=4, num_kv_blocks=24)
    if eviction:
        cache.update(kv_eviction="sink_window", num_sink_tokens=4, eviction_window=16)
    eng = EngineCore(EngineConfig(
        model=probe.model, device="cpu", dtype="float32", attention_backend="torch",
        cache=CacheConfig(**cache, swap_space_bytes=0),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, preemption_mode=mode,
                                  swap_min_tokens=min_tokens),
        speculative=spec,
    ))  # fmt: skip
    if host_blocks:
        per = block_bytes(eng.spec, 4, eng.kv_dtype)
        eng = EngineCore(EngineConfig(
            model=probe.model, device="cpu", dtype="float32", attention_backend="torch",
            cache=CacheConfig(**cache, swap_space_bytes=per * host_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=64, preemption_mode=mode,
                                      swap_min_tokens=min_tokens),
            speculative=spec,
        ))  # fmt: skip
    for _ in range(16):  # over-admit: outputs outgrow the prediction and the pool runs dry
        eng.scheduler.predictor.observe(eng.config.cache.namespace, 1)
    return eng


def burst(eng: EngineCore) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(5)
    lengths = [3, 9, 14, 17, 22, 6]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, n in enumerate(lengths):
        eng.add_request(
            f"b{i}", torch.randint(3, eng.spec.vocab_size, (n,), generator=g).tolist(), params
        )
    done: dict[str, list[int]] = {}
    for _ in range(1000):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        eng.check_integrity()
    assert not eng.has_unfinished_requests() and eng.pool.num_used == 0
    return done


@pytest.fixture(scope="module")
def recompute_reference(tiny_model_dir) -> dict[str, list[int]]:
    eng = make_engine(tiny_model_dir, "recompute", 0)
    out = burst(eng)
    assert eng.scheduler.num_preemptions > 0
    return out


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swap_outputs_identical_to_recompute(tiny_model_dir, recompute_reference, mode) -> None:
    eng = make_engine(tiny_model_dir, mode, 64, min_tokens=8)
    assert burst(eng) == recompute_reference
    s = eng.stats()
    assert s.num_swap_preemptions > 0
    assert s.swapped_out_blocks == s.swapped_in_blocks > 0
    assert s.swap_out_bytes == s.swapped_out_blocks * block_bytes(eng.spec, 4, eng.kv_dtype)
    assert s.swap_out_seconds > 0 and s.swap_in_seconds > 0
    assert s.swap_host_blocks_free == s.swap_host_blocks == 64


def test_full_host_pool_falls_back_to_recompute(tiny_model_dir, recompute_reference) -> None:
    eng = make_engine(tiny_model_dir, "swap", 3)  # fits one short sequence at most
    assert burst(eng) == recompute_reference
    s = eng.stats()
    assert s.scheduler.num_preemptions > s.num_swap_preemptions
    assert s.swap_host_blocks_free == 3


def test_swap_with_speculation_and_eviction_stays_consistent(tiny_model_dir) -> None:
    plain = burst(make_engine(tiny_model_dir, "recompute", 0, eviction=True))
    eng = make_engine(tiny_model_dir, "swap", 64, spec={"k": 3, "n_min": 1}, eviction=True)
    assert burst(eng) == plain
    assert eng.stats().num_swap_preemptions > 0


def test_abort_while_swapped_frees_host_blocks(tiny_model_dir) -> None:
    eng = make_engine(tiny_model_dir, "swap", 64)
    g = torch.Generator().manual_seed(9)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(5):
        eng.add_request(f"x{i}", torch.randint(3, 300, (20,), generator=g).tolist(), params)
    swapped = None
    for _ in range(300):
        eng.step()
        eng.check_integrity()
        swapped = next((r for r in eng.scheduler.waiting if r.swap_host_ids), None)
        if swapped is not None:
            break
    assert swapped is not None, "the burst was meant to swap a sequence out"
    assert eng.stats().swap_host_blocks_free < 64
    assert eng.abort_request(swapped.request_id)
    eng.check_integrity()
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_integrity()
    assert eng.stats().swap_host_blocks_free == 64 and eng.pool.num_used == 0


def test_host_allocator_accounting() -> None:
    pool = HostBlockAllocator(4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    pool.check_integrity(a)
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity(a[:2])
    pool.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([0])
    with pytest.raises(RuntimeError):
        pool.allocate(5)
