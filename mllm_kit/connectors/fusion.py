"""What feature-level fusions of an encoder mixture share (specs/components.md §5): member checks, resampling to a
common grid, and the inner projector that reads the fused map (``channel_concat``, ``comm``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError, did_you_mean


def member_index(members: Sequence[str], name: str, where: str) -> int:
    """The position of member ``name``; a ConfigError naming ``where`` and the members otherwise."""
    if name not in members:
        raise ConfigError(f"{where}: no encoder member named {name!r}.{did_you_mean(name, list(members))} "
                          f"Members: {', '.join(members)}.")
    return list(members).index(name)


def common_grid(grids: Sequence[tuple[int, int]], members: Sequence[str], grid: Sequence[int] | str | None,
                fusion: str) -> tuple[int, int]:
    """The grid every member is resampled to: ``[rows, cols]``, a member's name (its grid), or ``None`` (the first
    member's). Members whose tokens are not a 2-D patch grid (``(1, N)``: a token list) cannot be resampled."""
    for name, (h, w) in zip(members, grids):
        if h == 1 and w > 1:
            raise ConfigError(f"model.connector ({fusion}): member {name!r} gives a token list (grid 1×{w}), not a 2-D patch "
                              f"grid that can be aligned with the others; set its select_feature: patch and drop_first_patch: false.")
    if grid is None:
        return tuple(grids[0])
    if isinstance(grid, str):
        return tuple(grids[member_index(members, grid, f"model.connector.target_grid ({fusion})")])
    if len(grid) != 2 or min(int(v) for v in grid) < 1:
        raise ConfigError(f"model.connector.target_grid ({fusion}): expected [rows, cols] or a member name, got {grid!r}.")
    return (int(grid[0]), int(grid[1]))


def patches(features: VisualFeatures, name: str, fusion: str, layer: int | None = None) -> torch.Tensor:
    """``[n_img, h·w, C]`` patch tokens of one member's layer (default: its selected one); CLS tokens are refused."""
    x = features.selected if layer is None else features.hidden_states[layer]
    h, w = features.grid
    if x.shape[1] != h * w:
        raise ConfigError(f"model.connector ({fusion}): member {name!r} gives {x.shape[1]} tokens on a {h}×{w} grid "
                          f"(a CLS token?); set its select_feature: patch.")
    return x


class FusionConnector(Connector):
    """Fuses the members' maps into one ``[n_img, N, C_fused]`` map on ``fused_grid``, then runs ``inner`` (any
    single-encoder connector, default ``mlp2x_gelu``) on it. Subclasses build their layers and implement :meth:`fuse`."""

    nested_specs: ClassVar[dict[str, str]] = {"inner": "connectors"}

    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], members: Sequence[str]) -> None:
        super().__init__(in_dims, out_dim)
        self.grids, self.members = [tuple(g) for g in grids], list(members)

    def build_inner(self, inner: Mapping[str, Any] | str, fused_dim: int, fused_grid: tuple[int, int]) -> None:
        self.fused_dim, self.fused_grid = int(fused_dim), tuple(fused_grid)
        self.inner = build_connector(inner, [self.fused_dim], self.out_dim, self.fused_grid)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        h, w = self.fused_grid
        return self.inner.num_tokens(h * w, self.fused_grid)

    def fuse(self, features: Sequence[VisualFeatures]) -> torch.Tensor:
        """One feature set per member → ``[n_img, h·w, fused_dim]`` on ``fused_grid``."""
        raise NotImplementedError

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        if len(features) != len(self.members):
            raise ConfigError(f"{type(self).__name__} was built for members {self.members} but got {len(features)} feature sets.")
        fused = VisualFeatures(hidden_states=(self.fuse(features),), grid=self.fused_grid, selected_layer=0)
        return self.inner([fused], text_context)
