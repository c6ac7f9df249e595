"""mllm-kit: assemble multimodal LLMs from swappable encoders, connectors and LLMs; train them with staged recipes."""

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.model import MLLM, MLLMOutput

__version__ = "0.1.0"

__all__ = ["IGNORE_INDEX", "MLLM", "Batch", "MLLMOutput", "__version__"]
