"""The MLP every projector is made of, its activations, and the one-encoder width check."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.activations import ACT2FN

from mllm_kit.errors import ConfigError, did_you_mean


def activation(name: str, what: str = "connector") -> nn.Module:
    """transformers' activation ``name`` (``gelu``, ``silu``, ``relu``, ``gelu_new``, ...) as a module."""
    if name not in ACT2FN:
        raise ConfigError(f"{what}: activation {name!r} is not one of transformers' ACT2FN.{did_you_mean(name, ACT2FN)}")
    return ACT2FN[name]


def single_width(in_dims: Sequence[int], name: str) -> int:
    """The channel width of the one encoder a connector reads; a mixture needs a fusion connector."""
    if len(in_dims) != 1:
        raise ConfigError(f"connector {name!r} takes one encoder, got {len(in_dims)}; use a fusion connector for mixtures.")
    return int(in_dims[0])


def build_mlp(in_dim: int, out_dim: int, depth: int, act: str = "gelu", bias: bool = True) -> nn.Sequential:
    """Linear(C→D), then (depth−1) × [act, Linear(D→D)] — LLaVA's ``mlp{depth}x_gelu`` (specs/components.md §1.2)."""
    if depth < 1:
        raise ConfigError(f"mlp depth must be ≥ 1, got {depth}.")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(depth - 1):
        layers += [activation(act, "mlp"), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)
