"""Stage data: datasets from a :class:`DataSpec`, and a loader that yields whole optimiser steps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from mllm_kit.batch import Batch
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import LlavaDataset
from mllm_kit.data.sampler import grouped_indices
from mllm_kit.data.synthetic import generate
from mllm_kit.data.templates import get_template
from mllm_kit.data.tokenize import ConversationEncoder
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM
from mllm_kit.recipe import DataSpec

SYNTHETIC = "synthetic:"


def resolve_source(spec: DataSpec, source: str | None, data_root: Path, key: str) -> tuple[Path, Path]:
    """(json path, image root) for a data source: a file path or ``synthetic:align|sft|eval``."""
    if source is None:
        raise ConfigError(f"data.{key}: no data given; set a LLaVA JSON/JSONL path or synthetic:sft.")
    if source.startswith(SYNTHETIC):
        split = source[len(SYNTHETIC) :]
        if split not in ("align", "sft", "eval"):
            raise ConfigError(f"data.{key}: {source!r} — the synthetic splits are synthetic:align, synthetic:sft, synthetic:eval.")
        digest = hashlib.sha1(json.dumps(asdict(spec.synthetic), sort_keys=True).encode()).hexdigest()[:10]
        paths = generate(data_root / f"synthetic-{digest}", spec.synthetic)
        return getattr(paths, split), paths.image_root
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data.{key}: file {source!r} does not exist.")
    return path, Path(spec.image_root) if spec.image_root else path.parent


def conversation_encoder(model: MLLM, spec: DataSpec) -> ConversationEncoder:
    return ConversationEncoder(model.tokenizer, get_template(spec.template), model.image_token_id, model.tokens_per_image(),
                               system_prompt=spec.system_prompt)


def build_dataset(model: MLLM, spec: DataSpec, data_root: Path, split: str = "train", prompt: bool = False) -> LlavaDataset:
    path, image_root = resolve_source(spec, getattr(spec, split), data_root, split)
    transform = model.make_image_transform(spec.image_mode)
    return LlavaDataset(path, image_root, conversation_encoder(model, spec), transform, max_length=spec.max_length,
                        truncation=spec.truncation, prompt=prompt, instruction=model.reads_instruction)


class StepLoader:
    """Yields micro-batches, ``accumulate`` per optimiser step, each tagged with the step's supervised-token count.

    The order is a deterministic function of (seed, epoch); where an epoch resumes is derived from the
    trainer's optimiser-step count, so a resumed run sees exactly the batches an uninterrupted one would.
    Each rank takes its slice of every length-grouped mega-batch; epochs hold whole optimiser steps only.
    """

    def __init__(self, dataset: LlavaDataset, collate: PadCollator, micro_batch_size: int, accumulate: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, group_by_modality: bool = True, group_size: int = 1,
                 num_workers: int = 0, steps_done: Callable[[], int] = lambda: 0) -> None:
        self.dataset = dataset
        self.collate = collate
        self.micro = micro_batch_size
        self.accumulate = accumulate
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.group_size = group_size
        self.num_workers = num_workers
        self.steps_done = steps_done
        self.lengths = dataset.modality_lengths()
        self.steps_per_epoch = len(self.lengths) // (self.micro * self.world) // self.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{dataset.path}: {len(self.lengths)} samples are fewer than one global batch "
                f"({self.micro} × {self.world} ranks × {self.accumulate} accumulation)."
            )

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulate

    def micro_batches(self, epoch: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = grouped_indices(self.lengths, self.micro, self.world, g, self.group_by_modality, self.group_size)
        mega = self.micro * self.world
        batches = [order[i + self.rank * self.micro : i + (self.rank + 1) * self.micro] for i in range(0, len(order) - mega + 1, mega)]
        return batches[: len(self)]

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = divmod(self.steps_done(), self.steps_per_epoch)
        batches = self.micro_batches(epoch)[step * self.accumulate :]
        loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                            persistent_workers=False)
        it = iter(loader)
        while True:
            window = []
            for _ in range(self.accumulate):
                try:
                    window.append(next(it))
                except StopIteration:
                    return
            tokens = sum(b.num_loss_tokens for b in window)
            for b in window:
                b.window_loss_tokens = tokens
                yield b


class MLLMDataModule(L.LightningDataModule):
    """Training data of one stage."""

    def __init__(self, model: MLLM, spec: DataSpec, data_root: Path, micro_batch_size: int, accumulate: int, seed: int) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.data_root = data_root
        self.micro_batch_size = micro_batch_size
        self.accumulate = accumulate
        self.seed = seed
        self.dataset = build_dataset(model, spec, data_root, "train")

    def train_dataloader(self) -> StepLoader:
        trainer = self.trainer
        return StepLoader(
            self.dataset, PadCollator(self.model.tokenizer.pad_token_id), self.micro_batch_size, self.accumulate,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1, seed=self.seed,
            group_by_modality=self.spec.group_by_modality, group_size=self.spec.length_group_size, num_workers=self.spec.num_workers,
            steps_done=(lambda: trainer.global_step) if trainer else (lambda: 0),
        )

    def steps_per_epoch(self, world_size: int) -> int:
        return len(self.dataset) // (self.micro_batch_size * world_size) // self.accumulate
