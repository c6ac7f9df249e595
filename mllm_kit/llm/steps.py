"""Layer steps: what a connector, a stage transform or a token-efficiency method does inside the LLM for one call.

A step is a small immutable object made per call from that call's data (DESIGN.md, "Data flow"):

* :class:`Injection` — before layer ℓ, add ``[n_pos, D]`` at the image positions (DeepStack, specs/components.md §3.1);
* :class:`Rewrite` — after layer ℓ, replace the hidden states at the image positions by ``fn(h)`` (Cambrian's SVA, §5.4);
* :class:`Bind` — pass keyword arguments to chosen sub-modules for the call (the LoRA-MoE instance gate's gates, §6.2;
  the aux-loss report of MoE layers);
* :class:`TokenDrop` — from layer ℓ on, run the decoder on a subset of the image tokens (FastV §8.2, PDrop §8.6).

:class:`~mllm_kit.llm.decoding.DecodeCall` installs the steps of a call as hooks on the transformers modules for that
call only and removes them before it returns; nothing is left registered between calls and no module keeps per-call
state. A new method is one file: subclass one of these (usually :class:`TokenDrop`) and return it from a registered
efficiency method (:mod:`mllm_kit.efficiency`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from mllm_kit.llm.decoding import DecodeCall


@dataclass(frozen=True, eq=False)
class LayerStep:
    """Base of every step. ``layer``: the decoder layer it acts at (``-1``: none, e.g. a :class:`Bind`).
    ``every_pass``: also act in the decode passes of ``generate`` (default: only in the forward that sees the prompt —
    a training forward or the prefill; decode passes run on the KV cache the prefill wrote).
    ``aux_losses`` / ``metrics``: what the step's maker computed for the call (summed into the loss parts / logged)."""

    layer: int
    every_pass: ClassVar[bool] = False
    aux_losses: Mapping[str, torch.Tensor] = field(default_factory=dict, kw_only=True)
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True, eq=False)
class Injection(LayerStep):
    """Before layer ``layer``: ``h[image positions] += values`` (``[n_pos, D]``, the positions in row-major order)."""

    values: torch.Tensor

    def before(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        rows, cols = call.image_slots()
        return hidden.index_put((rows, cols), self.values.reshape(-1, hidden.shape[-1]).to(hidden.dtype), accumulate=True)


@dataclass(frozen=True, eq=False)
class Rewrite(LayerStep):
    """After layer ``layer``: ``h[image positions] = fn(h[image positions])`` (``[n_pos, D] → [n_pos, D]``)."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def after(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        rows, cols = call.image_slots()
        return hidden.index_put((rows, cols), self.fn(hidden[rows, cols]).to(hidden.dtype))


@dataclass(frozen=True, eq=False)
class Bind(LayerStep):
    """Keyword arguments for ``modules``' forwards during the call (every pass): per-call data reaches a module inside
    a decoder layer as an argument, never as state left on it. ``layer`` is ``-1``."""

    layer: int = -1
    modules: Sequence[nn.Module] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    every_pass: ClassVar[bool] = True


@dataclass(frozen=True, eq=False)
class TokenDrop(LayerStep):
    """From layer ``layer`` (K ≥ 1) on, the decoder runs on a subset of the image tokens: layers K, K+1, … see the
    kept ones (each at its original RoPE position, or with ``positions: compact`` at its rank among the kept tokens of
    its sample), their keys only in the KV cache. Before the final norm ``[B, T, D]`` is restored, every dropped
    position carrying its hidden state from when it was dropped; no loss reads image positions.

    Subclasses implement :meth:`score` (run before layer ``score_layer``, without gradients) and :meth:`keep_counts`;
    :meth:`keep` picks the top scores per image by default.
    """

    score_layer: int = -1  # default: ``layer`` (score with the layer about to run on the kept tokens)
    positions: Literal["original", "compact"] = "original"

    @property
    def scored_at(self) -> int:
        return self.layer if self.score_layer < 0 else self.score_layer

    def score(self, hidden: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        """``[M]``: one score per live image slot (:meth:`DecodeCall.image_slots` order); higher is kept first."""
        raise NotImplementedError

    def keep_counts(self, counts: Sequence[int], original: Sequence[int]) -> list[int]:
        """Image tokens to keep of each image, from its live count and its count before any drop (host integers,
        known before the call: FLOP accounting reads them too)."""
        raise NotImplementedError

    def keep(self, scores: torch.Tensor, call: DecodeCall) -> torch.Tensor:
        """``[M]`` bool over the live image slots: each image's top ``keep_counts`` scores."""
        counts = call.image_counts()
        return top_per_image(scores, counts, self.keep_counts(counts, call.ctx.tokens_per_image))


def dropped_by(owners: Sequence[int], counts: Sequence[int], kept: Sequence[int], n: int) -> list[int]:
    """Image tokens dropped per owner (row or sample, ``n`` of them), images owned by ``owners`` (host integers)."""
    out = [0] * n
    for owner, before, after in zip(owners, counts, kept):
        out[owner] += before - after
    return out


def top_per_image(scores: torch.Tensor, counts: Sequence[int], keep: Sequence[int]) -> torch.Tensor:
    """``[M]`` bool: for each image (its ``counts[i]`` consecutive entries of ``scores [M]``) the ``keep[i]`` highest
    scores (ties: the earlier position). Vectorised over images; counts are host integers."""
    n_img = len(counts)
    if n_img == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    width, k = max(counts), max(keep)
    if len(set(counts)) == 1:
        grid = scores.view(n_img, width)
    else:
        grid = scores.new_full((n_img, width), float("-inf"))
        slots = torch.arange(width, device=scores.device)[None] < torch.tensor(counts, device=scores.device)[:, None]
        grid = grid.masked_scatter(slots, scores)
    # stable descending order: equal scores keep the earlier token first
    order = torch.argsort(grid, dim=1, descending=True, stable=True)[:, :k]
    chosen = torch.zeros_like(grid, dtype=torch.bool)
    rank_ok = torch.arange(k, device=scores.device)[None] < torch.tensor(keep, device=scores.device)[:, None]
    chosen = chosen.scatter(1, order, rank_ok)
    if len(set(counts)) == 1:
        return chosen.reshape(-1)
    return chosen[torch.arange(width, device=scores.device)[None] < torch.tensor(counts, device=scores.device)[:, None]]
