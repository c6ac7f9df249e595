"""``--model mllm_kit`` for lmms-eval's ``LMMS_EVAL_PLUGINS`` loader: the backend of :mod:`mllm_kit.interop.lmms_eval`."""

from mllm_kit.interop.lmms_eval import MLLMKit

__all__ = ["MLLMKit"]
