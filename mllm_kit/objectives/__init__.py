"""Training objectives, each registered by presence."""

from mllm_kit.objectives.base import Objective

__all__ = ["Objective"]
