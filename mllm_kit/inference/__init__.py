"""Inference on trained models: prompts → batched generation, streaming and continuation scores."""

from mllm_kit.inference.generation import GenerationConfig, GenerationTiming, Generator, Prompt

__all__ = ["GenerationConfig", "GenerationTiming", "Generator", "Prompt"]
