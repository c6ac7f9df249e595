"""How FastV and PDrop score image tokens: the attention some text queries give each image token at one decoder layer,
computed explicitly from that layer's q/k projections and rotary embeddings (specs/components.md §8.2, §8.6).

No attention weights are read from the kernel, so SDPA and flash attention keep running unchanged: the scorer takes the
layer's input hidden states ``[B, T', D]``, its input norm, and the ``position_embeddings`` the layer receives; each
query's row is softmax(q·kᵀ·scale) over the keys it may attend to (its own sample, not later, not padding), averaged
over heads — the attention probabilities eager attention would return for that row.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from mllm_kit.errors import ConfigError
from mllm_kit.llm.attention import sliding_window
from mllm_kit.llm.decoding import DecodeCall


def check_scorable(llm: nn.Module, where: str) -> None:
    """Refuse a decoder whose layers the scorer cannot read (it needs an input norm and q/k projections)."""
    layer = llm.decoder_layers[0]
    attn = getattr(layer, "self_attn", None)
    if getattr(layer, "input_layernorm", None) is None or attn is None or not (
            hasattr(attn, "q_proj") and hasattr(attn, "k_proj") or hasattr(attn, "qkv_proj")):
        raise ConfigError(f"{where}: scoring image tokens reads each decoder layer's input_layernorm and self_attn q/k "
                          f"projections (q_proj/k_proj or qkv_proj); {type(layer).__name__} has no such modules.")


def image_attention(call: DecodeCall, layer: int, hidden: torch.Tensor, queries: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> torch.Tensor:
    """``[M]``: for each live image slot (:meth:`DecodeCall.image_slots` order), the mean over heads — and over the
    queries of its sample — of the attention probability those queries give it at decoder layer ``layer``, whose input
    is ``hidden [B, T', D]``. ``queries``: ``(rows, cols, samples)`` ``[Q]`` in original columns (never dropped)."""
    module = call.llm.decoder_layers[layer]
    attn = module.self_attn
    cfg = call.llm.model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    index, real = call.slot_index(), call.slot_real()
    b, width = index.shape
    t = call.ctx.shape[1]
    q_rows, q_cols, q_samples = queries
    inverse = torch.full((b, t + 1), -1, dtype=torch.long, device=index.device)
    inverse = inverse.scatter(1, index, torch.arange(width, device=index.device).expand(b, width))
    q_slots = inverse[q_rows, q_cols]  # a query is a text token: never dropped, so always a live slot

    x = module.input_layernorm(hidden)
    q, k = _project(attn, x[q_rows, q_slots], x, heads, kv_heads, head_dim)  # [Q, H, hd], [B, T', KVH, hd]
    cos, sin = call.layer_kwargs["position_embeddings"]
    cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, _ = rope(q.unsqueeze(2), q.unsqueeze(2), cos[q_rows, q_slots][:, None], sin[q_rows, q_slots][:, None])  # [Q, H, 1, hd]
    k, _ = rope(k.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, KVH, T', hd]
    keys = k[q_rows].repeat_interleave(heads // kv_heads, dim=1)  # [Q, H, T', hd]
    scale = getattr(attn, "scaling", head_dim ** -0.5)
    logits = (q.float() @ keys.float().transpose(-1, -2)).squeeze(2) * scale  # [Q, H, T']

    ctx = call.ctx
    safe = index.clamp(max=t - 1)
    key_ok = (real & ctx.valid.gather(1, safe))[q_rows]  # [Q, T']
    key_samples = ctx.sample_ids.gather(1, safe)[q_rows]
    allowed = key_ok & (key_samples == q_samples[:, None]) & (index[q_rows] <= q_cols[:, None])
    window = sliding_window(call.llm)
    if window is not None:
        allowed &= (q_cols[:, None] - index[q_rows]) < window
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)  # [Q, T']

    img_rows, img_slots = call.image_slots()
    img_samples = ctx.sample_ids[img_rows, index[img_rows, img_slots]]
    same = (q_samples[:, None] == img_samples[None, :]) & (q_rows[:, None] == img_rows[None, :])  # [Q, M]
    per_query = probs[:, img_slots] * same  # a query scores only the slots of its own row and sample
    return per_query.sum(0) / same.sum(0).clamp_min(1)


def _project(attn: nn.Module, x_q: torch.Tensor, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[Q, H, hd]`` of ``x_q [Q, D]`` and keys ``[B, T', KVH, hd]`` of ``x [B, T', D]``, through the layer's
    own projections (and per-head q/k norms where the architecture has them)."""
    if hasattr(attn, "q_proj"):
        q, k = attn.q_proj(x_q), attn.k_proj(x)
    else:  # a fused qkv projection (Phi-3): queries first, then keys, then values
        q = attn.qkv_proj(x_q)[..., : heads * head_dim]
        k = attn.qkv_proj(x)[..., heads * head_dim : (heads + kv_heads) * head_dim]
    q, k = q.view(*q.shape[:-1], heads, head_dim), k.view(*k.shape[:-1], kv_heads, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k
