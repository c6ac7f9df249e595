"""A control for any token-dropping method: drop as many image tokens, at the same layers, chosen at random.

``{method: random, like: {method: fastv, layer: 2, ratio: 0.5}}`` keeps, of each image, exactly the count the method
``like`` keeps at each of its drop layers (its own ``keep_counts``), so both run the same FLOPs; only the choice differs.
Whatever a method gains over this control at equal FLOPs is what its scoring adds. The draws come from torch's global
CPU generator (``mllm-kit eval`` seeds it with the stage's ``trainer.seed``, so an evaluation repeats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mllm_kit.efficiency import TokenEfficiency, build_efficiency
from mllm_kit.errors import ConfigError
from mllm_kit.llm.decoding import DecodeCall
from mllm_kit.llm.steps import TokenDrop
from mllm_kit.registry import register_efficiency


@dataclass(frozen=True, eq=False)
class RandomDrop(TokenDrop):
    """Keeps what ``like`` keeps, by count, chosen uniformly at random."""

    like: TokenDrop | None = None

    def score(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        rows, _ = call.image_slots()
        return torch.rand(rows.shape[0]).to(hidden.device)

    def keep_counts(self, counts: Sequence[int], original: Sequence[int]) -> list[int]:
        return self.like.keep_counts(counts, original)


@register_efficiency("random")
class RandomLike(TokenEfficiency):
    """``like``: the method whose drop layers and counts to copy (a spec, as ``model.efficiency`` takes)."""

    def __init__(self, like: Mapping[str, Any] | str) -> None:
        if like is None or (isinstance(like, Mapping) and like.get("method", like.get("name")) == "random"):
            raise ConfigError("random: 'like' names the method whose drops to copy, e.g. {method: fastv, layer: 2, ratio: 0.5}.")
        self.like = like
        self._drops: tuple[RandomDrop, ...] = ()

    def check(self, model, where: str) -> None:
        inner = build_efficiency(self.like, model, f"{where}.like")
        self._drops = tuple(RandomDrop(d.layer, positions=d.positions, like=d) for d in inner.drops())
        super().check(model, where)

    def drops(self) -> Sequence[TokenDrop]:
        return self._drops
