"""``AVAILABLE_MODELS``: what lmms-eval's ``LMMS_EVAL_PLUGINS`` loader reads (``<name>`` module → class name)."""

AVAILABLE_MODELS = {"mllm_kit": "MLLMKit"}
