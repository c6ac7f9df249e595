"""Any timm Vision Transformer as an encoder, with weights from a local file or directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mllm_kit.encoders.base import SelectFeature, VisionEncoder
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
        kwargs: dict[str, Any] = {"num_classes": 0, **(model_kwargs or {})}
        if image_size is not None:
            kwargs["img_size"] = image_size
        # Architecture arguments, kept so save_pretrained() writes a directory that rebuilds the same model.
        self._model_args = dict(model_kwargs or {})
        if path is not None:
            config_file = Path(path, "config.json")
            if not config_file.is_file():
                raise ConfigError(f"timm encoder path {path!r} has no config.json (write it with timm save_for_hf).")
            self._model_args = {**json.loads(config_file.read_text()).get("model_args", {}), **self._model_args}
            self.model = timm.create_model(f"local-dir:{path}", pretrained=load_weights, **kwargs)
        elif model_name is not None:
            if weights is not None and not Path(weights).is_file():
                raise ConfigError(f"timm encoder weights file {weights!r} does not exist.")
            overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}
            self.model = timm.create_model(model_name, pretrained=weights is not None, **overlay, **kwargs)
        else:
            raise ConfigError("timm encoder needs 'model_name' (with optional 'weights') or 'path'.")
        m = self.model
        if not all(hasattr(m, a) for a in ("patch_embed", "blocks", "_pos_embed", "norm_pre")):
            raise ConfigError(f"timm model {type(m).__name__} is not a VisionTransformer; mllm-kit's timm encoder reads ViT blocks.")
        self.embed_dim = m.embed_dim
        self.num_layers = len(m.blocks)
        self.patch_size = m.patch_embed.patch_size[0]
        self.image_size = m.patch_embed.img_size[0]
        self.num_prefix_tokens = m.num_prefix_tokens
        self.layer_cls = type(m.blocks[0])
        cfg = m.pretrained_cfg
        self.image_transform = ImageTransform(
            size=self.image_size,
            mean=tuple(mean or cfg.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(std or cfg.get("std", (0.5, 0.5, 0.5))),
            mode=image_mode,
        )
        self.finish_init()

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        from timm.models import save_for_hf
        from timm.models._hub import save_config_for_hf

        args = {"img_size": self.image_size, **getattr(self, "_model_args", {})}
        if weights:
            save_for_hf(self.model, str(directory), model_args=args, safe_serialization=True)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            save_config_for_hf(self.model, str(Path(directory) / "config.json"), model_args=args)
        return {"path": str(directory), "model_name": None, "weights": None, "model_kwargs": None, "image_size": None,
                "load_weights": weights}

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))
        states = [x]
        for block in m.blocks:
            x = block(x)
            states.append(x)
        return tuple(states)
