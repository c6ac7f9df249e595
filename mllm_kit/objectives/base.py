"""The objective contract (DESIGN.md, "Core interfaces"): losses from outputs; the trainer runs the model.

Per batch the trainer asks the objective for its forward :meth:`~Objective.passes` (one by default), runs the model
(and, for distillation, a teacher) once per pass, calls the objective on each pass's outputs, and combines the
results with :meth:`~Objective.reduce`. Objectives never call the model. Before a stage trains (and in the
pre-flight check) :meth:`~Objective.bind` sees the student and the teacher once: an objective checks there what it
needs of them and creates any trainable module of its own (:meth:`~Objective.trainable_modules`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM, MLLMOutput


@dataclass(frozen=True)
class Pass:
    """One forward pass: the batch it reads and the connector's per-call options (e.g. ``{"scale": 16}``)."""

    batch: Batch
    connector: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""


class Objective:
    """``__call__(outputs, batch, normalizer, teacher_outputs=None) -> {"loss": ..., **parts}``; parts are logged.

    Token-level losses are *sums* divided by ``normalizer``: the supervised-token count of the whole global batch,
    rescaled by the trainer for gradient accumulation and data parallelism, so that every supervised token of an
    optimiser step has the same weight. Outside training (``normalizer=None``) divide by the batch's own count.

    ``needs_teacher``: the trainer runs a teacher (``stage.teacher``) on each pass's :meth:`Batch.teacher_view` and
    passes its outputs. ``preference``: the data are chosen/rejected pairs (``Batch.pairs``).
    """

    needs_teacher: bool = False
    preference: bool = False

    def bind(self, student: MLLM, teacher: MLLM | None, where: str = "objective", separate_view: bool = False) -> None:
        """Check the models against what the objective reads (``where`` prefixes errors); ``separate_view``: the
        teacher reads its own view of the samples (another template or image-token count)."""
        if self.needs_teacher and teacher is None:
            raise ConfigError(f"{where}: objective {type(self).__name__} distils from a teacher; set the stage's teacher "
                              f"(run + stage, stage, hf_llava, or model + weights).")

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the objective trains beside the model (e.g. a hidden-state adapter): optimised and checkpointed
        with the stage, not saved in ``final/``."""
        return {}

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def passes(self, batch: Batch, model: MLLM) -> list[Pass]:
        """The forward passes this objective scores for ``batch``; one plain pass by default."""
        return [Pass(batch)]

    def reduce(self, results: Sequence[dict[str, torch.Tensor]], passes: Sequence[Pass]) -> dict[str, torch.Tensor]:
        """Combine the per-pass results (a single pass is returned as it is)."""
        if len(results) != 1:
            raise NotImplementedError(f"{type(self).__name__} runs {len(results)} passes but does not combine them; override reduce().")
        return results[0]


def shifted_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised positions → ``(loss_sum, num_tokens)``."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()
