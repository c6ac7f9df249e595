"""Layers shared by connectors and LLM-side transforms: MLPs, stacked experts, top-k routing."""
