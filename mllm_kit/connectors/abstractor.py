"""Honeybee's C-Abstractor: locality-preserving convolutional resampling (specs/components.md §2.3).

1. add a learned absolute position embedding ``[1, N, C]`` (trunc-normal, std 0.02);
2. ``[n_img, N, C]`` → ``[n_img, C, h, w]``;
3. s1: timm ``RegStage`` of ``depth`` RegNet bottleneck blocks C→hidden (stride 1, SiLU, LayerNorm2d;
   1×1 conv → 3×3 depthwise conv → squeeze-excite 0.25 → 1×1 conv, residual);
4. adaptive average pool to √M × √M;
5. s2: another ``RegStage`` hidden→hidden;
6. flatten to ``[n_img, M, hidden]``; readout MLP Linear(hidden→D) → SiLU → Linear(D→D) (``mlp_depth`` 2).

With ``depth=0`` it reduces to pooling plus the readout MLP. Honeybee's defaults: depth 3, hidden 1024,
M = 144 (12 × 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.layers.mlp import build_mlp, single_width
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_connector


@register_connector("c_abstractor")
class CAbstractor(Connector):
    smoke_options = {"num_queries": 4, "hidden": 64}

    def __init__(self, in_dims: Sequence[int], out_dim: int, grid: tuple[int, int], num_queries: int = 144, depth: int = 3,
                 hidden: int = 1024, mlp_depth: int = 2, pos_emb: bool = True) -> None:
        super().__init__(in_dims, out_dim)
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ConfigError(f"c_abstractor num_queries must be a square number (e.g. 144 = 12×12), got {num_queries}.")
        width = single_width(self.in_dims, "c_abstractor")
        self.grid, self.num_queries, self.side = tuple(grid), num_queries, side
        self.pos_emb = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width)) if pos_emb else None
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        stage = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        self.s1 = stage(depth, width, hidden) if depth else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.s2 = stage(depth, hidden, hidden) if depth else nn.Identity()
        self.readout = build_mlp(hidden if depth else width, out_dim, mlp_depth, act="silu")

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        x = features[0].selected
        h, w = self.grid
        if x.shape[1] != h * w:
            raise ConfigError(f"c_abstractor expects {h}×{w} = {h * w} patch tokens, got {x.shape[1]}; use select_feature: patch.")
        if self.pos_emb is not None:
            x = x + self.pos_emb
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.s2(self.pool(self.s1(x)))
        return ConnectorOutput(tokens=self.readout(x.flatten(2).transpose(1, 2)))
