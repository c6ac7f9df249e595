"""Q-Former: learned queries that read the image through cross-attention (specs/components.md §2.1–2.2).

The layers are transformers' ``Blip2QFormerModel`` (BERT-style: self-attention over the queries,
cross-attention to the image every ``cross_attn_every`` layers — layer ℓ has it when ℓ % every == 0 — and
the query-only FFN), so a local ``Blip2QFormerModel`` directory loads into it directly.

Two published shapes, both presets:

* ``qformer`` (BLIP-2, §2.1): LayerNorm on the vision features (``ln_vision``), BERT-base width
  (768, 12 layers, 12 heads, FFN 3072, cross-attention on layers 0, 2, …, 10), 32 queries ~ N(0, 0.02),
  then Linear(768 → D). Cross-attention keys/values map C → 768.
* ``qformer_light`` (MoE-LLaVA ``qformer{L}_{Nq}``, §2.2): ``pre_proj`` Linear(C→D)·GELU·Linear(D→D), a
  Q-Former at LLM width D (32 heads, FFN ≈ 2.6875·D, cross-attention every layer), ``post_proj``
  Linear(D→D)·GELU·Linear(D→D). ``hidden: null`` means "the LLM width".

``[n_img, N, C]`` → ``[n_img, num_queries, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.layers.mlp import build_mlp, single_width
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.pretrained import from_pretrained
from mllm_kit.registry import register_connector

Projection = Literal["none", "linear", "mlp"]


def _projection(kind: Projection, in_dim: int, out_dim: int, where: str) -> nn.Module:
    if kind == "none":
        if where == "post_proj" and in_dim != out_dim:
            raise ConfigError(f"qformer post_proj 'none' needs hidden == LLM width, got {in_dim} → {out_dim}; use 'linear' or 'mlp'.")
        return nn.Identity()  # pre_proj 'none': cross-attention keys/values read the vision width directly
    if kind not in ("linear", "mlp"):
        raise ConfigError(f"qformer {where} must be one of none, linear, mlp; got {kind!r}.")
    return build_mlp(in_dim, out_dim, depth=1 if kind == "linear" else 2)


@register_connector("qformer")
class QFormerConnector(Connector):
    """``num_queries`` learned queries through ``num_layers`` Q-Former layers of width ``hidden``.

    ``hidden=None`` uses the LLM width; ``intermediate_size=None`` uses ``ffn_ratio × hidden`` rounded down
    to a multiple of 8. ``init_std`` is the std of the normal init of the queries and the Q-Former's weights
    (BERT's ``initializer_range``, 0.02); it was tuned for BERT-base width, and a much narrower Q-Former trained
    from scratch needs a larger one (``benchmarks/learning.py``). ``init_from`` names a local ``Blip2QFormerModel`` directory whose weights (and
    config) replace the fresh ones; its width and cross-attention input must agree with this connector's.
    """

    smoke_options = {"num_layers": 2, "hidden": 64, "heads": 4, "intermediate_size": 128}

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        num_queries: int = 32,
        num_layers: int = 12,
        hidden: int | None = 768,
        heads: int = 12,
        intermediate_size: int | None = 3072,
        ffn_ratio: float = 4.0,
        cross_attn_every: int = 2,
        vision_norm: bool = True,
        pre_proj: Projection = "none",
        post_proj: Projection = "linear",
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        init_std: float = 0.02,
        init_from: str | None = None,
    ) -> None:
        super().__init__(in_dims, out_dim)
        vision = single_width(self.in_dims, "qformer")
        hidden = out_dim if hidden is None else hidden
        if hidden % heads:
            raise ConfigError(f"qformer hidden={hidden} is not divisible by heads={heads}.")
        if cross_attn_every < 1 or num_layers < 1 or num_queries < 1:
            raise ConfigError("qformer num_queries, num_layers and cross_attn_every must be ≥ 1.")
        self.num_queries = num_queries
        self.vision_norm = nn.LayerNorm(vision) if vision_norm else nn.Identity()
        self.pre_proj = _projection(pre_proj, vision, hidden, "pre_proj")
        encoder_width = vision if pre_proj == "none" else hidden
        config = Blip2QFormerConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=intermediate_size or int(ffn_ratio * hidden) // 8 * 8,
            cross_attention_frequency=cross_attn_every,
            encoder_hidden_size=encoder_width,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            layer_norm_eps=layer_norm_eps,
            initializer_range=init_std,
        )
        if init_from is not None:
            self.qformer = self._load(init_from, config)
        else:
            self.qformer = Blip2QFormerModel(config)
        # BLIP-2 and MoE-LLaVA both draw the queries (and every weight) from BERT's N(0, initializer_range = 0.02).
        self.queries = nn.Parameter(torch.empty(1, num_queries, hidden).normal_(0.0, config.initializer_range))
        self.post_proj = _projection(post_proj, hidden, out_dim, "post_proj")

    @staticmethod
    def _load(path: str, expected: Blip2QFormerConfig) -> Blip2QFormerModel:
        model = from_pretrained(Blip2QFormerModel, path, what="qformer init_from")
        cfg = model.config
        for key in ("hidden_size", "encoder_hidden_size", "num_hidden_layers", "cross_attention_frequency"):
            if getattr(cfg, key) != getattr(expected, key):
                raise ConfigError(
                    f"qformer init_from={path!r}: its {key}={getattr(cfg, key)} differs from the connector's "
                    f"{getattr(expected, key)}; set the connector options to match the checkpoint."
                )
        return model

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        image = self.pre_proj(self.vision_norm(features[0].selected))
        queries = self.queries.expand(image.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        proj_dtype = next(self.post_proj.parameters(), self.queries).dtype
        return ConnectorOutput(tokens=self.post_proj(out.to(proj_dtype)))
