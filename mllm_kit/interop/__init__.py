"""Interop with other model formats: transformers' LLaVA."""
