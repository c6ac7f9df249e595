"""Length- and modality-grouped sampling (LLaVA's ``group_by_modality_length``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
