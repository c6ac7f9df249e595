"""Any timm Vision Transformer as an encoder, with weights from a local file or directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_kit.encoders.base import SelectFeature, VisionEncoder
from mllm_kit.encoders.timm_models import create_model, save_model
from mllm_kit.data.transforms import ImageTransform, ResizeMode
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_encoder


@register_encoder("timm")
class TimmVisionEncoder(VisionEncoder):
    """A timm ViT (``vit_*``: CLIP, SigLIP, DINOv2, ... variants).

    ``path``: a directory written by ``timm.models.save_for_hf`` (config.json + weights) — it keeps the
    architecture and input size; or ``model_name`` plus optional ``weights`` (a ``.safetensors``/``.pth``
    file). ``model_kwargs`` go to ``timm.create_model`` (``depth``, ``embed_dim``, ...). Nothing touches
    the network. Hidden states follow HF indexing: 0 = after ``norm_pre``, k = output of block k.
    """

    def __init__(
        self,
        model_name: str | None = None,
        path: str | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: SelectFeature = "patch",
        image_mode: ResizeMode = "resize",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        frozen: bool = True,
        load_weights: bool = True,
    ) -> None:
        super().__init__(select_layer=select_layer, select_feature=select_feature, frozen=frozen)
        size = {"img_size": image_size} if image_size is not None else {}
        self.model, self._model_args = create_model("timm", model_name, path, weights, model_kwargs, load_weights, **size)
        m = self.model
        if not all(hasattr(m, a) for a in ("patch_embed", "blocks", "_pos_embed", "norm_pre")):
            raise ConfigError(f"timm model {type(m).__name__} is not a VisionTransformer; mllm-kit's timm encoder reads ViT blocks.")
        self.embed_dim = m.embed_dim
        self.num_layers = len(m.blocks)
        self.patch_size = m.patch_embed.patch_size[0]
        self.image_size = m.patch_embed.img_size[0]
        self.num_prefix_tokens = m.num_prefix_tokens
        self.layer_cls = type(m.blocks[0])
        self.embed_positions = _PosEmbed(m)
        cfg = m.pretrained_cfg
        self.image_transform = ImageTransform(
            size=self.image_size,
            mean=tuple(mean or cfg.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(std or cfg.get("std", (0.5, 0.5, 0.5))),
            mode=image_mode,
        )
        self.finish_init()

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        args = {"img_size": self.image_size, **self._model_args}
        return {**save_model(self.model, directory, args, weights), "image_size": None}

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        return [(self.embed_positions, p) for p in self.model.parameters(recurse=False)]

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = m.norm_pre(m.patch_drop(self.embed_positions(m.patch_embed(pixel_values))))
        states = [x]
        for block in m.blocks:
            x = self.run_block(block, x)
            states.append(x)
        return tuple(states)


class _PosEmbed(nn.Module):
    """timm's ``VisionTransformer._pos_embed`` (prefix tokens + position embeddings) as a module call of its own, with a
    tensor output, so that ZeRO-3 can gather the ViT's own parameters around it in forward and backward. Holds no
    parameters (the state dict is unchanged)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.__dict__["vit"] = vit  # not a child: the ViT is registered once, under the encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit._pos_embed(x)
