"""The connector contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mllm_kit.encoders.base import VisionEncoder, VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import CONNECTORS


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
    subclasses add their own options as keyword arguments. A connector that also reads a high-resolution
    view of each image sets ``num_crops`` > 0; the data pipeline then supplies up to that many crops.

    Class attributes a subclass may set: ``nested_specs`` maps an option holding another connector's spec (a wrapper's
    ``inner``) to its preset group, so recipe loading resolves and checks it too; ``smoke_options`` are the option values
    ``--smoke`` uses to shrink the connector (an option whose value is ``null``, i.e. derived, is left alone).
    """

    num_crops: int = 0
    nested_specs: ClassVar[dict[str, str]] = {}
    smoke_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.in_dims = tuple(int(d) for d in in_dims)
        self.out_dim = int(out_dim)

    def encode_views(self, encoder: VisionEncoder, pixel_values: torch.Tensor, crop_pixel_values: torch.Tensor,
                     crop_grids: list[tuple[int, int]]) -> VisualFeatures:
        """Encode global views ``[n_img, 3, H, W]`` and high-resolution crops in one encoder pass; the crop
        features land in ``features.crops``. Connectors that act inside the encoder (DeepStack-V) wrap this."""
        features, crops = encoder(torch.cat([pixel_values, crop_pixel_values.to(pixel_values.dtype)])).split(pixel_values.shape[0])
        features.crops, features.crop_grids = crops, list(crop_grids)
        return features

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        """Visual tokens produced per image from ``input_tokens`` encoder tokens on a ``grid`` of patches.

        The default keeps the token count (MLP-style connectors); resamplers and poolers override it.
        """
        return input_tokens

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        raise NotImplementedError


def build_connector(spec: Mapping[str, Any] | str, in_dims: Sequence[int], out_dim: int, grid: tuple[int, int]) -> Connector:
    """Build a resolved connector spec (``{name: ...}``, ``{_target_: ...}`` or a registered name; presets are expanded
    by :func:`mllm_kit.config.resolve_component`, at recipe load).

    mllm-kit supplies ``in_dims`` and ``out_dim``, and ``grid`` to connectors whose parameters depend on
    the patch grid (they declare a ``grid`` argument). Wrapping connectors build their inner one with this.
    """
    if isinstance(spec, str) and spec not in CONNECTORS and "." not in spec:
        raise ConfigError(f"connector {spec!r} is not a registered name; if it is a preset, resolve it first: "
                          f"mllm_kit.config.resolve_component('connectors', {spec!r}).")
    supplied: dict[str, Any] = {"in_dims": list(in_dims), "out_dim": out_dim}
    if "grid" in inspect.signature(CONNECTORS.resolve(spec)[0]).parameters:
        supplied["grid"] = tuple(grid)
    return CONNECTORS.build(spec, **supplied)
