"""Benchmarks: bench files in LLaVA's evaluation formats, scored with :mod:`mllm_kit.metrics`, during or after training."""
