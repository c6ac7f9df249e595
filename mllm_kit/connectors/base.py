"""The connector contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mllm_kit.data.transforms import crop_grids
from mllm_kit.encoders.base import VisionEncoder, VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.llm.steps import LayerStep
from mllm_kit.registry import CONNECTORS


@dataclass
class ConnectorOutput:
    """What a connector hands to the LLM.

    ``tokens``: ``[n_img, N, D]`` visual tokens written at the image positions (``[Σ Nᵢ, D]``, images in order,
    from a connector with ``dynamic_tokens``).
    ``aux_losses``: named scalar losses (MoE balance, z-loss, ...) weighted by the recipe; ``metrics``: detached
    statistics to log (MoVA's per-expert gate weights); ``routing``: a gated connector's per-image expert weights
    (MoVA: ``[num_layers, n_img, E]``, detached), for analysis.
    ``steps``: what the connector does inside the LLM for this call (:mod:`mllm_kit.llm.steps`): DeepStack's
    :class:`~mllm_kit.llm.steps.Injection` before chosen layers, Cambrian's :class:`~mllm_kit.llm.steps.Rewrite` after
    them.
    """

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: tuple[LayerStep, ...] = ()
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: torch.Tensor | None = None


class Connector(nn.Module):
    """Maps encoder features to LLM-width visual tokens.

    Built with ``in_dims`` (one channel width per encoder) and ``out_dim`` (the LLM hidden size);
    subclasses add their own options as keyword arguments. A connector that also reads a high-resolution
    view of each image sets ``num_crops`` > 0 (or overrides :meth:`crop_candidates`); the data pipeline then supplies
    the crops. One whose token count depends on each image's size sets ``dynamic_tokens`` and implements
    :meth:`tokens_for_image`; its ``tokens`` are then ``[Σ Nᵢ, D]`` (images in order).

    Class attributes a subclass may set: ``nested_specs`` maps an option holding another connector's spec (a wrapper's
    ``inner``) to its preset group, so recipe loading resolves and checks it too; ``smoke_options`` are the option values
    ``--smoke`` uses to shrink the connector (an option whose value is ``null``, i.e. derived, is left alone; a callable
    maps the spec's value, or None when unset, to the smoke value).
    """

    num_crops: int = 0
    dynamic_tokens: ClassVar[bool] = False
    nested_specs: ClassVar[dict[str, str]] = {}
    smoke_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.in_dims = tuple(int(d) for d in in_dims)
        self.out_dim = int(out_dim)

    def layers_written(self) -> list[int]:
        """The decoder layers whose input this connector's steps change at the image positions (an injection before
        layer ℓ: ℓ; a rewrite after layer ℓ: ℓ + 1). A token-dropping method may drop from the last of them on."""
        return []

    def encode_views(self, encoder: VisionEncoder, pixel_values: torch.Tensor, crop_pixel_values: torch.Tensor,
                     crop_grids: list[tuple[int, int]]) -> list[VisualFeatures]:
        """Encode global views ``[n_img, ...]`` and high-resolution crops in one encoder pass (per member); each
        feature set's crop features land in its ``crops``. Connectors that act inside the encoder (DeepStack-V) wrap this."""
        n = pixel_values.shape[0]
        out = []
        for features in encoder.features(torch.cat([pixel_values, crop_pixel_values.to(pixel_values.dtype)])):
            features, crops = features.split(n)
            features.crops, features.crop_grids = crops, list(crop_grids)
            out.append(features)
        return out

    def crop_candidates(self) -> list[tuple[int, int]]:
        """The (rows, cols) grids a high-resolution view may be cut into (DeepStack: every grid of ≤ ``num_crops``)."""
        return crop_grids(self.num_crops) if self.num_crops else []

    def tokens_for_image(self, image_size: tuple[int, int] | None, input_tokens: int, grid: tuple[int, int]) -> int:
        """Visual tokens of one image of ``image_size = (width, height)``: :meth:`num_tokens` unless the count
        depends on the size (:attr:`dynamic_tokens`, e.g. AnyRes), then computed from the size without the model."""
        return self.num_tokens(input_tokens, grid)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        """Visual tokens produced per image from ``input_tokens`` encoder tokens on a ``grid`` of patches.

        The default keeps the token count (MLP-style connectors); resamplers and poolers override it.
        """
        return input_tokens

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        raise NotImplementedError


def build_connector(spec: Mapping[str, Any] | str, in_dims: Sequence[int], out_dim: int, grid: tuple[int, int],
                    grids: Sequence[tuple[int, int]] | None = None, members: Sequence[str] | None = None,
                    image_size: int | None = None, depths: Sequence[int] | None = None) -> Connector:
    """Build a resolved connector spec (``{name: ...}``, ``{_target_: ...}`` or a registered name; presets are expanded
    by :func:`mllm_kit.config.resolve_component`, at recipe load).

    mllm-kit supplies ``in_dims`` and ``out_dim``, and, to a connector whose class declares the argument: ``grid`` (the
    base patch grid), ``grids`` (one per feature set, default ``[grid]``), ``members`` (the feature sets' names: a
    mixture's member names, else ``["encoder"]``), ``depths`` (each feature set's block count: its hidden states are
    0..depth) and ``image_size`` (the encoder's input size in pixels: the crop size of a high-resolution view). Wrapping connectors build their inner one with this.
    """
    if isinstance(spec, str) and spec not in CONNECTORS and "." not in spec:
        raise ConfigError(f"connector {spec!r} is not a registered name; if it is a preset, resolve it first: "
                          f"mllm_kit.config.resolve_component('connectors', {spec!r}).")
    supplied: dict[str, Any] = {"in_dims": list(in_dims), "out_dim": out_dim}
    params = inspect.signature(CONNECTORS.resolve(spec)[0]).parameters
    if "grid" in params:
        supplied["grid"] = tuple(grid)
    if "grids" in params:
        supplied["grids"] = [tuple(g) for g in (grids if grids is not None else [grid])]
    if "members" in params:
        supplied["members"] = list(members) if members is not None else ["encoder"] * len(in_dims)
    if "depths" in params:
        if depths is None:
            raise ConfigError(f"connector {spec!r} needs the encoders' depths; build it through MLLM.build.")
        supplied["depths"] = [int(d) for d in depths]
    if "image_size" in params:
        if image_size is None:
            raise ConfigError(f"connector {spec!r} needs the encoder's image size; build it through MLLM.build.")
        supplied["image_size"] = int(image_size)
    return CONNECTORS.build(spec, **supplied)
