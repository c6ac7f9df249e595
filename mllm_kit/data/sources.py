"""Weighted mixtures of training sources (``data.sources``): several datasets read as one, with each source's share
of every epoch set by its weight (docs/data.md).

An epoch holds N = Σ nᵢ samples (as many as all sources together); source i gives cᵢ = round(wᵢ/Σw · N) of them
(largest remainder, so Σ cᵢ = N). A source's samples are drawn without replacement through fresh shuffles: a source
whose share exceeds its size repeats, each of its samples once more before any a third time; a smaller share is a
different random subset every epoch. The draw is a function of (seed, epoch), so a resumed run sees the same epochs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mllm_kit.data.dataset import LlavaDataset, Sample


def source_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples per epoch from each source: round(wᵢ/Σw · Σn) by largest remainder (they add up to Σn exactly)."""
    total, weight = sum(sizes), float(sum(weights))
    exact = [w / weight * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def weighted_pool(sizes: Sequence[int], weights: Sequence[float], generator: torch.Generator) -> list[int]:
    """One epoch's draw: indices into the concatenated sources (source i's samples are ``offset_i + 0..n_i-1``),
    :func:`source_counts` of each, grouped by source (the sampler shuffles them)."""
    pool: list[int] = []
    offset = 0
    for size, count in zip(sizes, source_counts(sizes, weights)):
        rounds = -(-count // size)
        drawn = torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:count] if count else torch.empty(0)
        pool.extend((drawn + offset).tolist())
        offset += size
    return pool


class SourceMixture(Dataset[Sample]):
    """Several :class:`LlavaDataset` parts as one dataset indexed by concatenation; :meth:`epoch_pool` draws an epoch.
    Each part keeps its own image folder, bad-sample budget and truncation counts."""

    def __init__(self, parts: Sequence[LlavaDataset], weights: Sequence[float]) -> None:
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        self.sizes = [len(p) for p in self.parts]
        self.starts = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        self.path = " + ".join(p.path for p in self.parts)
        self.max_length = self.parts[0].max_length

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> tuple[LlavaDataset, int]:
        index %= len(self)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part], index - self.starts[part]

    def __getitem__(self, index: int) -> Sample:
        part, local = self._locate(index)
        return part[local]

    def get(self, index: int) -> Sample | int | None:
        part, local = self._locate(index)
        return part.get(local)

    @property
    def records(self) -> list[Any]:
        return [r for p in self.parts for r in p.records]

    def modality_lengths(self) -> list[int]:
        return [n for p in self.parts for n in p.modality_lengths()]

    def packed_sizes(self) -> list[tuple[int, int] | None]:
        return [s for p in self.parts for s in p.packed_sizes()]

    def epoch_pool(self, generator: torch.Generator) -> list[int]:
        return weighted_pool(self.sizes, self.weights, generator)

    def describe(self) -> str:
        counts = source_counts(self.sizes, self.weights)
        return ", ".join(f"{p.path}: {c} of {n} per epoch" for p, c, n in zip(self.parts, counts, self.sizes))
