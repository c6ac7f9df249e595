"""Validate plain dicts (from YAML) against dataclass schemas, with errors that name the key path."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from mllm_kit.errors import ConfigError, did_you_mean


def validate(data: Any, schema: type, path: str) -> Any:
    """Build ``schema`` (a dataclass) from ``data``; unknown keys, wrong types and missing fields raise
    :class:`ConfigError` naming ``path.key`` and, for unknown keys, the closest valid one."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping for {schema.__name__}, got {type(data).__name__}.")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{_join(path, key)}: unknown key.{did_you_mean(str(key), fields)} Valid keys: {', '.join(fields)}."
            )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = check_type(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing.")
    try:
        return schema(**kwargs)
    except ConfigError as err:  # a dataclass that checks its own values (e.g. SynthConfig)
        raise ConfigError(f"{path or 'recipe'}: {err}") from None


def check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # an optional field: the option's own error names the inner key
            return check_type(value, options[0], path)
        for option in options:
            try:
                return check_type(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_name(hint)}, got {value!r}.")
    if dataclasses.is_dataclass(hint):
        return validate(value, hint, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        item = args[0] if args else Any
        return tuple(check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        item = args[0] if args else Any
        return [check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        item = args[1] if len(args) == 2 else Any
        return {k: check_type(v, item, f"{path}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}.{did_you_mean(str(value), map(str, args))}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for saving the resolved recipe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)
