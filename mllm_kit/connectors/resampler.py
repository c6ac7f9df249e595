"""Perceiver resampler: a fixed number of learned latents attend to the visual tokens (specs/components.md §2.2).

TinyLLaVA-Factory's form of Flamingo's resampler: Linear(C→D); then ``num_layers`` blocks of

    latents ← latents + Attn(q = LN(latents), k = v = [LN(media) ; LN(latents)])     (heads × head_dim, no biases)
    latents ← latents + FFN(latents),  FFN = LN → Linear(D→4D) → GELU → Linear(4D→D) (no biases)

and a final LayerNorm. Latents are ``randn``-initialised. ``[n_img, N, C]`` → ``[n_img, num_latents, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.layers.mlp import single_width
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.registry import register_connector


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents_n = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), latents_n], dim=1)  # keys/values: [media; latents]
        b = media.shape[0]
        q = self.to_q(latents_n).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(), nn.Linear(mult * dim, dim, bias=False))


@register_connector("resampler")
class PerceiverResampler(Connector):
    smoke_options = {"num_latents": 16, "num_layers": 2, "heads": 2, "head_dim": 16}

    def __init__(self, in_dims: Sequence[int], out_dim: int, num_latents: int = 64, num_layers: int = 6,
                 heads: int = 8, head_dim: int = 64, ff_mult: int = 4) -> None:
        super().__init__(in_dims, out_dim)
        self.num_latents = num_latents
        self.proj = nn.Linear(single_width(self.in_dims, "resampler"), out_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, out_dim))
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(out_dim, heads, head_dim), FeedForward(out_dim, ff_mult)]) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(out_dim)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.num_latents

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        media = self.proj(features[0].selected)
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attn, ff in self.blocks:
            latents = latents + attn(media, latents)
            latents = latents + ff(latents)
        return ConnectorOutput(tokens=self.norm(latents))
