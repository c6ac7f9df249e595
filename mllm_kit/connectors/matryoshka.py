"""Matryoshka Multimodal Models (M3): one connector, several visual-token budgets (specs/components.md §8.1).

The inner connector (LLaVA's ``mlp2x_gelu`` by default) projects the ``S×S`` patch grid to ``[n_img, S², D]``;
for a scale s the projected tokens are average-pooled with kernel = stride = S/√s into ``[n_img, s, D]``
(pooling after the projector, as in the official code). CLIP-L/336 (S = 24): scales {576, 144, 36, 9, 1}
with kernels 1, 2, 4, 8, 24. Training averages the LM loss over the scales (``objective: matryoshka``);
inference uses ``scale``. No parameters beyond the inner connector's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F

from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_connector


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"matryoshka: {what} = {n} is not a square number of tokens.")
    return side


@register_connector("matryoshka")
class MatryoshkaConnector(Connector):
    """``inner`` connector, then 2-D average pooling to ``scale`` tokens.

    ``scales`` lists the token budgets trained together (each a square whose side divides the inner grid
    side); ``null`` means all of them for the grid. ``scale`` is the budget the model uses — and the one the
    data pipeline expands ``<image>`` to; ``null`` means the largest.
    """

    nested_specs = {"inner": "connectors"}

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        grid: tuple[int, int],
        inner: Mapping[str, Any] | str = "mlp",
        scales: Sequence[int] | None = (576, 144, 36, 9, 1),
        scale: int | None = None,
    ) -> None:
        super().__init__(in_dims, out_dim)
        self.inner = build_connector(inner, in_dims, out_dim, grid)
        self.side = _square_side(self.inner.num_tokens(grid[0] * grid[1], grid), "the inner connector's token count")
        if scales is None:
            scales = [(self.side // k) ** 2 for k in range(1, self.side + 1) if self.side % k == 0]
        self.scales = tuple(sorted({int(s) for s in scales}, reverse=True))
        for s in self.scales:
            if self.side % _square_side(s, "a scale"):
                raise ConfigError(
                    f"matryoshka: scale {s} needs the grid side {self.side} to be divisible by {math.isqrt(s)}; "
                    f"valid scales for this grid: {[(self.side // k) ** 2 for k in range(1, self.side + 1) if self.side % k == 0]}."
                )
        self.scale = self.scales[0] if scale is None else int(scale)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.scale

    @property
    def scale(self) -> int:
        """The token budget the model uses (and the data pipeline expands ``<image>`` to)."""
        return self._scale

    @scale.setter
    def scale(self, value: int) -> None:
        self._scale = self._checked(value)

    def _checked(self, value: int) -> int:
        if value not in self.scales:
            raise ConfigError(f"matryoshka: scale {value} is not one of scales {list(self.scales)}.")
        return int(value)

    def forward(self, features: Sequence[VisualFeatures], text_context: Any = None, scale: int | None = None) -> ConnectorOutput:
        """``scale``: this call's token budget (default :attr:`scale`; the Matryoshka objective passes one per pass)."""
        scale = self.scale if scale is None else self._checked(scale)
        out = self.inner(features, text_context)
        tokens = out.tokens
        kernel = self.side // math.isqrt(scale)
        if kernel > 1:
            n, _, d = tokens.shape
            grid = tokens.transpose(1, 2).reshape(n, d, self.side, self.side)
            tokens = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel).flatten(2).transpose(1, 2)
        return ConnectorOutput(tokens=tokens, aux_losses=out.aux_losses)
