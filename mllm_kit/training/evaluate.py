"""Held-out evaluation: token-mean loss and exact-match accuracy of greedy generation (KV cache), in Lightning.

The same :class:`~mllm_kit.training.module.MLLMModule` validation step serves validation during training
(``trainer.val_every_n_steps``) and ``mllm-kit eval`` / the evaluation after ``mllm-kit fit``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torchmetrics import Metric

from mllm_kit.batch import Batch
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.model import MLLM


def normalize(text: str) -> str:
    return re.sub(r"[\s.!,;:]+$", "", text.strip().lower())


class PromptBatch(NamedTuple):
    """Left-padded prompts with their gold answers and task names (what generation accuracy reads)."""

    batch: Batch
    targets: list[str]
    tasks: list[str]


class PromptCollator(PadCollator):
    """Left-pads prompts (generation needs it) and keeps each sample's gold answer and task."""

    def __init__(self, pad_token_id: int, tasks: dict[str, str]) -> None:
        super().__init__(pad_token_id, padding_side="left")
        self.tasks = tasks

    def __call__(self, samples: Sequence[Sample]) -> PromptBatch:  # type: ignore[override]
        batch = super().__call__(samples)
        return PromptBatch(batch, [s.target or "" for s in samples], [self.tasks.get(s.id, "all") for s in samples])


class GenerationAccuracy(Metric):
    """Exact match (after :func:`normalize`) per task and overall; states are summed across ranks."""

    full_state_update = False

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(dict.fromkeys(tasks))
        self.add_state("correct", default=torch.zeros(len(self.tasks)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.tasks)), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], targets: Sequence[str], tasks: Sequence[str]) -> None:
        index = {t: i for i, t in enumerate(self.tasks)}
        hits = torch.zeros_like(self.correct)
        counts = torch.zeros_like(self.total)
        for prediction, target, task in zip(predictions, targets, tasks):
            i = index[task]
            counts[i] += 1
            hits[i] += float(normalize(prediction) == normalize(target))
        self.correct += hits
        self.total += counts

    def compute(self) -> dict[str, torch.Tensor]:
        seen = self.total > 0
        out = {"accuracy": self.correct.sum() / self.total.sum().clamp(min=1)}
        if len(self.tasks) > 1 or self.tasks != ["all"]:
            out.update({f"acc_{t}": self.correct[i] / self.total[i] for i, t in enumerate(self.tasks) if seen[i]})
        out["num_samples"] = self.total.sum()
        return out


@torch.no_grad()
def generate_answers(model: MLLM, batch: Batch, max_new_tokens: int, stop_token_ids: list[int] | None) -> list[str]:
    """Greedy answers to left-padded prompts, decoded without special tokens."""
    new = model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values, max_new_tokens=max_new_tokens,
                         stop_token_ids=stop_token_ids, crop_pixel_values=batch.crop_pixel_values, crop_grids=batch.crop_grids,
                         instruction_ids=batch.instruction_ids, instruction_mask=batch.instruction_mask,
                         image_sizes=batch.image_sizes or None, images_per_sample=batch.images_per_sample or None)
    return model.tokenizer.batch_decode(new, skip_special_tokens=True)


@dataclass
class EvalResult:
    accuracy: float
    num_samples: int
    per_task: dict[str, float] = field(default_factory=dict)
    loss: float | None = None

    @classmethod
    def from_metrics(cls, metrics: dict[str, float]) -> EvalResult:
        per_task = {k.removeprefix("val/acc_"): v for k, v in metrics.items() if k.startswith("val/acc_")}
        return cls(metrics.get("val/accuracy", 0.0), int(metrics.get("val/num_samples", 0)), per_task, metrics.get("val/loss"))

    def summary(self) -> str:
        tasks = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.per_task.items()))
        loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
        return f"held-out accuracy {self.accuracy:.3f} on {self.num_samples} samples" + (f" ({tasks})" if tasks else "") + loss
