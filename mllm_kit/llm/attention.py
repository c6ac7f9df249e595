"""What a token drop needs from a transformers decoder's attention: the KV cache a layer reads, the final norm, a
sliding window, a mask in the attention implementation's format, positions and rotary embeddings for a stream of kept
positions (:mod:`mllm_kit.llm.decoding`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mllm_kit.errors import ConfigError


def cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def final_norm(llm: nn.Module) -> nn.Module:
    decoder = llm.model.get_decoder()
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if norm is None:
        raise ConfigError(f"token dropping restores the sequence before the LLM's final norm, but {type(decoder).__name__} "
                          f"has no 'norm' or 'final_layernorm' module.")
    return norm


def sliding_window(llm: nn.Module) -> int | None:
    cfg = llm.model.config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def attention_format(llm: nn.Module, allowed: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> Any:
    """``allowed [B, 1, Q, K]`` bool as the model's attention implementation takes masks."""
    impl = llm.model.config._attn_implementation
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if impl and impl.startswith("flash_attention"):
        return keys.long()  # flash attention unpads with the 2-D key mask; causality is its own
    raise ConfigError(f"token dropping builds the attention mask itself and supports the sdpa, eager and flash_attention "
                      f"implementations; the LLM uses {impl!r}.")


def ranks(valid: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``[B, T']``: each valid slot's rank among the valid slots of its sample (``compact`` positions)."""
    cum = valid.long().cumsum(1)
    base = torch.full((int(samples.max()) + 2,), 1 << 30, dtype=torch.long, device=valid.device)
    key = (samples + 1).clamp_min(0).reshape(-1)
    base = base.scatter_reduce(0, key, (cum - valid.long()).reshape(-1), "amin")
    return torch.where(valid, cum - 1 - base[samples + 1], torch.zeros_like(cum))


def gather_rope(embeddings: Any, order: torch.Tensor) -> Any:
    cos, sin = embeddings
    b = order.shape[0]
    idx = order.unsqueeze(-1)
    return tuple(e.expand(b, *e.shape[1:]).gather(1, idx.expand(-1, -1, e.shape[-1])) for e in (cos, sin))


def rotary(llm: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
    rotary = getattr(llm.model.get_decoder(), "rotary_emb", None)
    if rotary is None:
        raise ConfigError("compact positions recompute the rotary embeddings, but the LLM's decoder has no 'rotary_emb'; "
                          "use positions: original.")
    return rotary(hidden, positions)
