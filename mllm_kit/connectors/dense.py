"""Dense Connector: visual features from several encoder layers (Yao et al., NeurIPS 2024; specs/components.md §4).

Let F_k be HF ``hidden_states[k]`` and X the encoder's selected feature (CLIP-L/336: layer −2, 576 × 1024).

* ``sti`` (Sparse Token Integration): [X ; pool(F_a) ; pool(F_b)] along tokens, where pool is a 1-D average
  pool with kernel = stride = ``pool`` (8) over the flattened token axis; one shared MLP C→D.
  CLIP-L: 576 + 72 + 72 = 720 tokens.
* ``sci`` (Sparse Channel Integration): [X ‖ F_a ‖ F_b] along channels → MLP 3C→D; tokens unchanged.
* ``dci`` (Dense Channel Integration, the paper's default): layers split into consecutive ``groups`` that are
  averaged, [X ‖ mean(G_1) ‖ mean(G_2)] → MLP 3C→D. CLIP-L: G_1 = F_0..F_11, G_2 = F_12..F_23.

``layers`` default to (round(L/3) − 1, round(2L/3) − 1) for an L-block encoder — (7, 15) for CLIP-L's 24
blocks, the paper's "layers 8 and 16". ``groups`` default to two equal halves of F_0 … X. No parameters
beyond the MLP's wider first layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.layers.mlp import build_mlp, single_width
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_connector

MODES = ("sti", "sci", "dci")


@register_connector("dense")
class DenseConnector(Connector):
    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        mode: Literal["sti", "sci", "dci"] = "dci",
        layers: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        pool: int = 8,
        depth: int = 2,
        act: str = "gelu",
    ) -> None:
        super().__init__(in_dims, out_dim)
        if mode not in MODES:
            raise ConfigError(f"dense connector mode must be one of {MODES}, got {mode!r}.")
        if layers is not None and len(layers) != 2:
            raise ConfigError(f"dense connector layers takes two layer indices, got {list(layers)}.")
        if groups is not None and any(len(g) != 2 or g[0] >= g[1] for g in groups):
            raise ConfigError(f"dense connector groups are [start, end) pairs with start < end, got {groups}.")
        self.mode, self.pool = mode, pool
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        self.groups = None if groups is None else tuple((int(a), int(b)) for a, b in groups)
        width = single_width(self.in_dims, "dense")
        extra = 0 if mode == "sti" else (2 if mode == "sci" else len(self.groups or ((0, 1), (1, 2))))
        self.mlp = build_mlp(width * (1 + extra), out_dim, depth, act)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return input_tokens + 2 * (input_tokens // self.pool) if self.mode == "sti" else input_tokens

    def _layers(self, num_blocks: int) -> tuple[int, int]:
        layers = self.layers or (round(num_blocks / 3) - 1, round(2 * num_blocks / 3) - 1)
        if not all(0 <= i <= num_blocks for i in layers):
            raise ConfigError(f"dense connector layers {list(layers)} are outside the encoder's 0..{num_blocks}.")
        return layers

    def _groups(self, selected: int, num_states: int) -> tuple[tuple[int, int], ...]:
        if self.groups is not None:
            if max(b for _, b in self.groups) > num_states:
                raise ConfigError(f"dense connector groups {list(self.groups)} exceed the encoder's {num_states} hidden states.")
            return self.groups
        half = (selected + 1) // 2
        return ((0, half), (half, selected + 1))

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        feats = features[0]
        states, x = feats.hidden_states, feats.selected
        if self.mode == "dci":
            means = [torch.stack(states[a:b]).mean(dim=0) for a, b in self._groups(feats.selected_layer, len(states))]
            return ConnectorOutput(tokens=self.mlp(torch.cat([x, *means], dim=-1)))
        a, b = self._layers(len(states) - 1)
        if self.mode == "sci":
            return ConnectorOutput(tokens=self.mlp(torch.cat([x, states[a], states[b]], dim=-1)))
        pooled = [F.avg_pool1d(states[i].transpose(1, 2), self.pool, self.pool).transpose(1, 2) for i in (a, b)]
        return ConnectorOutput(tokens=self.mlp(torch.cat([x, *pooled], dim=1)))
