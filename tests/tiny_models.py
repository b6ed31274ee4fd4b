"""Tiny random HF models with a real (tiny, trained) byte-level BPE tokenizer, built in-process with fixed seeds.

Used across the suite so that engine, cluster and router tests run in seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer briefly and politely.",
    "def add(a, b):\n    return a + b\n",
    "Baton serves large language models with disaggregated prefill and decode.",
    "Once upon a time there was a little robot who loved to count: one two three four five.",
] * 20


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCH_CONFIGS = {
    "llama": dict(cls="LlamaConfig", extra=dict(rope_scaling=None)),
    "llama3_rope": dict(
        cls="LlamaConfig",
        extra=dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=None)),
    "qwen2": dict(cls="Qwen2Config", extra=dict()),
    "qwen3": dict(cls="Qwen3Config", extra=dict(head_dim=16)),
}


def build_model_dir(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a random model of ``arch`` plus the tiny tokenizer into ``path``; returns ``path``."""
    import torch
    import transformers

    path = Path(path)
    tok = build_tokenizer()
    spec = ARCH_CONFIGS[arch]
    cfg_cls = getattr(transformers, spec["cls"])
    cfg = cfg_cls(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec["extra"],
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform logits; scale up so greedy margins are clear of float noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
