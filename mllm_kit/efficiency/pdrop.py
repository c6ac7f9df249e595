"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", 2024; Cooperx521/PyramidDrop ``llava/model/modeling_llama_pdrop.py``; specs/components.md §8.6).

The decoder is split into stages at ``layers`` (LLaVA-1.5-7B: 8, 16, 24 of 32; by default scaled to the LLM's depth).
Before stage boundary j the image tokens are ranked by the attention the last instruction token gives them — computed
with boundary layer's own input norm and q/k projections on its input (:mod:`.scoring`) — and the top
``int(N·ratios[j])`` of each image's N original tokens stay (official: ``image_token_ratio_list`` 0.5, 0.25, 0.125, i.e.
λ = 0.5 per stage). In training the queries are every token that precedes an answer (the official
``index_before_answer``), averaged; at inference the last prompt token. As in the official code, the kept tokens are
renumbered (``positions: compact``: each token's rank among its sample's kept tokens); ``original`` keeps their RoPE
positions instead. Usable in training (a stage's ``efficiency``) and at inference.
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

REFERENCE_LAYERS = (8, 16, 24)  # of LLaVA-1.5-7B's 32
REFERENCE_DEPTH = 32


@dataclass(frozen=True, eq=False)
class PDropStage(TokenDrop):
    """One boundary: keep ``int(N·fraction)`` of each image's N original tokens (``fraction``: the cumulative ratio)."""

    fraction: float = 0.5

    def score(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        return image_attention(call, self.scored_at, hidden, call.ctx.answer_queries())

    def keep_counts(self, counts: Sequence[int], original: Sequence[int]) -> list[int]:
        return [min(int(n * self.fraction), live) for n, live in zip(original, counts)]


@register_efficiency("pdrop")
class PDrop(TokenEfficiency):
    """``layers``: stage boundaries (``null``: 8, 16, 24 scaled to the LLM's depth); ``ratio`` λ: each stage keeps λ of
    the previous one's tokens, or ``ratios``: the cumulative fraction kept after each boundary (official format);
    ``positions``: ``compact`` (official) or ``original``."""

    def __init__(self, layers: Sequence[int] | None = None, ratio: float = 0.5, ratios: Sequence[float] | None = None,
                 positions: Literal["original", "compact"] = "compact") -> None:
        if positions not in ("original", "compact"):
            raise ConfigError(f"pdrop: positions must be 'original' or 'compact', got {positions!r}.")
        if ratios is None and not 0.0 <= float(ratio) < 1.0:
            raise ConfigError(f"pdrop: ratio λ (the fraction each stage keeps) must be in [0, 1), got {ratio!r}.")
        if ratios is not None and (any(not 0.0 <= float(r) <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True)):
            raise ConfigError(f"pdrop: ratios are the cumulative fractions kept after each boundary, non-increasing in "
                              f"[0, 1] (official: [0.5, 0.25, 0.125]); got {list(ratios)}.")
        self.layers = None if layers is None else sorted({int(v) for v in layers})
        self.ratio, self.ratios, self.positions = float(ratio), None if ratios is None else [float(r) for r in ratios], positions
        self._stages: tuple[PDropStage, ...] = ()

    def check(self, model, where: str) -> None:
        depth = len(model.llm.decoder_layers)
        layers = self.layers
        if layers is None:  # the paper's 8/16/24 of 32, scaled to this depth
            layers = sorted({max(1, round(v * depth / REFERENCE_DEPTH)) for v in REFERENCE_LAYERS} - {depth})
            if not layers:
                raise ConfigError(f"{where}: the LLM has {depth} decoder layer(s), too few for PDrop's stages; set layers.")
        ratios = self.ratios if self.ratios is not None else [self.ratio ** (j + 1) for j in range(len(layers))]
        if len(ratios) != len(layers):
            raise ConfigError(f"{where}: {len(layers)} stage boundaries {layers} but {len(ratios)} ratios {ratios}; give one "
                              f"cumulative ratio per boundary.")
        self._stages = tuple(PDropStage(layer, positions=self.positions, fraction=r) for layer, r in zip(layers, ratios))
        super().check(model, where)
        check_scorable(model.llm, where)

    def drops(self) -> Sequence[TokenDrop]:
        return self._stages
