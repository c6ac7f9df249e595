"""Language backbones and LLM-side stage transforms (MoE upcycling, LoRA, LoRA-MoE), each registered by presence."""

from mllm_kit.llm.base import LanguageModel

__all__ = ["LanguageModel"]
