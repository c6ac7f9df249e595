"""Matryoshka (M3) training: the LM loss averaged over visual-token scales (specs/components.md §8.1).

For every batch the model runs once per scale s — the connector pools to s tokens and each image span is
shortened to its first s positions — and L = (1/|S|) Σ_s L_LM(s). Needs the ``matryoshka`` connector; the
data pipeline expands ``<image>`` to the connector's largest trained scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mllm_kit.batch import Batch, keep_image_prefix
from mllm_kit.connectors.matryoshka import MatryoshkaConnector
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.registry import register_objective


@register_objective("matryoshka")
class MatryoshkaObjective(LMObjective):
    """``scales``: the budgets to average over; ``null`` = every scale of the connector up to its ``scale``."""

    def __init__(self, scales: Sequence[int] | None = None) -> None:
        self.scales = None if scales is None else tuple(int(s) for s in scales)

    def compute(self, model: MLLM, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        connector = model.connector
        if not isinstance(connector, MatryoshkaConnector):
            raise ConfigError(f"objective 'matryoshka' needs the 'matryoshka' connector; the model has {type(connector).__name__}.")
        full = connector.scale
        scales = self.scales or tuple(s for s in connector.scales if s <= full)
        if max(scales) > full:
            raise ConfigError(f"objective matryoshka: scale {max(scales)} exceeds the {full} tokens the data was expanded to "
                              f"(connector scale); raise model.connector.scale.")
        parts: dict[str, torch.Tensor] = {}
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        total = None
        for s in scales:
            shrunk = keep_image_prefix(batch, model.image_token_id, full, s, model.tokenizer.pad_token_id)
            with connector.at_scale(s):
                outputs = model(shrunk)
            scored = self(outputs, shrunk)
            total = scored["loss"] if total is None else total + scored["loss"]
            parts[f"lm_loss_{s}"] = scored["lm_loss"]
            for name, value in outputs.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value / len(scales)
            metrics = outputs.metrics
        parts["lm_loss"] = torch.stack([parts[f"lm_loss_{s}"] for s in scales]).mean()
        return {"loss": total / len(scales), **parts}, aux, metrics
