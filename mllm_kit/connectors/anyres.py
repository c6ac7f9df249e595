"""LLaVA-NeXT AnyRes: a base view plus a best-fit grid of crops, unpadded, with an image-newline token
(Liu et al., "LLaVA-NeXT", 2024; transformers' ``LlavaNextModel.pack_image_features``; specs/components.md §3.2).

Per image of ``(width, height)``: the grid (rows, cols) is the ``pinpoints`` resolution that keeps the most pixels
(:func:`~mllm_kit.data.transforms.best_grid`, shared with DeepStack's crops); the image is resized into it, padded
and cut into crops of the encoder's size, and every view (base + crops) goes through the encoder and ``inner``
(one s×s token map per view, s = 24 for CLIP-L/336). The crop maps are tiled into a (rows·s)×(cols·s) map, the
rows or columns that only cover padding are cut away (``unpad``), and a learned ``image_newline`` [D] ends every
row (``newline``). Tokens per image: s² + H'·(W' + 1) with (H', W') the unpadded map — a function of the image
size, which the data pipeline computes from the size alone (:meth:`tokens_for_image`) before batching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.data.transforms import best_grid, pinpoint_grids
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.layers.reports import add_aux
from mllm_kit.registry import register_connector

# LLaVA-NeXT (v1.6) image_grid_pinpoints, [height, width] in pixels.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def unpadded_window(height: int, width: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a ``height × width`` tiled map that cover the image of ``(width, height)`` after its
    aspect-preserving resize and centred padding (transformers' ``unpad_image``, rounding included)."""
    original_w, original_h = image_size
    if original_w / original_h > width / height:
        new_h = int(round(original_h * (width / original_w), 7))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(round(original_w * (height / original_h), 7))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


@register_connector("anyres")
class AnyResConnector(Connector):
    """``inner``: the per-view projector (default ``mlp2x_gelu``; it must keep a square s×s token map);
    ``pinpoints``: candidate ``[height, width]`` resolutions, multiples of the encoder's image size (default
    LLaVA-NeXT's five); ``unpad`` / ``newline``: LLaVA-NeXT's ``spatial_unpad`` merge (both on by default)."""

    nested_specs: ClassVar[dict[str, str]] = {"inner": "connectors"}
    # LLaVA-NeXT's pinpoints scaled to the tiny encoders' 32 px crops.
    smoke_options: ClassVar[dict[str, Any]] = {"pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]}
    dynamic_tokens: ClassVar[bool] = True

    def __init__(self, in_dims: Sequence[int], out_dim: int, grid: tuple[int, int], grids: Sequence[tuple[int, int]],
                 members: Sequence[str], depths: Sequence[int], image_size: int, inner: Mapping[str, Any] | str = "mlp2x_gelu",
                 pinpoints: Sequence[Sequence[int]] | None = None, unpad: bool = True, newline: bool = True) -> None:
        super().__init__(in_dims, out_dim)
        self.inner = build_connector(inner, in_dims, out_dim, grid, grids, members, image_size, depths)
        n = grid[0] * grid[1]
        tokens = self.inner.num_tokens(n, tuple(grid))
        self.side = math.isqrt(tokens)
        if self.side * self.side != tokens or self.inner.dynamic_tokens:
            raise ConfigError(f"model.connector.inner (anyres): each view must become a square map of tokens to tile, but "
                              f"{type(self.inner).__name__} gives {tokens} tokens per view.")
        self.image_size = int(image_size)
        self.pinpoints = [list(p) for p in (pinpoints or LLAVA_NEXT_PINPOINTS)]
        self.candidates = pinpoint_grids(self.pinpoints, self.image_size, "model.connector.pinpoints (anyres)")
        self.unpad, self.use_newline = bool(unpad), bool(newline)
        # LLaVA-NeXT initialises image_newline with randn · 1/√D.
        self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim)) if newline else None

    def crop_candidates(self) -> list[tuple[int, int]]:
        return list(self.candidates)

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.side * self.side  # the base view alone (an image without crops)

    def layout(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[slice, slice]]:
        """The crop grid of an image of ``(width, height)`` and the window of its tiled map that is kept."""
        width, height = image_size
        if width < 1 or height < 1:
            raise ConfigError(f"anyres: image size {image_size} is empty.")
        rows, cols = best_grid(width, height, self.image_size, self.candidates)
        h, w = rows * self.side, cols * self.side
        window = unpadded_window(h, w, image_size) if self.unpad else (slice(0, h), slice(0, w))
        return (rows, cols), window

    def tokens_for_image(self, image_size: tuple[int, int] | None, input_tokens: int, grid: tuple[int, int]) -> int:
        _, (ys, xs) = self.layout(tuple(image_size))
        h, w = ys.stop - ys.start, xs.stop - xs.start
        return self.side * self.side + h * (w + int(self.use_newline))

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        base = self.inner(features, text_context)
        crops = [f.crops for f in features]
        if crops[0] is None:  # no high-resolution view (e.g. the text-only dummy pass): base tokens only
            return base
        sizes, grids = features[0].image_sizes, features[0].crop_grids
        if sizes is None or len(sizes) != base.tokens.shape[0]:
            raise ConfigError("anyres needs each image's (width, height) with its crops (Batch.image_sizes).")
        tiles = self.inner(crops, text_context)
        s, d = self.side, base.tokens.shape[-1]
        out, start = [], 0
        for k, size in enumerate(sizes):
            (rows, cols), (ys, xs) = self.layout(tuple(size))
            if (rows, cols) != tuple(grids[k]):
                raise ConfigError(f"anyres: image {k} of size {tuple(size)} came with a {grids[k]} crop grid, but its best "
                                  f"fit among the pinpoints is {(rows, cols)}; build the crops with the model's image transform.")
            t = tiles.tokens[start : start + rows * cols].view(rows, cols, s, s, d)
            start += rows * cols
            tiled = t.permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, d)[ys, xs]
            if self.image_newline is not None:
                newline = self.image_newline.to(tiled.dtype).expand(tiled.shape[0], 1, d)
                tiled = torch.cat([tiled, newline], dim=1)
            out += [base.tokens[k], tiled.reshape(-1, d)]
        return ConnectorOutput(tokens=torch.cat(out), aux_losses=add_aux(dict(base.aux_losses), tiles.aux_losses))
