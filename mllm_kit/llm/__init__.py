"""Language backbones. Importing this package registers the built-ins."""

from mllm_kit.llm import hf, lora, lora_moe, moe  # noqa: F401  (registration)
from mllm_kit.llm.base import LanguageModel

__all__ = ["LanguageModel"]
