"""Saving and loading an :class:`~mllm_kit.model.MLLM` as a directory: the parts in their libraries' own layouts,
the connector's weights, and ``mllm.json`` with every spec and transform needed to rebuild it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, load_model, save_file, save_model

from mllm_kit.errors import ConfigError
from mllm_kit.files import atomic_dir
from mllm_kit.registry import TRANSFORMS

if TYPE_CHECKING:
    from mllm_kit.model import MLLM

MLLM_CONFIG = "mllm.json"
CONNECTOR_WEIGHTS = "connector.safetensors"
TRANSFORMED_WEIGHTS = "model.safetensors"


def save_mllm(model: MLLM, directory: str | Path) -> Path:
    """Write ``encoder/`` and ``llm/`` (HF/timm directories), ``connector.safetensors`` and ``mllm.json``,
    atomically: an interrupted save leaves any previous ``directory`` intact.

    A model changed by transforms (MoE upcycling, LoRA, ...) no longer matches its parts' checkpoint layouts:
    ``encoder/`` and ``llm/`` then hold only what rebuilds the architectures (configs, tokenizer, image
    statistics), and every weight goes into ``model.safetensors`` by module path; loading rebuilds the parts,
    replays the recorded transforms and loads that file strictly.
    """
    specs = {}
    for part in ("encoder", "connector", "llm"):
        spec = getattr(getattr(model, part), "build_spec", None)
        if spec is None:
            raise ConfigError(f"the {part} was not built from a spec (use MLLM.build), so it cannot be saved for reloading.")
        specs[part] = dict(spec)
    weights = not model.transforms
    with atomic_dir(directory) as tmp:
        specs["encoder"].update(model.encoder.save_pretrained(tmp / "encoder", weights=weights))
        specs["llm"].update(model.llm.save_pretrained(tmp / "llm", weights=weights))
        if weights:
            save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(tmp / CONNECTOR_WEIGHTS))
        else:
            save_model(model, str(tmp / TRANSFORMED_WEIGHTS))  # drops tied duplicates (e.g. tied LM head)
        for part in ("encoder", "llm"):  # paths inside the saved directory are stored relative to it
            specs[part]["path"] = part
        tokens = None if model.connector.dynamic_tokens else model.tokens_per_image()
        efficiency = getattr(model.efficiency, "build_spec", None)
        meta = {"format": 1, "tokens_per_image": tokens, "transforms": model.transforms, "efficiency": efficiency, **specs}
        (tmp / MLLM_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return Path(directory)


def load_mllm(cls: type[MLLM], directory: str | Path, connector: Mapping[str, Any] | None = None) -> MLLM:
    """Load what :func:`save_mllm` wrote: rebuild the parts from ``mllm.json``, replay the recorded transforms, load
    the weights strictly. ``connector`` changes connector options that hold no weights."""
    directory = Path(directory)
    config_file = directory / MLLM_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"{directory} is not a saved mllm-kit model (no {MLLM_CONFIG}).")
    meta = json.loads(config_file.read_text())
    specs = {}
    for part in ("encoder", "connector", "llm"):
        spec = dict(meta[part])
        if part != "connector":  # None marks a build option the saved directory replaces (config, tokenizer)
            spec = {k: v for k, v in spec.items() if v is not None}
            spec["path"] = str(directory / spec["path"])
        specs[part] = spec
    model = cls.build(specs["encoder"], {**specs["connector"], **(connector or {})}, specs["llm"])
    transforms = meta.get("transforms", [])
    for spec in transforms:
        TRANSFORMS.build(spec)(model)
    model.set_efficiency(meta.get("efficiency"), f"{config_file}: efficiency")
    if transforms:
        missing, unexpected = load_model(model, str(directory / TRANSFORMED_WEIGHTS), strict=False)
        if missing or unexpected:
            raise ConfigError(f"{directory / TRANSFORMED_WEIGHTS} does not fit the model rebuilt from {MLLM_CONFIG} "
                              f"(transforms {[t.get('name') for t in transforms]}): missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}.")
    else:
        model.connector.load_state_dict(load_file(str(directory / CONNECTOR_WEIGHTS)))
    return model
