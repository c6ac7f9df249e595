"""Training objectives. Importing this package registers the built-ins."""

from mllm_kit.objectives import lm, matryoshka  # noqa: F401  (registration)
from mllm_kit.objectives.base import Objective

__all__ = ["Objective"]
