"""Connectors between encoder features and the LLM. Importing this package registers the built-ins."""

from mllm_kit.connectors import abstractor, deepstack, dense, matryoshka, mlp, moe, qformer, resampler  # noqa: F401  (registration)
from mllm_kit.connectors.base import Connector, ConnectorOutput

__all__ = ["Connector", "ConnectorOutput"]
