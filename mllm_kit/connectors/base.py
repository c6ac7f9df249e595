"""The connector contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mllm_kit.encoders.base import VisualFeatures


@dataclass
class ConnectorOutput:
    """What a connector hands to the LLM.

    ``tokens``: ``[n_img, N, D]`` visual tokens written at the image positions.
    ``aux_losses``: named scalar losses (MoE balance, z-loss, ...) weighted by the recipe.
    ``injections``: LLM layer index → ``[n_img, N, D]`` added at the image positions before that layer (DeepStack).
    """

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    injections: dict[int, torch.Tensor] | None = None


class Connector(nn.Module):
    """Maps encoder features to LLM-width visual tokens.

    Built with ``in_dims`` (one channel width per encoder) and ``out_dim`` (the LLM hidden size);
    subclasses add their own options as keyword arguments.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.in_dims = tuple(int(d) for d in in_dims)
        self.out_dim = int(out_dim)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        """Visual tokens produced per image from ``input_tokens`` encoder tokens on a ``grid`` of patches.

        The default keeps the token count (MLP-style connectors); resamplers and poolers override it.
        """
        return input_tokens

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        raise NotImplementedError
