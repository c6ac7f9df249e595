"""Resolve component specs once: presets expanded, every registry name and option checked, nested specs included.

A spec is a preset name (``clip_vit_l14_336``), ``{preset: name, **overrides}``, a registered name, ``{name: ...,
**options}`` or ``{_target_: pkg.mod.Class, **options}``. :func:`resolve_component` returns the full mapping
(``name`` or ``_target_`` plus options) that ``MLLM.build`` takes; an unknown name or option raises
:class:`ConfigError` naming the key path and the closest valid names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from mllm_kit.config.recipe import ModelSpec
from mllm_kit.config.presets import PRESET_KEY, is_preset, list_presets, load_preset
from mllm_kit.errors import ConfigError, RegistryError, did_you_mean
from mllm_kit.registry import CONNECTORS, ENCODERS, LLMS, NAME_KEY, TARGET_KEY, TEMPLATES, Registry, check_kwargs

COMPONENTS: dict[str, Registry[Any]] = {"encoders": ENCODERS, "connectors": CONNECTORS, "llms": LLMS}
# Arguments mllm-kit passes to a component's constructor itself (a spec may not set them).
SUPPLIED: dict[str, tuple[str, ...]] = {"encoders": (), "connectors": ("in_dims", "out_dim", "grid", "grids", "members", "image_size", "depths"), "llms": ()}


def expand(group: str, spec: Any, path: str) -> dict[str, Any]:
    """The full mapping of a spec: presets (recursively) merged under their overrides."""
    registry = COMPONENTS[group]
    if isinstance(spec, str):
        if is_preset(group, spec):
            return expand(group, load_preset(group, spec), path)
        if spec in registry:
            return {NAME_KEY: spec}
        if "." in spec:
            return {TARGET_KEY: spec}
        presets, names = list_presets(group), registry.names()
        raise ConfigError(
            f"{path}: {spec!r} is neither a {group[:-1]} preset nor a registered {registry.kind}.{did_you_mean(spec, [*presets, *names])} "
            f"Presets: {', '.join(presets) or '(none)'}. Registered {registry.kind}s: {', '.join(names)}."
        )
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a preset name or a mapping, got {spec!r}.")
    spec = dict(spec)
    preset = spec.pop(PRESET_KEY, None)
    if preset is None:
        return spec
    if NAME_KEY in spec or TARGET_KEY in spec:
        raise ConfigError(f"{path}: names preset {preset!r} and also a component ({spec.get(NAME_KEY) or spec.get(TARGET_KEY)!r}); keep one.")
    if not is_preset(group, str(preset)):
        presets = list_presets(group)
        raise ConfigError(f"{path}.{PRESET_KEY}: unknown {group[:-1]} preset {preset!r}.{did_you_mean(str(preset), presets)} "
                          f"Available: {', '.join(presets)}.")
    base = expand(group, str(preset), f"{path}.{PRESET_KEY}")
    return {**base, **spec, **{key: _merge_members(base[key], spec[key]) for key in MERGED_MAPS
                               if isinstance(base.get(key), Mapping) and isinstance(spec.get(key), Mapping)}}


# Options holding named component specs (a mixture's members): an override of a preset's entry merges into it, so
# ``{preset: eagle_x2, members: {clip: {image_size: 336}}}`` changes one member and keeps the others.
MERGED_MAPS = ("members",)


def _merge_members(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, spec in override.items():
        partial = isinstance(spec, Mapping) and not {PRESET_KEY, NAME_KEY, TARGET_KEY} & set(spec)
        if partial and name in out:
            prior = out[name]
            out[name] = {**({PRESET_KEY: prior} if isinstance(prior, str) else dict(prior)), **spec}
        else:
            out[name] = spec
    return out


def component_class(registry: Registry[Any], spec: Mapping[str, Any] | str, path: str) -> tuple[Any, dict[str, Any]]:
    """``(class, options)`` of a spec, with registry errors prefixed by the key path."""
    key = TARGET_KEY if isinstance(spec, Mapping) and TARGET_KEY in spec else NAME_KEY
    try:
        return registry.resolve(spec)
    except RegistryError as err:
        where = path if isinstance(spec, str) else f"{path}.{key}"
        raise ConfigError(f"{where}: {err}") from None


def resolve_component(group: str, spec: Any, path: str | None = None) -> dict[str, Any]:
    """A checked full spec of ``group`` (``encoders``, ``connectors``, ``llms``); see the module docstring."""
    path = path or group[:-1]
    full = expand(group, spec, path)
    cls, options = component_class(COMPONENTS[group], full, path)
    supplied = dict.fromkeys(SUPPLIED[group])
    try:
        check_kwargs(cls, options, what=path, supplied=supplied)
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    # Options that are themselves component specs (a wrapper's inner connector) resolve here too, defaults included.
    params = inspect.signature(cls).parameters
    for option, nested in getattr(cls, "nested_specs", {}).items():
        value = full.get(option, params[option].default if option in params else inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and value is not None:
            full[option] = resolve_component(nested, value, f"{path}.{option}")
    # Options that map names to component specs (a mixture's members).
    for option, nested in getattr(cls, "nested_spec_maps", {}).items():
        value = full.get(option)
        if isinstance(value, Mapping):
            full[option] = {name: resolve_component(nested, spec, f"{path}.{option}.{name}") for name, spec in value.items()}
        elif value is not None:
            raise ConfigError(f"{path}.{option}: expected a mapping of names to {nested[:-1]} specs, got {value!r}.")
    return full


def resolve_named(registry: Registry[Any], spec: Any, path: str) -> dict[str, Any]:
    """A checked ``{name | _target_: ..., **options}`` of a registry without presets (objectives, transforms)."""
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(f"{path}: expected a {registry.kind} name or a mapping, got {spec!r}.")
    cls, options = component_class(registry, spec, path)
    try:
        check_kwargs(cls, options, what=path)
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    if isinstance(spec, str):
        return {NAME_KEY: spec}
    return dict(spec)


def resolve_efficiency(spec: Any, path: str) -> dict[str, Any] | None:
    """A checked ``{name | _target_: ..., **options}`` efficiency method (``method`` is accepted for ``name``), or
    ``None`` for off (``null``, ``false``, ``none``, ``{method: none}``). Its fit to a model (layers within the depth)
    is checked when a model takes it (:meth:`MLLM.set_efficiency`)."""
    from mllm_kit.registry import EFFICIENCY

    if spec in (None, False, "none", "off") or (isinstance(spec, Mapping) and spec.get("method") in ("none", "off")):
        return None
    if isinstance(spec, Mapping) and "method" in spec:
        spec = {NAME_KEY: spec["method"], **{k: v for k, v in spec.items() if k != "method"}}
    return resolve_named(EFFICIENCY, spec, path)


def check_template(name: str, path: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{path}: expected a template name, got {name!r}.")
    try:
        TEMPLATES.get(name)
    except RegistryError as err:
        raise ConfigError(f"{path}: {err}") from None
    return name


def resolve_model(encoder: Any, connector: Any, llm: Any) -> ModelSpec:
    """A :class:`ModelSpec` of checked full specs, for ``MLLM.build``."""
    if llm is None:
        raise ConfigError("model.llm: no LLM is named; set a preset (e.g. vicuna_7b_v15) or a spec.")
    return ModelSpec(resolve_component("encoders", encoder, "model.encoder"),
                     resolve_component("connectors", connector, "model.connector"),
                     resolve_component("llms", llm, "model.llm"))

