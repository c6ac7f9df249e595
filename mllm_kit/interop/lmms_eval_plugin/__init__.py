"""lmms-eval's ``LMMS_EVAL_PLUGINS`` layout for the mllm-kit backend (:mod:`mllm_kit.interop.lmms_eval`).

``LMMS_EVAL_PLUGINS=mllm_kit.interop.lmms_eval_plugin lmms-eval --model mllm_kit ...``: lmms-eval imports
``<plugin>.models``, reads ``AVAILABLE_MODELS`` (``{name: class}``) and loads ``<plugin>.models.<name>.<class>``;
its CLI also adds ``<plugin>.tasks`` to the task search path (so that package must exist, even empty).
With the ``lmms_eval.models`` entry point installed, the variable is not needed.
"""
