"""COMM's multi-level feature merging of CLIP and DINOv2 (Jiang et al., arXiv 2310.08825; specs/components.md §5.2).

For each member m and each of its chosen layers i, an LLN (Linear(Cₘ→Cₘ) + LayerNorm) maps ``hidden_states[i]``;
the LLN outputs are summed with learnable layer weights (softmax over the member's layers, initialised uniform — the
paper's figure shows learnable scalars without saying how they are normalised). The first member (CLIP) defines the
space: every other member's merged map goes through an MLP (Linear → GELU → Linear) into its width and the results
are summed element-wise after resampling to the first member's grid (bilinear, align_corners=True; COMM's two
towers share 16×16 at 224 px). ``inner`` (COMM: a linear projection) maps the sum into the LLM.

``layers``: member name → HF ``hidden_states`` indices (1 = first block's output). Defaults: every block of the
first member; the last 6 blocks of the others (COMM merges only DINOv2's deeper layers [R: ~6 of ViT-g]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mllm_kit.connectors.fusion import FusionConnector, member_index, patches
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.encoders.mixture import resample_map
from mllm_kit.errors import ConfigError
from mllm_kit.layers.mlp import build_mlp
from mllm_kit.registry import register_connector

DEEP_LAYERS = 6


class MultiLevelMerge(nn.Module):
    """Σᵢ softmax(α)ᵢ · LayerNorm(Linear(F_i)) over one member's layers ``[n, N, C]`` → ``[n, N, C]``."""

    def __init__(self, width: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.layers = [int(i) for i in layers]
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in self.layers)
        self.weights = nn.Parameter(torch.zeros(len(self.layers)))

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        w = self.weights.softmax(dim=0)
        return sum(w[k] * proj(states[k]) for k, proj in enumerate(self.proj))


@register_connector("comm")
class COMMConnector(FusionConnector):
    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], members: Sequence[str],
                 depths: Sequence[int], inner: Mapping[str, Any] | str = "linear",
                 layers: Mapping[str, Sequence[int]] | None = None, act: str = "gelu") -> None:
        super().__init__(in_dims, out_dim, grids, members)
        if len(self.members) < 2:
            raise ConfigError("model.connector (comm): merges at least two members (CLIP first, then DINOv2); got one.")
        depth = [int(d) for d in depths]
        chosen: dict[str, list[int]] = {}
        for name, idx in (layers or {}).items():
            member_index(self.members, name, f"model.connector.layers.{name} (comm)")
            chosen[name] = [int(i) for i in idx]
        for k, name in enumerate(self.members):
            if name not in chosen:
                chosen[name] = list(range(1, depth[k] + 1)) if k == 0 else list(range(max(1, depth[k] - DEEP_LAYERS + 1), depth[k] + 1))
            if not chosen[name] or not all(0 <= i <= depth[k] for i in chosen[name]):
                raise ConfigError(f"model.connector.layers.{name} (comm): {chosen[name]} must be non-empty indices in "
                                  f"0..{depth[k]} (HF hidden_states of its {depth[k]} blocks; 0 = embeddings).")
        self.layer_lists = [chosen[name] for name in self.members]
        self.merges = nn.ModuleList(MultiLevelMerge(c, chosen[name]) for c, name in zip(self.in_dims, self.members))
        width = self.in_dims[0]
        self.align = nn.ModuleList(build_mlp(c, width, 2, act) for c in self.in_dims[1:])
        self.build_inner(inner, width, self.grids[0])

    def fuse(self, features: Sequence[VisualFeatures]) -> torch.Tensor:
        out = None
        for k, (f, name, merge) in enumerate(zip(features, self.members, self.merges)):
            merged = merge([patches(f, name, "comm", layer=i) for i in merge.layers])
            if k:
                merged = resample_map(self.align[k - 1](merged), f.grid, self.fused_grid)
            out = merged if out is None else out + merged
        return out
