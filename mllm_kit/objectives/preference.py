"""Preference distillation with the teacher as the reference model: ``dpo`` (sigmoid) and ``kto_pair``
(LLaVA-MoD, specs/components.md §7.3; the math in :mod:`mllm_kit.objectives.divergences`).

A preference batch holds ``P`` chosen rows, then the ``P`` rejected rows (``Batch.pairs``; data: LLaVA JSON whose
conversations end with the human turn, plus ``chosen`` and ``rejected`` replies, or ``synthetic:preference``). The
sequence log-probability of a reply is the sum of its token log-probs over response positions, for the policy
(the student) and the reference (the frozen teacher, LLaVA-MoD's ``ref_model_type='dense'``). The loss is the mean
over pairs; MoE aux losses are added by the trainer as usual.
"""

from __future__ import annotations

import torch

from mllm_kit.batch import Batch
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLMOutput
from mllm_kit.objectives.distill import TeacherObjective
from mllm_kit.objectives.divergences import dpo_loss, kto_pair_loss
from mllm_kit.objectives.head import CHUNK_SIZE, chunked_sum, gather, next_token_rows
from mllm_kit.registry import register_objective


class PreferenceObjective(TeacherObjective):
    """``beta``: the KL strength (0.1, LLaVA-MoD's trainer default)."""

    preference = True
    loss_fn = staticmethod(dpo_loss)

    def __init__(self, beta: float = 0.1, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        if beta <= 0:
            raise ConfigError(f"objective {type(self).__name__}: beta must be positive, got {beta}.")
        self.beta = float(beta)

    def _sequence_logps(self, outputs: MLLMOutput, batch: Batch, reference: bool) -> torch.Tensor:
        """``[2P]``: each row's summed log-probability of its supervised (reply) tokens."""
        index, targets = next_token_rows(batch.labels, batch.num_loss_tokens)
        rows = torch.div(index, batch.labels.shape[1], rounding_mode="floor")
        head = self.teacher_logits if reference else self.logits

        def logps(h: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            token = -torch.nn.functional.cross_entropy(head(outputs, h).float(), y, reduction="none")
            return token.new_zeros(len(batch)).index_add(0, r, token)

        return chunked_sum(logps, gather(outputs.hidden, index), targets, rows, chunk_size=self.chunk_size)

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        if teacher_outputs is None or batch.pairs is None:
            raise ConfigError(f"objective {type(self).__name__}: needs a teacher (the reference) and preference pairs.")
        p = batch.pairs
        policy = self._sequence_logps(outputs, batch, reference=False)
        with torch.no_grad():
            reference = self._sequence_logps(teacher_outputs, batch.teacher_view(), reference=True)
        losses = self.loss_fn(policy[:p], policy[p:], reference[:p], reference[p:], beta=self.beta)
        chosen, rejected = (self.beta * (policy - reference).detach()).split(p)
        return {"loss": losses.mean(), "pref_loss": losses.mean().detach(), "reward_margin": (chosen - rejected).mean(),
                "reward_accuracy": (chosen > rejected).float().mean()}


@register_objective("dpo")
class DPOObjective(PreferenceObjective):
    """Sigmoid DPO: ``−log σ(β[(log π_s(y_w) − log π_t(y_w)) − (log π_s(y_l) − log π_t(y_l))])``."""


@register_objective("kto_pair")
class KTOPairObjective(PreferenceObjective):
    """KTO-pair, the loss LLaVA-MoD's released preference-distillation script uses."""

    loss_fn = staticmethod(kto_pair_loss)
