"""DeepStack-L: high-resolution tokens stacked into the LLM's early layers (Meng et al., NeurIPS 2024; specs/components.md §3.1).

* Global view: the image at the encoder's size → encoder → ``inner`` connector (``mlp2x_gelu``) → N = S² tokens
  at the ``<image>`` slot, so the context is as long as LLaVA-1.5's.
* High-resolution view: the best-fitting grid of ``rows × cols`` crops (rows·cols ≤ ``num_crops``, not 1×1),
  each through the same encoder and connector, re-assembled into an ``(rows·S) × (cols·S)`` map.
* Stacks: ``2d`` (default) takes the polyphase components — stack (i, j) is every rows-th row from i and every
  cols-th column from j, an S×S map aligned with the global grid, ordered row-major over (i, j); ``1d``
  strides over the flattened map; ``grid`` uses each crop whole. Fewer than ``num_crops`` stacks are padded
  with zeros.
* Stack k is added, unnormalised and ungated, to the hidden states at the image positions before LLM layer
  ``start + k·interval`` (defaults 1, 1; K = ``num_crops`` = 4 → layers 1–4). No parameters of its own.

``tokens [n_img, N, D]``; ``injections {layer: [n_img, N, D]}``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.encoders.base import VisionEncoder, VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.llm.steps import Injection
from mllm_kit.registry import register_connector

SAMPLINGS = ("2d", "1d", "grid")


def build_stacks(crops: torch.Tensor, rows: int, cols: int, side: int, sampling: str = "2d") -> torch.Tensor:
    """``[n, rows·cols, side², D]`` crop tokens (crops row-major) → ``[n, rows·cols, side², D]`` stacks."""
    n, k, _, d = crops.shape
    if sampling == "grid":
        return crops
    # re-assemble the high-resolution map [n, rows·side, cols·side, D]
    full = crops.view(n, rows, cols, side, side, d).permute(0, 1, 3, 2, 4, 5).reshape(n, rows * side, cols * side, d)
    if sampling == "2d":
        return full.view(n, side, rows, side, cols, d).permute(0, 2, 4, 1, 3, 5).reshape(n, k, side * side, d)
    return full.reshape(n, side * side, k, d).transpose(1, 2)  # "1d": stack j = flat[j::k]


def stacks_from_crops(crop_tokens: torch.Tensor, grids: list[tuple[int, int]], num_crops: int, side: int, sampling: str) -> torch.Tensor:
    """``[Σ crops, side², D]`` (images in order, crops row-major) → ``[n_img, num_crops, side², D]`` stacks,
    zero where an image has fewer than ``num_crops`` crops."""
    n_img, (total, n, d) = len(grids), crop_tokens.shape
    if total != sum(r * c for r, c in grids) or max(r * c for r, c in grids) > num_crops:
        raise ConfigError(f"deepstack: crop grids {grids} do not match {total} crops of at most num_crops={num_crops} per image.")
    stacks = crop_tokens.new_zeros(n_img, num_crops, n, d)
    offsets = torch.tensor([0] + [r * c for r, c in grids]).cumsum(0).tolist()
    for rows, cols in dict.fromkeys(grids):  # one batched re-assembly per distinct grid shape
        images = [i for i, g in enumerate(grids) if g == (rows, cols)]
        idx = torch.tensor([offsets[i] + j for i in images for j in range(rows * cols)], device=crop_tokens.device)
        chunk = crop_tokens.index_select(0, idx).view(len(images), rows * cols, n, d)
        stacks[images, : rows * cols] = build_stacks(chunk, rows, cols, side, sampling)
    return stacks


def _check_options(sampling: str, num_crops: int) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"deepstack sampling must be one of {SAMPLINGS}, got {sampling!r}.")
    if num_crops < 2:
        raise ConfigError(f"deepstack needs num_crops ≥ 2, got {num_crops}.")


def _square_inner(inner: Mapping[str, Any] | str, in_dims: Sequence[int], out_dim: int, grid: tuple[int, int]) -> Connector:
    connector = build_connector(inner, in_dims, out_dim, grid)
    n = grid[0] * grid[1]
    if grid[0] != grid[1] or connector.num_tokens(n, grid) != n:
        raise ConfigError("deepstack's inner connector must keep the square patch grid (one token per patch, e.g. mlp2x_gelu), "
                          f"got {connector.num_tokens(n, grid)} tokens from a {grid[0]}×{grid[1]} grid.")
    return connector


@register_connector("deepstack")
class DeepStackConnector(Connector):
    nested_specs = {"inner": "connectors"}
    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        grid: tuple[int, int],
        inner: Mapping[str, Any] | str = "mlp",
        num_crops: int = 4,
        start: int = 1,
        interval: int = 1,
        sampling: Literal["2d", "1d", "grid"] = "2d",
    ) -> None:
        super().__init__(in_dims, out_dim)
        _check_options(sampling, num_crops)
        if start < 0 or interval < 1:
            raise ConfigError(f"deepstack needs start ≥ 0 and interval ≥ 1; got {start}, {interval}.")
        self.inner = _square_inner(inner, in_dims, out_dim, grid)
        self.side = grid[0]
        self.num_crops, self.start, self.interval, self.sampling = num_crops, start, interval, sampling

    @property
    def layers(self) -> list[int]:
        """The LLM layers that receive stacks 0 … K−1."""
        return [self.start + k * self.interval for k in range(self.num_crops)]

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.inner.num_tokens(input_tokens, grid)

    def layers_written(self) -> list[int]:
        return self.layers

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        out = self.inner(features, text_context)
        crops = features[0].crops
        if crops is None:  # no high-resolution view (e.g. the dummy image of a text-only batch)
            return out
        crop_tokens = self.inner([crops], text_context).tokens  # [Σ crops, N, D]
        stacks = stacks_from_crops(crop_tokens, features[0].crop_grids, self.num_crops, self.side, self.sampling)
        injections = tuple(Injection(layer, stacks[:, k]) for k, layer in enumerate(self.layers))
        return ConnectorOutput(tokens=out.tokens, aux_losses=out.aux_losses, steps=(*out.steps, *injections), metrics=out.metrics)


@register_connector("deepstack_vit")
class DeepStackViTConnector(Connector):
    """DeepStack-V (specs/components.md §3.3): the stacking happens inside the vision encoder.

    Global views and crops run through the encoder together; at the input of block ``start`` (default: half
    the depth, block 12 of CLIP-L's 24) the crops' patch tokens are split into ``num_crops`` stacks (same
    sampling as DeepStack-L, prefix tokens excluded), and stack k is added to the global views' patch tokens
    (CLS untouched) at the input of block ``start + k``. Only the global features go on, through ``inner``, to
    the LLM: N tokens per image, no LLM injection, no parameters of its own.
    """

    nested_specs = {"inner": "connectors"}

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        grid: tuple[int, int],
        inner: Mapping[str, Any] | str = "mlp",
        num_crops: int = 4,
        start: int | None = None,
        sampling: Literal["2d", "1d", "grid"] = "2d",
    ) -> None:
        super().__init__(in_dims, out_dim)
        _check_options(sampling, num_crops)
        self.inner = _square_inner(inner, in_dims, out_dim, grid)
        self.side, self.num_crops, self.start, self.sampling = grid[0], num_crops, start, sampling

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.inner.num_tokens(input_tokens, grid)

    def encode_views(self, encoder: VisionEncoder, pixel_values: torch.Tensor, crop_pixel_values: torch.Tensor,
                     crop_grids: list[tuple[int, int]]) -> list[VisualFeatures]:
        """One encoder pass over global views and crops, with the stacking hooks installed on the encoder's blocks for
        this pass only (the hooks read this pass's image count and crop grids as arguments)."""
        blocks = encoder.blocks
        start = len(blocks) // 2 if self.start is None else self.start
        if start < 0 or start + self.num_crops > len(blocks):
            raise ConfigError(f"deepstack_vit: stacks at blocks {start}..{start + self.num_crops - 1}, but the encoder has "
                              f"{len(blocks)} blocks; lower start or num_crops.")
        stacks: list[torch.Tensor] = []  # the pass's stacks, made at block `start` from the crops' hidden states
        add = functools.partial(self._add_stack, n=pixel_values.shape[0], grids=crop_grids, prefix=encoder.num_prefix_tokens,
                                stacks=stacks)
        handles = [blocks[start + k].register_forward_pre_hook(functools.partial(add, k), with_kwargs=True)
                   for k in range(self.num_crops)]
        try:
            features = super().encode_views(encoder, pixel_values, crop_pixel_values, crop_grids)
        finally:
            for handle in handles:
                handle.remove()
        for f in features:
            f.crops = None  # the crops' information is already in the global features
        return features

    def _add_stack(self, k: int, module: nn.Module, args: tuple, kwargs: dict, *, n: int, grids: list[tuple[int, int]],
                   prefix: int, stacks: list[torch.Tensor]):
        hidden = args[0] if args else kwargs["hidden_states"]
        p = prefix
        if k == 0:
            stacks[:] = [stacks_from_crops(hidden[n:, p:], grids, self.num_crops, self.side, self.sampling)]
        patches = hidden[:n, p:] + stacks[0][:, k].to(hidden.dtype)
        hidden = torch.cat([torch.cat([hidden[:n, :p], patches], dim=1), hidden[n:]], dim=0)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        return self.inner(features, text_context)
