"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024; pkunlp-icler/FastV;
specs/components.md §8.2): after ``layer`` K decoder layers, keep of each image the ``round(N·(1−R))`` tokens that the
last prompt token attends to most at layer K−1 (mean over heads), in order; drop the rest for layers K, K+1, …

Differences from the official code, which runs batch 1 with a fixed image span: the last prompt token is each sample's
(each packed sample's); the score is computed from layer K−1's q/k projections (:mod:`.scoring`), equal to the
attention weights eager attention returns, so SDPA and flash attention keep working; the kept tokens keep their
original RoPE positions (as the official ``position_ids = keep_indexs``). ``round`` is Python's, as the official
``topk(round(N·(1−R)))`` (specs/components.md writes ⌈·⌉; the two differ only when N·(1−R) ends in .5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mllm_kit.efficiency import TokenEfficiency
from mllm_kit.efficiency.scoring import check_scorable, image_attention
from mllm_kit.errors import ConfigError
from mllm_kit.llm.decoding import DecodeCall
from mllm_kit.llm.steps import TokenDrop
from mllm_kit.registry import register_efficiency


@dataclass(frozen=True, eq=False)
class FastVDrop(TokenDrop):
    """Scored at ``layer − 1`` by each sample's last prompt token; keeps ``round(n·(1 − ratio))`` of each image."""

    ratio: float = 0.5

    def score(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        rows, cols = call.ctx.prompt_ends()
        return image_attention(call, self.scored_at, hidden, (rows, cols, torch.arange(rows.shape[0], device=rows.device)))

    def keep_counts(self, counts: Sequence[int], original: Sequence[int]) -> list[int]:
        return [round(n * (1.0 - self.ratio)) for n in counts]


@register_efficiency("fastv")
class FastV(TokenEfficiency):
    """``layer`` K (≥ 1; the paper's default 2), ``ratio`` R ∈ [0, 1) (0.5), ``positions``: ``original`` (the official
    code) or ``compact``."""

    def __init__(self, layer: int = 2, ratio: float = 0.5, positions: Literal["original", "compact"] = "original") -> None:
        if not isinstance(layer, int) or layer < 1:
            raise ConfigError(f"fastv: layer must be an integer ≥ 1 (the first layer on the kept tokens), got {layer!r}.")
        if not 0.0 <= float(ratio) < 1.0:
            raise ConfigError(f"fastv: ratio is the fraction of image tokens dropped and must be in [0, 1), got {ratio!r}.")
        if positions not in ("original", "compact"):
            raise ConfigError(f"fastv: positions must be 'original' or 'compact', got {positions!r}.")
        self.layer, self.ratio, self.positions = layer, float(ratio), positions

    def check(self, model, where: str) -> None:
        super().check(model, where)
        check_scorable(model.llm, where)

    def drops(self) -> Sequence[TokenDrop]:
        return (FastVDrop(self.layer, score_layer=self.layer - 1, positions=self.positions, ratio=self.ratio),)
