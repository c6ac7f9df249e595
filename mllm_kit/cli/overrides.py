"""``KEY=VALUE`` overrides of the commands that load a trained run (``eval``, ``eval --bench``, ``chat``, ``predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mllm_kit.errors import ConfigError

USAGE = ("connector.KEY=VALUE (connector options without weights, e.g. connector.scale=36), model.efficiency.KEY=VALUE "
         "(e.g. model.efficiency.ratio=0.75; model.efficiency=fastv picks a method, model.efficiency=off turns it off)")


@dataclass(frozen=True)
class RunOverrides:
    """``connector`` options, ``data`` fields (``eval`` only) and ``efficiency`` changes (for
    :func:`mllm_kit.efficiency.override_efficiency`; empty: keep the run's)."""

    connector: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**self.connector, **self.data, **({"efficiency": self.efficiency} if self.efficiency else {})}


def parse_overrides(items: Sequence[str], command: str, data: bool = False) -> RunOverrides:
    """Parse ``items``; ``data``: ``data.eval=PATH`` is allowed (``mllm-kit eval`` on another held-out set)."""
    from omegaconf import OmegaConf

    out = RunOverrides()
    for item in items:
        key, sep, raw = item.partition("=")
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"] if sep else None
        if sep and key.startswith("connector.") and len(key) > len("connector."):
            out.connector[key.removeprefix("connector.")] = value
        elif sep and key == "data.eval" and data:
            out.data["eval"] = str(value)
        elif sep and key == "model.efficiency" and isinstance(value, dict):  # a whole spec: {method: random, like: {...}}
            out.efficiency.clear()
            out.efficiency.update({"method": value.get("method", value.get("name")),
                                   **{k: v for k, v in value.items() if k not in ("method", "name")}})
        elif sep and key == "model.efficiency":
            out.efficiency["method"] = "none" if value in (None, False, "off", "none") else value
        elif sep and key.startswith("model.efficiency.") and len(key) > len("model.efficiency."):
            out.efficiency[key.removeprefix("model.efficiency.")] = value
        else:
            also = ", or data.eval=PATH" if data else ""
            raise ConfigError(f"{command} override {item!r}: expected {USAGE}{also}.")
    return out
