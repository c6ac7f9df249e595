"""transformers vision towers: CLIP, SigLIP and DINOv2, loaded from a local directory or built from a config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm_kit.encoders.base import SelectFeature, VisionEncoder, find_layer_list
from mllm_kit.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    ResizeMode,
)
from mllm_kit.errors import ConfigError
from mllm_kit.pretrained import from_pretrained, resolve_dtype
from mllm_kit.registry import register_encoder


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model; ``path`` (a local directory or hub id) or ``config`` (random init).

    Subclasses fix the model class, whether it has a CLS token and the default preprocessing.
    """

    model_cls: ClassVar[type[PreTrainedModel]]
    config_cls: ClassVar[type[PretrainedConfig]]
    has_cls: ClassVar[bool] = True
    default_mean: ClassVar[tuple[float, float, float]] = CLIP_MEAN
    default_std: ClassVar[tuple[float, float, float]] = CLIP_STD
    default_mode: ClassVar[ResizeMode] = "center_crop"

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: SelectFeature = "patch",
        drop_first_patch: bool = False,
        image_size: int | None = None,
        image_mode: ResizeMode | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        frozen: bool = True,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        load_weights: bool = True,
        grayscale: bool = False,
    ) -> None:
        super().__init__(select_layer=select_layer, select_feature=select_feature, frozen=frozen,
                         drop_first_patch=drop_first_patch)
        if (path is None) == (config is None):
            raise ConfigError(f"{type(self).__name__}: give exactly one of 'path' (a model directory) or 'config'.")
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if path is not None and load_weights:
            self.model = from_pretrained(self.model_cls, path, what="encoder", **kwargs)
        else:  # from a config (random init); a transformed saved model loads its weights afterwards
            cfg = self.config_cls(**config) if path is None else from_pretrained(self.config_cls, path, what="encoder config")
            if attn_implementation:
                cfg._attn_implementation = attn_implementation
            self.model = self.model_cls(cfg).to(kwargs["dtype"])
        cfg = self.model.config
        self.embed_dim = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.patch_size = cfg.patch_size
        self.native_image_size = cfg.image_size
        self.image_size = image_size or cfg.image_size
        if self.image_size < self.patch_size:
            raise ConfigError(f"encoder image_size {self.image_size} is smaller than patch_size {self.patch_size}.")
        self.num_prefix_tokens = 1 if self.has_cls else 0
        self.layer_cls = type(find_layer_list(self.model, self.num_layers)[0])
        file_mean, file_std = _processor_stats(path)
        self.image_transform = ImageTransform(
            size=self.image_size,
            mean=tuple(mean or file_mean or self.default_mean),
            std=tuple(std or file_std or self.default_std),
            mode=image_mode or self.default_mode,
            grayscale=bool(grayscale),
        )
        self.finish_init()

    def enable_activation_checkpointing(self) -> None:
        super().enable_activation_checkpointing()
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        if weights:
            self.model.save_pretrained(directory)
        else:
            self.model.config.save_pretrained(directory)
        t = self.image_transform
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(t.mean), "image_std": list(t.std)}))
        return {"path": str(directory), "config": None, "load_weights": weights}

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = {}
        if self.image_size != self.native_image_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        return tuple(out.hidden_states)


@register_encoder("hf_clip")
class CLIPEncoder(HFVisionEncoder):
    """CLIP ViT (e.g. ``openai/clip-vit-large-patch14-336``: 24×24 = 576 patches + CLS, C = 1024).

    LLaVA-1.5 reads ``hidden_states[-2]`` without CLS (specs/components.md §1.1).
    """

    model_cls = CLIPVisionModel
    config_cls = CLIPVisionConfig


@register_encoder("hf_siglip")
class SigLIPEncoder(HFVisionEncoder):
    """SigLIP ViT: no CLS token, so every token is a patch (so400m/384: 27×27 = 729, C = 1152)."""

    model_cls = SiglipVisionModel
    config_cls = SiglipVisionConfig
    has_cls = False
    default_mean = HALF
    default_std = HALF
    default_mode = "resize"


@register_encoder("hf_dinov2")
class DINOv2Encoder(HFVisionEncoder):
    """DINOv2 ViT (CLS + patches; position embeddings interpolate to any multiple of the patch size)."""

    model_cls = Dinov2Model
    config_cls = Dinov2Config
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states)


def _processor_stats(path: str | None) -> tuple[list[float] | None, list[float] | None]:
    """image_mean / image_std from a local ``preprocessor_config.json``, if there is one."""
    if path is None:
        return None, None
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None, None
    data = json.loads(file.read_text())
    return data.get("image_mean"), data.get("image_std")
