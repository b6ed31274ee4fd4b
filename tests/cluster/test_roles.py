"""Worker roles without Ray: prefill role -> KV handle -> decode role reproduces the offline engine's greedy
tokens; leases expire and free blocks; aborts free blocks; the block pools stay consistent."""

from __future__ import annotations

import pytest
import torch
from baton.workers.config import CacheConfig, EngineConfig
from baton.workers.engine import EngineCore
from baton.workers.kv_handle import kv_checksum, verify
from baton.workers.llm import LLM
from baton.workers.roles import (
    ColocatedRole,
    DecodeRole,
    EngineLoop,
    PrefillRole,
    role_stats,
)
from baton.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 33, 40)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def engine(model_dir, wid: str) -> EngineCore:
    cfg = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=48),
    )
    return EngineCore(cfg, worker_id=wid)


def collect(stream, timeout: float = 30.0) -> tuple[list[int], str | None, str]:
    tokens: list[int] = []
    text = ""
    for _ in range(1000):
        for d in stream.poll(timeout):
            tokens += d.token_ids
            text += d.text
            if d.finish_reason is not None:
                return tokens, d.finish_reason, text
    raise AssertionError("stream did not finish")


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=48)
    return [
        (list(o.outputs[0].token_ids), o.outputs[0].text) for o in llm.generate(PROMPTS, GREEDY)
    ]


@pytest.fixture
def pair(tiny_model_dir):
    clock = FakeClock()
    ploop, dloop = (
        EngineLoop(engine(tiny_model_dir, "p0")),
        EngineLoop(engine(tiny_model_dir, "d0")),
    )
    yield PrefillRole(ploop, lease_s=5.0, clock=clock), DecodeRole(dloop), clock
    for loop in (ploop, dloop):
        loop.call(lambda e: e.check_integrity()).result(10)
        loop.stop()


def test_prefill_handle_decode_matches_offline(pair, offline):
    prefill, decode, _ = pair
    futures = [prefill.prefill(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    results = [f.result(30) for f in futures]
    streams = []
    for i, (res, prompt) in enumerate(zip(results, PROMPTS)):
        h = res.handle
        assert h is not None and res.final is None
        assert h.worker_id == "p0" and h.num_prompt_tokens == len(prompt)
        assert h.shape[2] == len(h.block_ids) == (len(prompt) + 15) // 16
        got = prefill.buffer_for(f"r{i}")
        assert got is not None and verify(h, got[1])
        kv = got[1].clone()
        streams.append(
            decode.start(
                f"r{i}",
                prompt,
                GREEDY,
                output_token_ids=[res.first_token_id],
                kv=kv,
                emit_prefix=[res.first_token_id],
            )
        )
        assert prefill.ack(f"r{i}")
    for s, (want_tokens, want_text) in zip(streams, offline):
        assert s.placed.result(10) is True
        tokens, reason, text = collect(s)
        assert tokens == want_tokens and reason == "length" and text == want_text
    ps = role_stats(prefill.loop, "prefill", prefill, None)
    ds = role_stats(decode.loop, "decode", None, decode)
    assert ps.num_held == 0 and ps.num_free_blocks == ps.num_total_blocks
    assert ds.kv_bytes_received > 0 and ds.prompt_tokens_computed == 0
    assert ds.num_free_blocks == ds.num_total_blocks and ds.recomputed_prompt_tokens == 0


def test_recompute_without_kv_and_conditional_match_offline(pair, offline):
    prefill, decode, _ = pair
    res = prefill.prefill("x", PROMPTS[2], GREEDY).result(30)
    prefill.ack("x")
    s1 = decode.start(
        "x",
        PROMPTS[2],
        GREEDY,
        output_token_ids=[res.first_token_id],
        kv=None,
        emit_prefix=[res.first_token_id],
    )
    s2 = decode.start("y", PROMPTS[1], GREEDY, conditional=True)
    assert s1.placed.result(10) is False
    assert collect(s1)[0] == offline[2][0]
    assert collect(s2)[0] == offline[1][0]
    ds = role_stats(decode.loop, "decode", None, decode)
    assert ds.recomputed_prompt_tokens == len(PROMPTS[2])
    assert ds.conditional_prompt_tokens == len(PROMPTS[1])


def test_resume_from_streamed_tokens_is_identical(pair, offline):
    _, decode, _ = pair
    want = offline[3][0]
    s = decode.start("z", PROMPTS[3], GREEDY, output_token_ids=want[:3], kv=None)
    tokens, reason, _ = collect(s)
    assert want[:3] + tokens == want and reason == "length"


def test_lease_expiry_frees_blocks(pair):
    prefill, _, clock = pair
    base = role_stats(prefill.loop, "prefill", prefill, None).num_free_blocks
    res = prefill.prefill("lease", PROMPTS[3], GREEDY).result(30)
    assert res.handle is not None and res.handle.lease_deadline == pytest.approx(clock.now + 5.0)
    held = role_stats(prefill.loop, "prefill", prefill, None)
    assert held.num_held == 1 and held.num_free_blocks == base - len(res.handle.block_ids)
    clock.now += 5.0
    assert prefill.buffer_for("lease") is None  # expired for pullers at once
    for _ in range(200):
        st = role_stats(prefill.loop, "prefill", prefill, None)
        if st.num_held == 0:
            break
    assert st.num_free_blocks == base and st.leases_expired == 1
    assert not prefill.ack("lease")


def test_abort_frees_and_streams_abort(pair):
    prefill, decode, _ = pair
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    s = decode.start("ab", PROMPTS[0], long, conditional=True)
    assert s.poll(30)  # running
    assert decode.abort("ab")
    _, reason, _ = collect(s)
    assert reason == "abort"
    res = prefill.prefill("pab", PROMPTS[1], GREEDY).result(30)
    assert res.handle is not None and prefill.abort("pab")
    assert role_stats(prefill.loop, "prefill", prefill, None).num_held == 0
    st = role_stats(decode.loop, "decode", None, decode)
    assert st.num_free_blocks == st.num_total_blocks


def test_first_token_finish_holds_nothing(pair):
    prefill, _, _ = pair
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    res = prefill.prefill("one", PROMPTS[1], one).result(30)
    assert res.handle is None and res.final is not None
    assert res.final.finish_reason == "length" and res.final.token_ids == (res.first_token_id,)
    assert prefill.num_held() == 0


def test_validation_error_surfaces(pair):
    prefill, decode, _ = pair
    with pytest.raises(ValueError):
        prefill.prefill("bad", [], GREEDY).result(10)
    s = decode.start("bad2", [10**6], GREEDY, conditional=True)
    with pytest.raises(ValueError):
        s.placed.result(10)


def test_colocated_and_checksum_detects_one_byte(tiny_model_dir, offline):
    loop = EngineLoop(engine(tiny_model_dir, "c0"))
    try:
        role = ColocatedRole(loop)
        res = role.prefill("c", PROMPTS[2], GREEDY).result(30)
        handle, buf = role.buffer_for("c")
        bad = buf.clone()
        bad.view(torch.uint8).view(-1)[123] ^= 0x10
        assert not verify(handle, bad)
        assert kv_checksum(bad, "wsum64+blake2b") != kv_checksum(buf, "wsum64+blake2b")
        role.ack("c")
        s = role.start(
            "c",
            PROMPTS[2],
            GREEDY,
            output_token_ids=[res.first_token_id],
            kv=buf,
            emit_prefix=[res.first_token_id],
        )
        assert collect(s)[0] == offline[2][0]
        loop.call(lambda e: e.check_integrity()).result(10)
    finally:
        loop.stop()
