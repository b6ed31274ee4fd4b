"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache, in plain torch.

Contract with the engine:

    model = build_model(hf_config, dtype, device, attn_backend)
    hidden = model.forward(input_ids, positions, kv_cache, meta)  # [T], [T] -> [T, hidden]
    logits = model.compute_logits(hidden[rows])  # [N, hidden] -> [N, vocab] float32
    model.load_weights((hf_name, tensor) for ...)  # HF checkpoint names
    model.spec  # ModelSpec (cache sizing, eos ids)

``kv_cache`` is the engine-wide tensor
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; layer ``l`` hands
``kv_cache[l, 0]`` / ``kv_cache[l, 1]`` to the attention backend, which writes the new K/V at
``meta.slot_mapping`` and attends (see ``baton.kernels.attention``).

Numerics follow transformers' eager code op for op (separate q/k/v and gate/up projections, RMSNorm
in float32, RoPE cos/sin computed in float32 from ``positions * inv_freq`` and cast to the model
dtype, logits in the model dtype then cast to float32), so float32 on CPU is token-exact with HF
``generate``. Parameter names mirror HF's, so loading is a name lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from baton.kernels.attention import (
    AttentionBackend,
    AttentionMetadata,
    LayerAttentionParams,
    get_backend,
)
from torch import nn
from transformers.activations import ACT2FN

# RoPE types whose frequencies are fixed at load time. "dynamic" and "longrope" recompute inv_freq
# from the running sequence length inside HF's forward, which a paged cache shared across lengths
# cannot mirror.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a model: cache shape, limits, stop tokens.

    ``sliding_window`` is set only when *every* layer slides (then blocks older than the window are
    dead for all layers); per-layer windows live in each layer's ``LayerAttentionParams``.
    """

    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ArchTraits:
    """Where the four architectures differ (everything else is Llama)."""

    qkv_bias: Callable[[Any], bool]
    o_bias: Callable[[Any], bool]
    mlp_bias: Callable[[Any], bool]
    qk_norm: bool
    layer_windows: Callable[[Any], list[int | None]]


def _no_windows(cfg: Any) -> list[int | None]:
    return [None] * cfg.num_hidden_layers


def _mistral_windows(cfg: Any) -> list[int | None]:
    return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers


def _qwen_windows(cfg: Any) -> list[int | None]:
    """Qwen2/3: ``layer_types`` (transformers 5.x), else ``max_window_layers`` (4.x)."""
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", False) or window is None:
        return [None] * cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    first = getattr(cfg, "max_window_layers", 0)
    return [window if i >= first else None for i in range(cfg.num_hidden_layers)]


def _attr(name: str, default: bool = False) -> Callable[[Any], bool]:
    return lambda cfg: bool(getattr(cfg, name, default))


def _const(value: bool) -> Callable[[Any], bool]:
    return lambda cfg: value


ARCHITECTURES: dict[str, ArchTraits] = {
    "LlamaForCausalLM": ArchTraits(
        _attr("attention_bias"), _attr("attention_bias"), _attr("mlp_bias"), False, _no_windows
    ),
    "MistralForCausalLM": ArchTraits(
        _const(False), _const(False), _const(False), False, _mistral_windows
    ),
    "Qwen2ForCausalLM": ArchTraits(
        _const(True), _const(False), _const(False), False, _qwen_windows
    ),
    "Qwen3ForCausalLM": ArchTraits(
        _attr("attention_bias"), _attr("attention_bias"), _const(False), True, _qwen_windows
    ),
}


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def architecture_of(hf_config: Any) -> str:
    """The first supported name in ``config.architectures``; a clear error naming it otherwise."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return name
    if not names and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config.model_type]  # a config saved without "architectures"
    model_type = getattr(hf_config, "model_type", None)
    shown = ", ".join(names) if names else f"none given (model_type={model_type!r})"
    raise ValueError(
        f"unsupported model architecture: {shown}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The RoPE dict in transformers 5.x shape (``rope_parameters``) from 5.x or 4.x configs."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_scaling (maybe None) + rope_theta
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_type" not in params and isinstance(params.get("rope_theta"), dict):
        raise ValueError("per-layer-type RoPE parameters are not supported by the Llama runner")
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def compute_rope(cfg: Any) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float32, attention_scaling)`` from transformers' own RoPE init."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(cfg)
    rope_type = params["rope_type"]
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE type {rope_type!r}: supported are {', '.join(_STATIC_ROPE_TYPES)} "
            "(dynamic/longrope rescale with the running sequence length)"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the Llama family runner")
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        # transformers 5.x keeps the default in each model's rotary class; same formula, same
        # dtypes.
        dim = head_dim_of(cfg)
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalize in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, factory: dict[str, Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, **factory), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: Any,
        traits: ArchTraits,
        window: int | None,
        backend: AttentionBackend,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        hidden, hq, hkv, d = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        qkv_bias, o_bias = traits.qkv_bias(cfg), traits.o_bias(cfg)
        self.q_proj = nn.Linear(hidden, hq * d, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(hidden, hkv * d, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(hidden, hkv * d, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(hq * d, hidden, bias=o_bias, **factory)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, factory) if traits.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, factory) if traits.qk_norm else None
        self.params = LayerAttentionParams(scale=d**-0.5, sliding_window=window)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,  # [T, 1, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.params)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))  # [T, hidden]


class MLP(nn.Module):
    def __init__(self, cfg: Any, traits: ArchTraits, factory: dict[str, Any]) -> None:
        super().__init__()
        bias = traits.mlp_bias(cfg)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias, **factory)
        self.act_fn = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: Any,
        traits: ArchTraits,
        window: int | None,
        backend: AttentionBackend,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, traits, window, backend, factory)
        self.mlp = MLP(cfg, traits, factory)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """HF's ``model.*`` submodule: embeddings, layers, final norm."""

    def __init__(
        self, cfg: Any, traits: ArchTraits, backend: AttentionBackend, factory: dict[str, Any]
    ) -> None:
        super().__init__()
        windows = traits.layer_windows(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, traits, windows[i], backend, factory)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)


