"""Preset YAML files by name: encoder, connector and LLM presets, and the recipe zoo.

Presets are looked up, in order, in the folders named by ``MLLM_KIT_PRESETS`` (``os.pathsep``-separated; each holds
``encoders/``, ``connectors/``, ``llms/`` and/or ``recipes/``), then in the package: ``mllm_kit/presets/<group>``
inside an installed wheel, or the top-level ``<group>/`` folders of a source checkout (an editable install).
Nowhere else: a folder that happens to be called ``recipes/`` beside the package in site-packages is not read.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mllm_kit.errors import ConfigError, did_you_mean

GROUPS = ("encoders", "connectors", "llms", "recipes")
PRESETS_ENV = "MLLM_KIT_PRESETS"
PRESET_KEY = "preset"
_PACKAGE = Path(__file__).resolve().parent.parent


@cache
def _source_checkout() -> Path | None:
    """The repository root when the package is imported from a source checkout of mllm-kit, else ``None``."""
    root = _PACKAGE.parent
    project = root / "pyproject.toml"
    try:
        return root if project.is_file() and 'name = "mllm-kit"' in project.read_text() else None
    except OSError:
        return None


def preset_dirs(group: str) -> list[Path]:
    """Where presets of ``group`` live, in lookup order (user folders first)."""
    if group not in GROUPS:
        raise ConfigError(f"unknown preset group {group!r}; valid: {GROUPS}.")
    user = [Path(p).expanduser() / group for p in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if p]
    checkout = _source_checkout()
    package = [_PACKAGE / "presets" / group, *([checkout / group] if checkout else [])]
    return [d for d in [*user, *package] if d.is_dir()]


def list_presets(group: str) -> list[str]:
    return sorted({p.stem for d in preset_dirs(group) for p in d.glob("*.yaml")})


def preset_path(group: str, name: str) -> Path:
    for d in preset_dirs(group):
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    available = list_presets(group)
    raise ConfigError(
        f"unknown {group[:-1]} preset {name!r}.{did_you_mean(name, available)} Available: {', '.join(available) or '(none)'}."
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping as plain containers, interpolations left unresolved (they resolve in the whole recipe)."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping, got {type(data).__name__}.")
    return data


def load_preset(group: str, name: str) -> dict[str, Any]:
    return read_yaml(preset_path(group, name))


def is_preset(group: str, name: str) -> bool:
    return any((d / f"{name}.yaml").is_file() for d in preset_dirs(group))
