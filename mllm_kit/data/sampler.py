"""Length- and modality-grouped sampling (LLaVA's ``group_by_modality_length``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from mllm_kit.errors import ConfigError


def grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator,
                    group_by_modality: bool = True, group_size: int = 1) -> list[int]:
    """A shuffled order in which every full run of ``batch_size × world_size`` indices has one modality and
    similar lengths, so each rank's micro-batch pads little. The leftovers of each modality (fewer than one
    run each) come last, together.

    Samples are sorted by length within windows of ``group_size`` runs, and the runs are then shuffled.
    ``group_size=1`` is LLaVA's ``group_by_modality_length``; larger windows pad less (HF uses 50).
    ``lengths`` are signed: positive for samples with images, negative for text-only.
    """
    run = batch_size * world_size
    mega = run * group_size
    if group_by_modality:
        groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]]
    else:
        groups = [list(range(len(lengths)))]
    full: list[list[int]] = []
    rest: list[int] = []
    for group in groups:
        if not group:
            continue
        perm = torch.randperm(len(group), generator=generator).tolist()
        shuffled = [group[p] for p in perm]
        for start in range(0, len(shuffled), mega):
            window = sorted(shuffled[start : start + mega], key=lambda i: -abs(lengths[i]))
            for k in range(0, len(window), run):
                chunk = window[k : k + run]
                (full.append(chunk) if len(chunk) == run else rest.extend(chunk))
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + rest


class LengthGroupedSampler(Sampler[int]):
    """Yields :func:`grouped_indices` for the current epoch (``set_epoch`` reshuffles deterministically)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0, group_by_modality: bool = True,
                 group_size: int = 1) -> None:
        if batch_size <= 0 or world_size <= 0:
            raise ConfigError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}.")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(grouped_indices(self.lengths, self.batch_size, self.world_size, g, self.group_by_modality, self.group_size))
