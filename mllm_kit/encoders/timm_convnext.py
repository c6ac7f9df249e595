"""A timm ConvNeXt as an encoder: one stage's feature map read as a patch grid (the CLIP-ConvNeXt members of Eagle
and Cambrian-1, specs/components.md §5.1, §5.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_kit.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, ResizeMode
from mllm_kit.encoders.base import VisionEncoder
from mllm_kit.encoders.timm_models import create_model, save_model
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_encoder


@register_encoder("timm_convnext")
class TimmConvNeXtEncoder(VisionEncoder):
    """A timm ``ConvNeXt`` (``convnext_*``; e.g. ``convnext_xxlarge.clip_laion2b_soup``, the CLIP-ConvNeXt-XXL).

    Hidden states, HF-style: 0 = the stem's output (stride 4), k = the output of stage k (strides 4, 8, 16, 32),
    each ``[n_img, H·W, C_k]`` in row-major order — a patch grid whose "patch size" is the stage's stride. The
    feature map of ``select_layer`` (default −1: the last stage; Eagle reads it at 1024 px → 32×32 tokens) sets
    ``embed_dim``, ``patch_size`` and ``grid``. A ConvNeXt takes any input size: ``image_size`` is the size images
    are resized to (default: the model's pretrained input size). There are no prefix tokens. ``path``, ``model_name``,
    ``weights``, ``model_kwargs`` as for the ``timm`` ViT encoder.
    """

    def __init__(
        self,
        model_name: str | None = None,
        path: str | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        select_layer: int = -1,
        image_mode: ResizeMode = "resize",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        frozen: bool = True,
        load_weights: bool = True,
    ) -> None:
        super().__init__(select_layer=select_layer, select_feature="patch", frozen=frozen)
        self.model, self._model_args = create_model("timm_convnext", model_name, path, weights, model_kwargs, load_weights)
        m = self.model
        if not all(hasattr(m, a) for a in ("stem", "stages", "feature_info")):
            raise ConfigError(f"timm model {type(m).__name__} is not a ConvNeXt; use the 'timm' encoder for ViTs.")
        self.num_layers = len(m.stages)
        self.num_prefix_tokens = 0
        self.layer_cls = type(m.stages[0])
        self._widths = [m.feature_info[0]["num_chs"], *(f["num_chs"] for f in m.feature_info)]
        self._strides = [m.feature_info[0]["reduction"], *(f["reduction"] for f in m.feature_info)]
        cfg = m.pretrained_cfg
        self.image_size = int(image_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.finish_init()  # checks select_layer against the stages
        self.embed_dim = self._widths[self.selected_layer]
        self.patch_size = self._strides[self.selected_layer]
        if self.image_size < self.patch_size:
            raise ConfigError(f"timm_convnext: image_size {self.image_size} is smaller than the stride {self.patch_size} of "
                              f"the selected stage (select_layer={select_layer}); raise image_size or read an earlier stage.")
        self.image_transform = ImageTransform(size=self.image_size, mean=tuple(mean or cfg.get("mean", CLIP_MEAN)),
                                              std=tuple(std or cfg.get("std", CLIP_STD)), mode=image_mode)

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        return save_model(self.model, directory, self._model_args, weights)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.stages

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.model.stem(pixel_values)
        maps = [x]
        for stage in self.model.stages:
            x = self.run_block(stage, x)
            maps.append(x)
        maps[-1] = self.model.norm_pre(maps[-1])  # Identity in ConvNeXt; forward_features ends with it
        return tuple(f.flatten(2).transpose(1, 2) for f in maps)  # [n, C, H, W] → [n, H·W, C]
