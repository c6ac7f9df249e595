"""Stage data: datasets from a :class:`DataSpec`, a loader that yields whole optimiser steps, held-out loaders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mllm_kit.batch import Batch
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import LlavaDataset, Sample, View
from mllm_kit.data.packing import PackCollator, first_fit_decreasing
from mllm_kit.data.sampler import grouped_indices
from mllm_kit.data.shards import check_urls, expand_urls, local_shards, read_shards
from mllm_kit.data.sources import SourceMixture
from mllm_kit.data.synthetic import generate
from mllm_kit.data.templates import get_template
from mllm_kit.data.conversation import ConversationEncoder
from mllm_kit.config.recipe import DataSpec, EvalSpec, ShardSource
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.training.evaluate import PromptCollator

log = get_logger(__name__)

SYNTHETIC = "synthetic:"
SYNTHETIC_SPLITS = ("align", "sft", "eval", "preference")


class StepBatch(NamedTuple):
    """A training micro-batch and the supervised-token count of its whole optimiser step on this rank."""

    batch: Batch
    step_loss_tokens: float  # Σ target weights (:attr:`Batch.loss_total`): the token count under token weighting


def check_source(spec: DataSpec, key: str, where: str = "data") -> None:
    """A data source names a synthetic split, shards that exist, or a file that exists with an image root that exists;
    ``train`` may instead be a weighted mixture of such sources (``data.sources``)."""
    if key == "train" and spec.sources is not None:  # shares and exclusivity are checked at recipe load
        for k, source in enumerate(spec.sources):
            _check_one(source.train, source.image_root, f"{where}.sources[{k}]", "train", spec.allow_pipe)
        return
    _check_one(getattr(spec, key), spec.image_root, where, key, spec.allow_pipe)


def _check_one(source: str | ShardSource | None, image_root: str | None, where: str, key: str, allow_pipe: bool) -> None:
    if source is None or source == "":
        raise ConfigError(f"{where}.{key}: no data given; set a LLaVA JSON/JSONL path or synthetic:sft.")
    if isinstance(source, ShardSource):
        try:
            check_urls(source.urls, f"{where}.{key}.urls", allow_pipe)
        except DataError as err:
            raise ConfigError(str(err)) from None
        return
    if source.startswith(SYNTHETIC):
        if source[len(SYNTHETIC) :] not in SYNTHETIC_SPLITS:
            raise ConfigError(f"{where}.{key}: {source!r} — the synthetic splits are "
                              f"{', '.join(SYNTHETIC + s for s in SYNTHETIC_SPLITS)}.")
        return
    if not Path(source).is_file():
        raise ConfigError(f"{where}.{key}: file {source!r} does not exist.")
    if image_root is not None and not Path(image_root).is_dir():
        raise ConfigError(f"{where}.image_root: folder {image_root!r} (images of {source!r}) does not exist.")


def resolve_path(spec: DataSpec, source: str, image_root: str | None, data_root: Path) -> tuple[Path, Path]:
    """``(file, image root)`` of a data source: ``synthetic:<split>`` is generated (once, cached by its config) under
    ``data_root``; a path's images resolve under ``image_root``, else its folder."""
    if source.startswith(SYNTHETIC):
        digest = hashlib.sha1(json.dumps(spec.synthetic.key(), sort_keys=True).encode()).hexdigest()[:10]
        paths = generate(data_root / f"synthetic-{digest}", spec.synthetic)
        return getattr(paths, source[len(SYNTHETIC) :]), paths.image_root
    path = Path(source)
    return path, Path(image_root) if image_root else path.parent


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
                  teacher: View | None = None, preference: bool = False) -> LlavaDataset | SourceMixture:
    view = model_view(model, spec)
    options = dict(max_length=spec.max_length, truncation=spec.truncation, prompt=prompt, instruction=view.instruction,
                   teacher=teacher, preference=preference, max_bad_fraction=spec.max_bad_fraction)
    check_source(spec, split)

    def one(source: str | ShardSource, image_root: str | None, where: str) -> LlavaDataset:
        if isinstance(source, ShardSource):
            names = expand_urls(source.urls)  # checked above
            records, images = read_shards(local_shards(names, data_root / "shards", f"{where}.urls"))
            return LlavaDataset(source.urls, None, view.encoder, view.image_transform, records=records, images=images, **options)
        path, root = resolve_path(spec, source, image_root, data_root)
        return LlavaDataset(path, root, view.encoder, view.image_transform, **options)

    if split == "train" and spec.sources is not None:
        mixture = SourceMixture([one(s.train, s.image_root, f"data.sources[{k}].train") for k, s in enumerate(spec.sources)],
                                [s.weight for s in spec.sources])
        log.info("data.sources: %s", mixture.describe())
        return mixture
    return one(getattr(spec, split), spec.image_root, f"data.{split}")


