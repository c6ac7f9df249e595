"""Typed, exact-name registries for every swappable part, filled by presence.

A component registers with a decorator::

    @register_connector("mlp")
    class MLPConnector(Connector): ...

A module placed in one of the component packages (``mllm_kit/encoders``, ``connectors``, ``llm``, ``objectives``,
the templates of ``mllm_kit/data/templates.py`` and the benches of ``mllm_kit/evaluation/benches.py``) is imported the first time any registry is read, so it registers
without being listed anywhere. Other packages register through the ``mllm_kit.components`` entry-point group: each
entry point names a module that is imported then (its decorators register its components)::

    [project.entry-points."mllm_kit.components"]
    my_pkg = "my_pkg.components"

A recipe names a component (``name: mlp``) or points at any importable class (``_target_: my_pkg.MyConnector``), so
user code need not register at all. Names match exactly: a duplicate registration and an unknown name are errors, the
latter listing the valid names and the closest match.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from mllm_kit.errors import RegistryError, did_you_mean

T = TypeVar("T")

TARGET_KEY = "_target_"
NAME_KEY = "name"
ENTRY_POINT_GROUP = "mllm_kit.components"
# Where built-in components live; every module in these packages is imported on the first registry read.
COMPONENT_PACKAGES = ("mllm_kit.encoders", "mllm_kit.connectors", "mllm_kit.llm", "mllm_kit.objectives", "mllm_kit.data.templates",
                      "mllm_kit.evaluation.benches", "mllm_kit.efficiency")

_discovered = False
_origin: str | None = None  # set while an entry point loads, so its components say which plugin they came from


def discover() -> None:
    """Import every built-in component module and every ``mllm_kit.components`` entry point (once)."""
    global _discovered, _origin
    if _discovered:
        return
    _discovered = True
    for package in COMPONENT_PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or ep.value
        _origin = f"plugin {dist} ({ep.value})"
        try:
            ep.load()
        except Exception as err:
            raise RegistryError(f"entry point {ep.name!r} = {ep.value!r} of {dist} in group {ENTRY_POINT_GROUP!r} failed to "
                                f"load: {type(err).__name__}: {err}") from err
        finally:
            _origin = None


def import_target(path: str, *, what: str = "component") -> Any:
    """Import ``package.module.Attr`` and return ``Attr``, with a clear error if it is missing."""
    module_name, _, attr = str(path).rpartition(".")
    if not module_name:
        raise RegistryError(f"{TARGET_KEY}: {path!r} is not a dotted path; write 'package.module.Class'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RegistryError(f"{TARGET_KEY}: cannot import module {module_name!r} for {what} {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise RegistryError(
            f"{TARGET_KEY}: module {module_name!r} has no attribute {attr!r}.{did_you_mean(attr, names)}"
        ) from None


class Registry(Generic[T]):
    """Maps exact names to classes (or factories) of one kind of component."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}.")

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by {_qualname(self._entries[name])}; "
                    f"pick another name for {_qualname(obj)}."
                )
            self._entries[name] = obj
            self._origins[name] = _origin or getattr(obj, "__module__", "?")
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as exactly ``name``; a dotted path is imported instead."""
        discover()
        if name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and "." in name:
            return import_target(name, what=self.kind)
        valid = ", ".join(sorted(self._entries)) or "(none)"
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} Valid {self.kind}s: {valid}. "
            f"A class of your own can be named with {TARGET_KEY}: package.module.Class."
        )

    def resolve(self, spec: Mapping[str, Any] | str) -> tuple[T, dict[str, Any]]:
        """Split a spec (a name, or a mapping with ``name`` or ``_target_``) into (class, kwargs)."""
        if isinstance(spec, str):
            return self.get(spec), {}
        kwargs = dict(spec)
        target = kwargs.pop(TARGET_KEY, None)
        name = kwargs.pop(NAME_KEY, None)
        if target is not None and name is not None:
            raise RegistryError(f"{self.kind} spec gives both {NAME_KEY}={name!r} and {TARGET_KEY}={target!r}; keep one.")
        if target is None and name is None:
            raise RegistryError(
                f"{self.kind} spec needs '{NAME_KEY}' (one of: {', '.join(sorted(self._entries))}) "
                f"or '{TARGET_KEY}'; got keys {sorted(kwargs)}."
            )
        cls = import_target(target, what=self.kind) if target is not None else self.get(name)
        return cls, kwargs

    def build(self, spec: Mapping[str, Any] | str, /, **extra: Any) -> Any:
        """Instantiate a spec. ``extra`` carries arguments the caller supplies (e.g. ``in_dims``)."""
        cls, kwargs = self.resolve(spec)
        check_kwargs(cls, kwargs, what=f"{self.kind} {_label(spec)}", supplied=extra)
        obj = cls(**kwargs, **extra)
        # Remember how it was built, so a saved model can be rebuilt (see MLLM.save_pretrained).
        target = spec.get(TARGET_KEY) if isinstance(spec, Mapping) else None
        obj.build_spec = {TARGET_KEY: target, **kwargs} if target else {NAME_KEY: _plain_name(spec), **kwargs}
        if self.base is not None and not isinstance(obj, self.base):
            raise RegistryError(f"{self.kind} {_label(spec)} built {type(obj).__name__}, which is not a {self.base.__name__}.")
        return obj

    def names(self) -> list[str]:
        discover()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        """Where ``name`` was registered from: its module, or the plugin whose entry point registered it."""
        discover()
        return self._origins[name]

    def __contains__(self, name: object) -> bool:
        discover()
        return name in self._entries

    def __len__(self) -> int:
        discover()
        return len(self._entries)


def check_kwargs(cls: Any, kwargs: Mapping[str, Any], *, what: str, supplied: Mapping[str, Any] = {}) -> None:
    """Reject option names the constructor does not take, naming the closest valid one."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    for key in kwargs:
        if key in supplied:
            raise RegistryError(f"{what}: option {key!r} is set by mllm-kit itself; remove it from the config.")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            options = [v for v in valid if v not in supplied]
            raise RegistryError(
                f"{what}: unknown option {key!r}.{did_you_mean(key, options)} Valid options: {', '.join(options)}."
            )


def _plain_name(spec: Mapping[str, Any] | str) -> str:
    return spec if isinstance(spec, str) else spec[NAME_KEY]


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _label(spec: Mapping[str, Any] | str) -> str:
    if isinstance(spec, str):
        return repr(spec)
    return repr(spec.get(NAME_KEY) or spec.get(TARGET_KEY))


ENCODERS: Registry[Any] = Registry("encoder")
CONNECTORS: Registry[Any] = Registry("connector")
LLMS: Registry[Any] = Registry("llm")
OBJECTIVES: Registry[Any] = Registry("objective")
TRANSFORMS: Registry[Any] = Registry("transform")
TEMPLATES: Registry[Any] = Registry("template")
BENCHES: Registry[Any] = Registry("bench")
EFFICIENCY: Registry[Any] = Registry("efficiency method")

register_encoder = ENCODERS.register
register_connector = CONNECTORS.register
register_llm = LLMS.register
register_objective = OBJECTIVES.register
register_transform = TRANSFORMS.register
register_template = TEMPLATES.register
register_bench = BENCHES.register
register_efficiency = EFFICIENCY.register

REGISTRIES: dict[str, Registry[Any]] = {
    "encoders": ENCODERS,
    "connectors": CONNECTORS,
    "llms": LLMS,
    "objectives": OBJECTIVES,
    "transforms": TRANSFORMS,
    "templates": TEMPLATES,
    "benches": BENCHES,
    "efficiency": EFFICIENCY,
}
