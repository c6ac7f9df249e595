"""Channel concatenation of an encoder mixture: Eagle's fusion (specs/components.md §5.1) and Prismatic's fused
DINOv2 + SigLIP backbone (§5.5).

Each member's selected map is bilinearly resampled (align_corners=True) to a common grid when its grid differs —
Eagle resamples every expert to 32×32 — then the maps are concatenated along channels: ``[n_img, h·w, Σ Cᵢ]``. No
per-member projection or normalisation comes before the concatenation; ``inner`` (default ``mlp2x_gelu``) projects
the ``Σ Cᵢ`` channels. Eagle X2: CLIP-L/448 (32×32×1024) + ConvNeXt-XXL/1024 (32×32×3072) → 1024 tokens × 4096.
Prismatic: DINOv2-L + SigLIP-so400m at the same resolution → 1024 + 1152 = 2176 channels, 729 tokens at 384 px.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mllm_kit.connectors.fusion import FusionConnector, common_grid, patches
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.encoders.mixture import resample_map
from mllm_kit.registry import register_connector


@register_connector("channel_concat")
class ChannelConcat(FusionConnector):
    """``target_grid``: the common grid, ``[rows, cols]`` or a member's name (default: the first member's)."""

    smoke_options = {"target_grid": None}  # tiny members: the first member's grid

    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], members: Sequence[str],
                 inner: Mapping[str, Any] | str = "mlp2x_gelu", target_grid: Sequence[int] | str | None = None) -> None:
        super().__init__(in_dims, out_dim, grids, members)
        self.build_inner(inner, sum(self.in_dims), common_grid(self.grids, self.members, target_grid, "channel_concat"))

    def fuse(self, features: Sequence[VisualFeatures]) -> torch.Tensor:
        maps = [resample_map(patches(f, name, "channel_concat"), f.grid, self.fused_grid) for f, name in zip(features, self.members)]
        return torch.cat(maps, dim=-1)
