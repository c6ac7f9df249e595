"""Sequence concatenation of an encoder mixture: each member's tokens projected by its own ``inner`` connector, then
placed one member after another, N = Σ Nᵢ (SPHINX appends its Q-Former tokens this way; specs/components.md §5.5).
``separator``: a learned ``[D]`` token between consecutive members (initialised normal(0, 0.02), like an embedding
row), so the LLM can tell where one member's tokens end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.layers.reports import add_aux
from mllm_kit.registry import register_connector


@register_connector("sequence_concat")
class SequenceConcat(Connector):
    """``inner``: the projector every member gets its own copy of (default ``mlp2x_gelu``)."""

    nested_specs: ClassVar[dict[str, str]] = {"inner": "connectors"}

    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], members: Sequence[str],
                 inner: Mapping[str, Any] | str = "mlp2x_gelu", separator: bool = False) -> None:
        super().__init__(in_dims, out_dim)
        self.members, self.grids = list(members), [tuple(g) for g in grids]
        self.projectors = nn.ModuleList(build_connector(inner, [c], out_dim, g) for c, g in zip(self.in_dims, self.grids))
        self.separator = nn.Parameter(torch.randn(out_dim) * 0.02) if separator else None

    def _member_tokens(self) -> list[int]:
        return [p.num_tokens(h * w, (h, w)) for p, (h, w) in zip(self.projectors, self.grids)]

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return sum(self._member_tokens()) + (len(self.members) - 1) * (self.separator is not None)

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        if len(features) != len(self.projectors):
            raise ConfigError(f"sequence_concat was built for members {self.members} but got {len(features)} feature sets.")
        parts, aux = [], {}
        for k, (f, projector) in enumerate(zip(features, self.projectors)):
            out = projector([f], text_context)
            if k and self.separator is not None:
                parts.append(self.separator.to(out.tokens.dtype).expand(out.tokens.shape[0], 1, -1))
            parts.append(out.tokens)
            add_aux(aux, out.aux_losses)
        return ConnectorOutput(tokens=torch.cat(parts, dim=1), aux_losses=aux)
