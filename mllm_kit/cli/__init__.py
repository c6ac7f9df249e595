"""The ``mllm-kit`` command line (``python -m mllm_kit.cli``)."""