@dataclass(frozen=True)
class Packing:
    """Row budgets of a packed loader (``data.packing``): tokens (``data.max_length``), images, and the FFD buffer."""

    max_tokens: int
    max_images: int | None = None
    buffer: int = 4096


class StepLoader:
    """Yields :class:`StepBatch` micro-batches, ``accumulate`` per optimiser step, with the step's supervised-token count.

    The order is a deterministic function of (seed, epoch); where an epoch resumes is derived from the
    trainer's optimiser-step count, so a resumed run sees exactly the batches an uninterrupted one would.
    Each rank takes its slice of every length-grouped mega-batch; epochs hold whole optimiser steps only.
    With ``packing`` a micro-batch is ``micro_batch_size`` packed rows: each epoch's shuffled samples are packed by
    first-fit-decreasing, the rows shuffled, and each rank takes its slice of every ``micro × world`` rows.
    """

    def __init__(self, dataset: LlavaDataset, collate: PadCollator | PackCollator, micro_batch_size: int, accumulate: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, group_by_modality: bool = True, group_size: int = 1,
                 num_workers: int = 0, steps_done: Callable[[], int] = lambda: 0, packing: Packing | None = None) -> None:
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
        self.packing = packing
        self._epoch_batches: dict[int, list] = {}
        if packing is not None:
            self.sizes = dataset.packed_sizes()
            self._check_budgets(packing)
            units, what = len(self.micro_batches(0)) * self.micro * self.world, "packed rows"
        else:
            self.lengths = dataset.modality_lengths()
            units, what = len(self.lengths), "samples"
        self.steps_per_epoch = units // (self.micro * self.world) // self.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{dataset.path}: {units} {what} are fewer than one global batch "
                f"({self.micro} × {self.world} ranks × {self.accumulate} accumulation)."
            )

    def _check_budgets(self, packing: Packing) -> None:
        for record, size in zip(self.dataset.records, self.sizes):
            if size is not None and packing.max_images is not None and size[1] > packing.max_images:
                raise ConfigError(f"{record.ref}: {size[1]} images, more than a packed row holds (data.packing_max_images="
                                  f"{packing.max_images}); raise data.packing_max_images to at least {size[1]}.")
        if all(size is None for size in self.sizes):
            raise ConfigError(f"{self.dataset.path}: truncation drops every sample (data.max_length={self.dataset.max_length}); "
                              f"nothing to pack.")

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulate

    def micro_batches(self, epoch: int) -> list:
        """This rank's micro-batches of ``epoch``: lists of sample indices, or with packing lists of rows (tuples)."""
        if epoch in self._epoch_batches:
            return self._epoch_batches[epoch]
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        mega = self.micro * self.world
        # A weighted mixture draws the epoch's samples first (indices may repeat); a plain dataset is read once each.
        pool = self.dataset.epoch_pool(g) if isinstance(self.dataset, SourceMixture) else None
        if self.packing is not None:
            p = self.packing
            shuffled = torch.randperm(len(self.sizes) if pool is None else len(pool), generator=g).tolist()
            candidates = shuffled if pool is None else [pool[k] for k in shuffled]
            rows = first_fit_decreasing(self.sizes, candidates, p.max_tokens, p.max_images, p.buffer)
            order = [tuple(rows[k]) for k in torch.randperm(len(rows), generator=g).tolist()]
        else:
            lengths = self.lengths if pool is None else [self.lengths[i] for i in pool]
            order = grouped_indices(lengths, self.micro, self.world, g, self.group_by_modality, self.group_size)
            order = order if pool is None else [pool[k] for k in order]
        batches = [order[i + self.rank * self.micro : i + (self.rank + 1) * self.micro] for i in range(0, len(order) - mega + 1, mega)]
        keep = len(batches) // self.accumulate * self.accumulate if self.packing is not None else len(self)
        self._epoch_batches = {epoch: batches[:keep]}  # one epoch at a time: the resumed epoch, then the next
        return self._epoch_batches[epoch]

    def _position(self, done: int) -> tuple[int, int]:
        """(epoch, step within it) after ``done`` optimiser steps; packed epochs may differ in length."""
        if self.packing is None:
            return divmod(done, self.steps_per_epoch)
        epoch = 0
        while done >= (steps := len(self.micro_batches(epoch)) // self.accumulate):
            done, epoch = done - steps, epoch + 1
        return epoch, done

    def __iter__(self) -> Iterator[StepBatch]:
        epoch, step = self._position(self.steps_done())
        batches = self.micro_batches(epoch)[step * self.accumulate :]
        dataset = _Rows(self.dataset) if self.packing is not None else self.dataset
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        it = iter(loader)
        while True:
            window = []
            for _ in range(self.accumulate):
                try:
                    window.append(next(it))
                except StopIteration:
                    return
            tokens = sum(b.loss_total for b in window)  # preference rows included: those objectives average pairs
            for b in window:
                yield StepBatch(b, tokens)


class _Rows(Dataset):
    """A packed loader's dataset: a row's tuple of indices → its samples."""

    def __init__(self, dataset: LlavaDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: tuple[int, ...]) -> list[Sample]:
        samples = [self.dataset.get(i) for i in row]
        return [s for s in samples if isinstance(s, Sample)]  # a sample with an unreadable image leaves the row (logged)


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
        if trainer is None:
            return self._loader()
        return self._loader(trainer.global_rank, trainer.world_size, lambda: trainer.global_step)

    def _loader(self, rank: int = 0, world_size: int = 1, steps_done: Callable[[], int] = lambda: 0) -> StepLoader:
        spec, pad = self.spec, self.model.tokenizer.pad_token_id
        packing = Packing(spec.max_length, spec.packing_max_images, spec.packing_buffer) if spec.packing else None
        collate = (PackCollator(pad, spec.max_length, loss_weighting=spec.loss_weighting) if packing
                   else PadCollator(pad, loss_weighting=spec.loss_weighting))
        return StepLoader(self.dataset, collate, self.micro_batch_size, self.accumulate, rank=rank, world_size=world_size,
                          seed=self.seed, group_by_modality=spec.group_by_modality, group_size=spec.length_group_size,
                          num_workers=spec.num_workers, steps_done=steps_done, packing=packing)

    def val_dataloader(self) -> list[DataLoader]:
        """[held-out loss batches, generation prompts], the first ``eval.max_samples`` samples of each."""
        if self.eval_prompts is None:
            return []
        limit, size, pad = self.eval_spec.max_samples, self.eval_spec.batch_size, self.model.tokenizer.pad_token_id
        return [DataLoader(_first(self.eval_loss_set, limit), batch_size=size, collate_fn=PadCollator(pad)),
                DataLoader(_first(self.eval_prompts, limit), batch_size=size, collate_fn=PromptCollator(pad, self.tasks))]

    def steps_per_epoch(self, world_size: int) -> int:
        """Optimiser steps in one epoch (packed: in epoch 0, whose packing the other epochs' lengths follow closely)."""
        if self.spec.packing:
            return self._loader(world_size=world_size).steps_per_epoch
        return len(self.dataset) // (self.micro_batch_size * world_size) // self.accumulate


def _first(dataset: LlavaDataset, limit: int | None) -> LlavaDataset | Subset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))
