"""Stage data: datasets from a :class:`DataSpec`, a loader that yields whole optimiser steps, held-out loaders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import lightning as L
from torch.utils.data import DataLoader, Subset

from mllm_kit.batch import Batch
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import LlavaDataset, View
from mllm_kit.data.sampler import grouped_indices
from mllm_kit.data.synthetic import generate
from mllm_kit.data.templates import get_template
from mllm_kit.data.conversation import ConversationEncoder
from mllm_kit.config.recipe import DataSpec, EvalSpec
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM
from mllm_kit.training.evaluate import PromptCollator

SYNTHETIC = "synthetic:"
SYNTHETIC_SPLITS = ("align", "sft", "eval", "preference")


class StepBatch(NamedTuple):
    """A training micro-batch and the supervised-token count of its whole optimiser step on this rank."""

    batch: Batch
    step_loss_tokens: int


def check_source(spec: DataSpec, key: str, where: str = "data") -> None:
    """A data source names a synthetic split, or a file that exists with an image root that exists."""
    source = getattr(spec, key)
    if source is None:
        raise ConfigError(f"{where}.{key}: no data given; set a LLaVA JSON/JSONL path or synthetic:sft.")
    if source.startswith(SYNTHETIC):
        if source[len(SYNTHETIC) :] not in SYNTHETIC_SPLITS:
            raise ConfigError(f"{where}.{key}: {source!r} — the synthetic splits are "
                              f"{', '.join(SYNTHETIC + s for s in SYNTHETIC_SPLITS)}.")
        return
    if not Path(source).is_file():
        raise ConfigError(f"{where}.{key}: file {source!r} does not exist.")
    if spec.image_root is not None and not Path(spec.image_root).is_dir():
        raise ConfigError(f"{where}.image_root: folder {spec.image_root!r} (images of {source!r}) does not exist.")


def resolve_source(spec: DataSpec, data_root: Path, key: str, where: str = "data") -> tuple[Path, Path]:
    """(json path, image root) of ``spec.train`` or ``spec.eval``: a file, or a synthetic split (generated here)."""
    check_source(spec, key, where)
    source = getattr(spec, key)
    if source.startswith(SYNTHETIC):
        digest = hashlib.sha1(json.dumps(asdict(spec.synthetic), sort_keys=True).encode()).hexdigest()[:10]
        paths = generate(data_root / f"synthetic-{digest}", spec.synthetic)
        return getattr(paths, source[len(SYNTHETIC) :]), paths.image_root
    path = Path(source)
    return path, Path(spec.image_root) if spec.image_root else path.parent


def conversation_encoder(model: MLLM, spec: DataSpec, template: str | None = None) -> ConversationEncoder:
    return ConversationEncoder(model.tokenizer, get_template(template or spec.template), model.image_token_id, model.image_token_count(),
                               system_prompt=spec.system_prompt)


def model_view(model: MLLM, spec: DataSpec, template: str | None = None) -> View:
    """How ``model`` reads ``spec``'s samples (``template`` replaces the data's, for a teacher with its own)."""
    return View(conversation_encoder(model, spec, template), model.make_image_transform(spec.image_mode), model.reads_instruction)


def teacher_view(student: MLLM, teacher: MLLM, spec: DataSpec, template: str | None = None) -> View | None:
    """The teacher's own view of the samples, or ``None`` when it reads them exactly as the student does (then the
    teacher runs on the student's batch and the data is encoded once)."""
    mine, theirs = model_view(student, spec), model_view(teacher, spec, template)
    same = ((template or spec.template) == spec.template and not (mine.encoder.dynamic or theirs.encoder.dynamic)
            and theirs.encoder.tokens_per_image == mine.encoder.tokens_per_image
            and teacher.image_token_id == student.image_token_id and theirs.image_transform == mine.image_transform
            and theirs.instruction == mine.instruction)
    return None if same else theirs


def build_dataset(model: MLLM, spec: DataSpec, data_root: Path, split: str = "train", prompt: bool = False,
                  teacher: View | None = None, preference: bool = False) -> LlavaDataset:
    path, image_root = resolve_source(spec, data_root, split)
    view = model_view(model, spec)
    return LlavaDataset(path, image_root, view.encoder, view.image_transform, max_length=spec.max_length, truncation=spec.truncation,
                        prompt=prompt, instruction=view.instruction, teacher=teacher, preference=preference)


class StepLoader:
    """Yields :class:`StepBatch` micro-batches, ``accumulate`` per optimiser step, with the step's supervised-token count.

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

    def __iter__(self) -> Iterator[StepBatch]:
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
            tokens = sum(b.num_loss_tokens for b in window)  # preference rows included: those objectives average pairs
            for b in window:
                yield StepBatch(b, tokens)


class MLLMDataModule(L.LightningDataModule):
    """Training data of one stage and, when the stage names ``data.eval``, its held-out loaders: the eval samples
    encoded for training (loss) and as prompts (generation accuracy), the first ``eval.max_samples`` of them.
    ``teacher``: the training samples are also encoded in this teacher view; ``preference``: they are pairs."""

    def __init__(self, model: MLLM, spec: DataSpec, data_root: Path, micro_batch_size: int, accumulate: int, seed: int,
                 eval_spec: EvalSpec | None = None, train: bool = True, teacher: View | None = None, preference: bool = False) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.data_root = data_root
        self.micro_batch_size = micro_batch_size
        self.accumulate = accumulate
        self.seed = seed
        self.eval_spec = eval_spec or EvalSpec()
        self.dataset = build_dataset(model, spec, data_root, "train", teacher=teacher, preference=preference) if train else None
        self.eval_loss_set = self.eval_prompts = None
        if spec.eval is not None:
            self.eval_loss_set = build_dataset(model, spec, data_root, "eval")
            self.eval_prompts = build_dataset(model, spec, data_root, "eval", prompt=True)

    @property
    def tasks(self) -> dict[str, str]:
        """Sample id → task name of the eval set (``all`` where the data names none)."""
        if self.eval_prompts is None:
            return {}
        return {r.id if r.id is not None else str(r.index): str(r.extra.get("task", "all")) for r in self.eval_prompts.records}

    def train_dataloader(self) -> StepLoader:
        trainer = self.trainer
        return StepLoader(
            self.dataset, PadCollator(self.model.tokenizer.pad_token_id), self.micro_batch_size, self.accumulate,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1, seed=self.seed,
            group_by_modality=self.spec.group_by_modality, group_size=self.spec.length_group_size, num_workers=self.spec.num_workers,
            steps_done=(lambda: trainer.global_step) if trainer else (lambda: 0),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """[held-out loss batches, generation prompts], the first ``eval.max_samples`` samples of each."""
        if self.eval_prompts is None:
            return []
        limit, size, pad = self.eval_spec.max_samples, self.eval_spec.batch_size, self.model.tokenizer.pad_token_id
        return [DataLoader(_first(self.eval_loss_set, limit), batch_size=size, collate_fn=PadCollator(pad)),
                DataLoader(_first(self.eval_prompts, limit), batch_size=size, collate_fn=PromptCollator(pad, self.tasks))]

    def steps_per_epoch(self, world_size: int) -> int:
        return len(self.dataset) // (self.micro_batch_size * world_size) // self.accumulate


def _first(dataset: LlavaDataset, limit: int | None) -> LlavaDataset | Subset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))
