"""The objective contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

import torch

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.model import MLLM, MLLMOutput


class Objective:
    """``__call__(outputs, batch, teacher_outputs=None) -> {"loss": ..., **parts}``; parts are logged.

    Token-level losses are *sums* divided by ``batch.loss_normalizer`` — the supervised-token count of
    the whole global batch, rescaled by the trainer for gradient accumulation and data parallelism — so
    that every supervised token in an optimiser step has the same weight.
    """

    def __call__(self, outputs: MLLMOutput, batch: Batch, teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute(self, model: MLLM, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run ``model`` on ``batch`` and score it → ``(loss parts, aux losses, metrics to log)``.

        One forward pass by default; objectives that need several passes per batch (Matryoshka) override it.
        """
        outputs = model(batch)
        return self(outputs, batch), outputs.aux_losses, outputs.metrics


def shifted_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised positions → ``(loss_sum, num_tokens)``."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def supervised_tokens(labels: torch.Tensor) -> int:
    """Supervised targets after the causal shift (what :func:`shifted_token_ce` averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
