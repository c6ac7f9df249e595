"""Matryoshka (M3) training: the LM loss averaged over visual-token scales (specs/components.md §8.1).

For every batch the model runs once per scale s — the connector pools to s tokens and each image span is shortened
to its first s positions — and L = (1/|S|) Σ_s L_LM(s). The connector must expose ``scales`` and ``scale`` (the
``matryoshka`` connector does); the data pipeline expands ``<image>`` to the connector's ``scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mllm_kit.batch import Batch, keep_image_prefix
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM
from mllm_kit.objectives.base import Pass
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.registry import register_objective


@register_objective("matryoshka")
class MatryoshkaObjective(LMObjective):
    """``scales``: the budgets to average over; ``null`` = every scale of the connector up to its ``scale``."""

    def __init__(self, scales: Sequence[int] | None = None) -> None:
        self.scales = None if scales is None else tuple(int(s) for s in scales)

    def passes(self, batch: Batch, model: MLLM) -> list[Pass]:
        connector = model.connector
        if not hasattr(connector, "scales") or not hasattr(connector, "scale"):
            raise ConfigError(f"objective 'matryoshka' needs a connector with token scales (the 'matryoshka' connector); "
                              f"the model has {type(connector).__name__}.")
        full = connector.scale
        scales = self.scales or tuple(s for s in connector.scales if s <= full)
        if max(scales) > full:
            raise ConfigError(f"objective matryoshka: scale {max(scales)} exceeds the {full} tokens the data was expanded to "
                              f"(connector scale); raise model.connector.scale.")
        pad = model.tokenizer.pad_token_id
        return [Pass(keep_image_prefix(batch, model.image_token_id, full, s, pad), {"scale": s}, str(s)) for s in scales]

    def reduce(self, results: Sequence[dict[str, torch.Tensor]], passes: Sequence[Pass]) -> dict[str, torch.Tensor]:
        parts = {f"lm_loss_{p.name}": r["lm_loss"] for r, p in zip(results, passes)}
        return {"loss": torch.stack([r["loss"] for r in results]).mean(), "lm_loss": torch.stack(list(parts.values())).mean(), **parts}
