"""Language-modelling loss on supervised tokens (LLaVA's next-token loss on assistant replies)."""

from __future__ import annotations

import torch

from mllm_kit.batch import Batch
from mllm_kit.model import MLLMOutput
from mllm_kit.objectives.base import Objective, shifted_token_ce
from mllm_kit.registry import register_objective


@register_objective("lm")
class LMObjective(Objective):
    """Sum of next-token cross-entropy over supervised tokens / the global supervised-token count."""

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        loss_sum, n = shifted_token_ce(outputs.logits, batch.labels)
        mean = loss_sum / n.clamp(min=1)
        return {"loss": mean if normalizer is None else loss_sum / normalizer, "lm_loss": mean.detach()}