class LlamaFamilyForCausalLM(nn.Module):
    """One class for all four architectures; ``ARCHITECTURES`` holds what differs."""

    def __init__(
        self, hf_config: Any, dtype: torch.dtype, device: torch.device, backend: AttentionBackend
    ) -> None:
        super().__init__()
        arch = architecture_of(hf_config)
        traits = ARCHITECTURES[arch]
        cfg = hf_config
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        self.config = cfg
        self.backend = backend
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        factory: dict[str, Any] = {"device": "meta", "dtype": dtype}
        self.model = Backbone(cfg, traits, backend, factory)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **factory)
        if self.tie_word_embeddings:
            self.lm_head.weight = None  # type: ignore[assignment]  # re-tied after allocation
        self.to_empty(device=device)  # uninitialized storage; load_weights or a dummy init fills it
        self.requires_grad_(False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.attention_scaling = compute_rope(cfg)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # float32, always
        windows = traits.layer_windows(cfg)
        all_slide = bool(windows) and all(w is not None for w in windows) and len(set(windows)) == 1
        self.spec = ModelSpec(
            architecture=arch,
            num_layers=cfg.num_hidden_layers,
            num_q_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim_of(cfg),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            sliding_window=windows[0] if all_slide else None,
            eos_token_ids=eos_ids_of(getattr(cfg, "eos_token_id", None)),
            dtype=dtype,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D]`` exactly as HF's rotary embedding computes them."""
        freqs = positions[:, None].float() * self.inv_freq.float()  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] long
        positions: torch.Tensor,  # [T] long
        kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden]`` of the packed tokens; writes their K/V."""
        if kv_cache.shape[0] != self.spec.num_layers or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache shape {tuple(kv_cache.shape)} does not match "
                f"[{self.spec.num_layers}, 2, blocks, block_size, {self.spec.num_kv_heads}, "
                f"{self.spec.head_dim}]"
            )
        h = F.embedding(input_ids, self.model.embed_tokens.weight)  # [T, hidden]
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
        return self.model.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` float32 (the matmul runs in the model dtype, as in HF)."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, cast to the model dtype; missing/unknown/misshapen: error."""
        params = dict(self.named_parameters(remove_duplicate=False))
        if self.tie_word_embeddings:
            params.pop("lm_head.weight", None)  # shares model.embed_tokens.weight
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; recomputed from the config
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding is the head
            param = params.get(name)
            if param is None:
                unknown.append(name)
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                    f"{tuple(param.shape)}"
                )
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            loaded.add(name)
        if unknown:
            raise ValueError(
                f"checkpoint has weights this model does not know: {sorted(unknown)[:8]}"
            )
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} weight(s), e.g. {missing[:8]}"
                + (" (untied lm_head needs lm_head.weight)" if "lm_head.weight" in missing else "")
            )


def eos_ids_of(value: Any) -> tuple[int, ...]:
    """``eos_token_id`` as HF stores it (None, int or list) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def build_model(
    hf_config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_backend: AttentionBackend | str = "torch",
) -> LlamaFamilyForCausalLM:
    """An unloaded model (storage allocated, not initialized) for ``hf_config`` on ``device``."""
    backend = get_backend(attn_backend) if isinstance(attn_backend, str) else attn_backend
    return LlamaFamilyForCausalLM(hf_config, dtype, torch.device(device), backend).eval()


# HF-facing aliases: one implementation serves every supported architecture name.
LlamaForCausalLM = MistralForCausalLM = Qwen2ForCausalLM = Qwen3ForCausalLM = LlamaFamilyForCausalLM
