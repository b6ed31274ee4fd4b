"""`baton generate` from the console script, and the default model through the offline API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BATON = Path(sys.executable).with_name("baton")


def test_help_lists_subcommands() -> None:
    out = subprocess.run([str(BATON), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "generate" in out.stdout


def test_generate_with_a_model_dir(tiny_model_dir) -> None:
    out = subprocess.run(
        [
            str(BATON),
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "The quick brown fox",
            "--max-tokens",
            "5",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONHASHSEED": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "5 generated" in out.stdout and "finish_reason=length" in out.stdout


def test_generate_reports_bad_input_cleanly(tiny_model_dir) -> None:
    out = subprocess.run(
        [
            str(BATON),
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "hi",
            "--max-tokens",
            "100000",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "max_model_len" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(600)
def test_default_model_chat_mentions_paris() -> None:
    """The bundled SmolLM2-135M-Instruct, greedy, with its chat template (the engine path end to end)."""
    from baton import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32", num_kv_blocks=16)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=10),
    )
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
