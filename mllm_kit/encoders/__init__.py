"""Vision encoders. Importing this package registers every built-in encoder."""

from mllm_kit.encoders import hf, timm_vit  # noqa: F401  (registration)
from mllm_kit.encoders.base import VisionEncoder, VisualFeatures
from mllm_kit.encoders.image_transform import ImageTransform

__all__ = ["ImageTransform", "VisionEncoder", "VisualFeatures"]
