"""Connectors between encoder features and the LLM: one module per published family, each registered by presence."""

from mllm_kit.connectors.base import Connector, ConnectorOutput

__all__ = ["Connector", "ConnectorOutput"]
