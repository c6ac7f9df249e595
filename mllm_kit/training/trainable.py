"""Which parameters a stage trains: module paths and patterns; everything else is frozen."""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from mllm_kit.errors import ConfigError, did_you_mean


def _matcher(pattern: str):
    """``connector`` / ``llm.model.model.layers.0``: a module path (the module and everything under it);
    ``llm.*.mlp.*``: a glob over parameter names; ``re:...``: a regular expression (``re.search``)."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    if any(c in pattern for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: name == pattern or name.startswith(pattern + ".")


def apply_trainable(model: nn.Module, patterns: Sequence[str], where: str = "trainable",
                    precision: str | None = None) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad`` from ``patterns``; return ``{top-level module: (trainable, frozen)}`` parameter counts.

    With the stage's ``precision``, a trained parameter held in half precision (a part loaded with ``dtype: bfloat16``)
    is refused unless the whole stage computes in it (``bf16-true``/``16-true``): mixed and fp32 training keep fp32
    master weights, and an optimizer stepping half-precision weights loses the small updates."""
    names = [n for n, _ in model.named_parameters()]
    matchers = [(p, _matcher(p)) for p in patterns]
    for pattern, match in matchers:
        if not any(match(n) for n in names):
            modules = sorted({n.rsplit(".", 1)[0] for n in names} | {n.split(".")[0] for n in names})
            raise ConfigError(f"{where}: {pattern!r} matches no parameter.{did_you_mean(pattern, modules)}")
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        on = any(match(name) for _, match in matchers)
        param.requires_grad_(on)
        counts[name.split(".")[0]][0 if on else 1] += param.numel()
    if not any(c[0] for c in counts.values()):
        raise ConfigError(f"{where}: nothing is trainable.")
    if precision is not None and precision not in ("bf16-true", "16-true"):
        half = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        if half:
            raise ConfigError(f"{where}: {', '.join(half)} holds its weights in half precision (its `dtype` option) and this stage "
                              f"trains it under precision {precision!r}; freeze it (a frozen encoder may stay in bfloat16), "
                              "load it in float32, or train the whole stage with trainer.precision: bf16-true.")
    return {k: (v[0], v[1]) for k, v in counts.items()}


def format_table(counts: dict[str, tuple[int, int]], title: str) -> str:
    rows = [f"{'module':<12} {'trainable':>14} {'frozen':>14}"]
    for module, (on, off) in counts.items():
        rows.append(f"{module:<12} {on:>14,} {off:>14,}")
    total_on, total_off = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    rows.append(f"{'total':<12} {total_on:>14,} {total_off:>14,}")
    return title + "\n" + "\n".join(rows)
