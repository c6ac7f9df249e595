"""Preset YAML files by name: the top-level ``encoders/``, ``connectors/``, ``llms/`` and ``recipes/`` folders.

A spec may be a preset name (``clip_vit_l14_336``), a mapping naming a preset plus overrides
(``{preset: clip_vit_l14_336, image_size: 224}``), or a full component spec (``{name: mlp, depth: 2}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mllm_kit.errors import ConfigError, did_you_mean

GROUPS = ("encoders", "connectors", "llms", "recipes")
PRESET_KEY = "preset"
_PACKAGE = Path(__file__).resolve().parent


def preset_dirs(group: str) -> list[Path]:
    """Where presets of ``group`` live: the source checkout's folder, then the copy inside an installed wheel."""
    if group not in GROUPS:
        raise ConfigError(f"unknown preset group {group!r}; valid: {GROUPS}.")
    candidates = [_PACKAGE.parent / group, _PACKAGE / "presets" / group]
    return [d for d in candidates if d.is_dir()]


def list_presets(group: str) -> list[str]:
    names = {p.stem for d in preset_dirs(group) for p in d.glob("*.yaml")}
    return sorted(names)


def preset_path(group: str, name: str) -> Path:
    for d in preset_dirs(group):
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    available = list_presets(group)
    raise ConfigError(
        f"unknown {group[:-1]} preset {name!r}.{did_you_mean(name, available)} Available: {', '.join(available) or '(none)'}."
    )


def load_preset(group: str, name: str) -> dict[str, Any]:
    path = preset_path(group, name)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a mapping.")
    return data


def resolve_spec(group: str, spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """A full component spec from a preset name, a ``{preset: ..., **overrides}`` mapping or a full spec."""
    if isinstance(spec, str):
        return load_preset(group, spec)
    spec = dict(spec)
    name = spec.pop(PRESET_KEY, None)
    if name is None:
        return spec
    base = load_preset(group, name)
    if "name" in spec or "_target_" in spec:
        raise ConfigError(f"{group[:-1]} spec names preset {name!r} and also a component; keep one.")
    return {**base, **spec}
