"""Loading and saving timm backbones for the timm encoders (``timm`` ViTs, ``timm_convnext``), one way for both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from torch import nn

from mllm_kit.errors import ConfigError


def create_model(encoder: str, model_name: str | None, path: str | None, weights: str | None,
                 model_kwargs: dict[str, Any] | None, load_weights: bool, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, architecture arguments)`` from ``path`` (a ``save_for_hf`` directory) or ``model_name`` + optional
    ``weights`` (a local file; nothing touches the network). The arguments are kept so that :func:`save_model` writes
    a directory that rebuilds the same architecture. ``encoder`` names the encoder in errors."""
    kwargs = {"num_classes": 0, **(model_kwargs or {}), **kwargs}
    model_args = dict(model_kwargs or {})
    if path is not None:
        config_file = Path(path, "config.json")
        if not config_file.is_file():
            raise ConfigError(f"{encoder} encoder path {path!r} has no config.json (write it with timm save_for_hf).")
        model_args = {**json.loads(config_file.read_text()).get("model_args", {}), **model_args}
        return timm.create_model(f"local-dir:{path}", pretrained=load_weights, **kwargs), model_args
    if model_name is not None:
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"{encoder} encoder weights file {weights!r} does not exist.")
        overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}
        return timm.create_model(model_name, pretrained=weights is not None, **overlay, **kwargs), model_args
    raise ConfigError(f"{encoder} encoder needs 'model_name' (with optional 'weights') or 'path'.")


def save_model(model: nn.Module, directory: Path, model_args: dict[str, Any], weights: bool) -> dict[str, Any]:
    """Write ``model`` (or, without ``weights``, its config only) as a ``save_for_hf`` directory; return the spec
    fields that load it from there."""
    from timm.models import save_for_hf
    from timm.models._hub import save_config_for_hf

    if weights:
        save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True)
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_config_for_hf(model, str(Path(directory) / "config.json"), model_args=model_args)
    return {"path": str(directory), "model_name": None, "weights": None, "model_kwargs": None, "load_weights": weights}
