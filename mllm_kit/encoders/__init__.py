"""Vision encoders: one module per backbone library, each registered by presence."""

from mllm_kit.data.transforms import ImageTransform
from mllm_kit.encoders.base import VisionEncoder, VisualFeatures

__all__ = ["ImageTransform", "VisionEncoder", "VisualFeatures"]
