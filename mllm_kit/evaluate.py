"""Held-out accuracy by greedy generation (with a KV cache) and exact match against gold answers."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mllm_kit.data.collate import PadCollator
from mllm_kit.model import MLLM
from mllm_kit.recipe import DataSpec, EvalSpec
from mllm_kit.training.data import build_dataset


@dataclass
class EvalResult:
    accuracy: float
    num_samples: int
    per_task: dict[str, float] = field(default_factory=dict)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (id, prediction, gold)

    def summary(self) -> str:
        tasks = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.per_task.items()))
        return f"held-out accuracy {self.accuracy:.3f} on {self.num_samples} samples" + (f" ({tasks})" if tasks else "")


def normalize(text: str) -> str:
    return re.sub(r"[\s.!,;:]+$", "", text.strip().lower())


@torch.no_grad()
def evaluate(model: MLLM, data: DataSpec, spec: EvalSpec, data_root: Path) -> EvalResult:
    dataset = build_dataset(model, dataclasses.replace(data, eval=spec.data), data_root, "eval", prompt=True)
    tasks = {r.id if r.id is not None else str(r.index): r.extra.get("task", "all") for r in dataset.records}
    loader = DataLoader(dataset, batch_size=spec.batch_size, collate_fn=_PromptCollator(model.tokenizer.pad_token_id))
    stop = dataset.encoder.stop_token_ids()
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for batch, targets in loader:
        new = model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values, max_new_tokens=spec.max_new_tokens,
                             stop_token_ids=stop, crop_pixel_values=batch.crop_pixel_values, crop_grids=batch.crop_grids,
                             instruction_ids=batch.instruction_ids, instruction_mask=batch.instruction_mask)
        for sid, text, gold in zip(batch.sample_ids, model.tokenizer.batch_decode(new, skip_special_tokens=True), targets):
            hits[tasks.get(sid, "all")].append(normalize(text) == normalize(gold or ""))
            examples.append((sid, text, gold or ""))
    model.train(was_training)
    flat = [h for v in hits.values() for h in v]
    return EvalResult(
        accuracy=sum(flat) / max(1, len(flat)),
        num_samples=len(flat),
        per_task={k: sum(v) / len(v) for k, v in hits.items()},
        examples=examples,
    )


class _PromptCollator(PadCollator):
    def __init__(self, pad_token_id: int) -> None:
        super().__init__(pad_token_id, padding_side="left")

    def __call__(self, samples):
        return super().__call__(samples), [s.target for s in samples]
