"""Token-wise projectors: identity, linear and the LLaVA-1.5 MLP (specs/components.md §1.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.layers.mlp import activation, build_mlp, single_width
from mllm_kit.registry import register_connector

@register_connector("mlp")
class MLPConnector(Connector):
    """Per-token MLP on the encoder's selected layer: ``[n_img, N, C]`` → ``[n_img, N, D]``.

    ``depth=2, act=gelu`` is LLaVA-1.5's ``mlp2x_gelu`` (Linear(C→D) → GELU → Linear(D→D), biases,
    PyTorch default init; specs/components.md §1.2). ``expand`` = k > 0 puts Linear(C→k·C) → act in front:
    Prismatic's ``FusedMLPProjector`` is ``expand: 4, depth: 2`` (Linear(2176→8704) → GELU → Linear(8704→D) → GELU →
    Linear(D→D), specs/components.md §5.5).
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, depth: int = 2, act: str = "gelu", bias: bool = True,
                 expand: int = 0) -> None:
        super().__init__(in_dims, out_dim)
        self.depth, self.act = depth, act
        width = single_width(self.in_dims, "mlp")
        if expand < 0:
            raise ConfigError(f"mlp expand must be ≥ 0 (0: no widening layer), got {expand}.")
        mlp = build_mlp(width * (expand or 1), out_dim, depth, act, bias)
        self.mlp = nn.Sequential(nn.Linear(width, expand * width, bias=bias), activation(act, "mlp"), *mlp) if expand else mlp

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        return ConnectorOutput(tokens=self.mlp(features[0].selected))


@register_connector("linear")
class LinearConnector(MLPConnector):
    """A single Linear(C→D) (LLaVA-1.0's projector)."""

    def __init__(self, in_dims: Sequence[int], out_dim: int, bias: bool = True) -> None:
        super().__init__(in_dims, out_dim, depth=1, bias=bias)


@register_connector("identity")
class IdentityConnector(Connector):
    """Passes the selected features through; the encoder width must equal the LLM width."""

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__(in_dims, out_dim)
        width = single_width(self.in_dims, "identity")
        if width != out_dim:
            raise ConfigError(f"identity connector needs encoder width == LLM width, got {width} and {out_dim}; use 'linear' or 'mlp'.")

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        return ConnectorOutput(tokens=features[0].selected)
