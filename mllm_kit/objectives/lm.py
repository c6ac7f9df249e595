"""Language-modelling loss on supervised tokens (LLaVA's next-token loss on assistant replies)."""

from __future__ import annotations

import torch

from mllm_kit.batch import Batch
from mllm_kit.model import MLLMOutput
from mllm_kit.objectives.base import Objective
from mllm_kit.objectives.head import head_cross_entropy
from mllm_kit.registry import register_objective


@register_objective("lm")
class LMObjective(Objective):
    """Sum of next-token cross-entropy over supervised tokens / the global supervised-token count. The LM head runs
    only at the supervised positions, in chunks (:mod:`mllm_kit.objectives.head`). With ``data.loss_weighting``
    ``sample`` or ``square`` each term carries its sample's weight and the normaliser is the weights' global sum."""

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        loss_sum, n = head_cross_entropy(outputs.hidden, batch.labels, outputs.head, batch.num_loss_tokens,
                                         weights=batch.loss_weights)
        mean = loss_sum / (n.clamp_min(1e-12) if isinstance(n, torch.Tensor) else max(n, 1))
        return {"loss": mean if normalizer is None else loss_sum / normalizer, "lm_loss": mean.detach()}
