"""Batch samples by padding (packing: :mod:`mllm_kit.data.packing`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.data.dataset import Sample
from mllm_kit.errors import ConfigError

LossWeighting = Literal["token", "sample", "square"]


class PadCollator:
    """Pads to the longest sample (optionally a multiple of ``pad_to_multiple_of``).

    Training uses right padding; batched generation needs ``padding_side="left"``. Preference samples become two
    rows each — the chosen replies first, then the rejected ones in the same order (``Batch.pairs``); samples with a
    teacher's view give the batch its ``teacher`` batch, row for row.
    """

    def __init__(self, pad_token_id: int, padding_side: Literal["right", "left"] = "right", pad_to_multiple_of: int | None = None,
                 loss_weighting: LossWeighting = "token") -> None:
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.loss_weighting = loss_weighting
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        pairs = None
        if samples[0].rejected is not None:
            pairs = len(samples)
            samples = [*samples, *(s.rejected for s in samples)]
        batch = self._pad(samples)
        batch.pairs = pairs
        if samples[0].teacher is not None:
            batch.teacher = self._pad([s.teacher for s in samples])
        return batch

    def _pad(self, samples: Sequence[Sample]) -> Batch:
        longest = max(len(s.input_ids) for s in samples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(samples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for row, s in enumerate(samples):
            length = len(s.input_ids)
            cols = slice(0, length) if self.padding_side == "right" else slice(longest - length, longest)
            input_ids[row, cols] = s.input_ids
            labels[row, cols] = s.labels
            attention_mask[row, cols] = 1
        rows = torch.arange(n).unsqueeze(1).expand(n, longest)
        return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                     row_lengths=[len(s.input_ids) for s in samples],
                     **sample_fields(samples, labels, rows, self.pad_token_id, self.loss_weighting))


def sample_fields(samples: Sequence[Sample], labels: torch.Tensor, segments: torch.Tensor, pad_token_id: int,
                  weighting: LossWeighting) -> dict:
    """The :class:`Batch` fields that follow from the samples alone, padded or packed: images and crops in sample
    order, per-sample counts and ids, instruction rows, the supervised-token count and the loss weights
    (``segments`` ``[B, T]``: each position's sample)."""
    images = [s.pixel_values for s in samples if s.pixel_values is not None]
    crops = [s.crop_pixel_values for s in samples if s.crop_pixel_values is not None]
    instruction_ids = instruction_mask = None
    if samples[0].instruction_ids is not None:
        instruction_ids, instruction_mask = instruction_rows(samples, pad_token_id)
    weights, weight_sum = loss_weights(labels, segments, len(samples), weighting)
    return dict(
        loss_weights=weights,
        loss_weight_sum=weight_sum,
        pixel_values=torch.cat(images) if images else None,
        images_per_sample=[0 if s.pixel_values is None else int(s.pixel_values.shape[0]) for s in samples],
        num_image_tokens=sum(s.num_image_tokens for s in samples),
        sample_ids=[s.id for s in samples],
        num_loss_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        num_answer_spans=answer_spans(labels, segments),
        crop_pixel_values=torch.cat(crops) if crops else None,
        crop_grids=[g for s in samples for g in s.crop_grids],
        image_sizes=[size for s in samples for size in s.image_sizes],
        instruction_ids=instruction_ids,
        instruction_mask=instruction_mask,
    )


def answer_spans(labels: torch.Tensor, segments: torch.Tensor) -> int:
    """Supervised spans (answers) in the batch: positions whose label is ignored and whose next one, in the same
    sample, is supervised."""
    supervised = labels != IGNORE_INDEX
    starts = ~supervised[:, :-1] & supervised[:, 1:] & (segments[:, 1:] == segments[:, :-1])
    return int(starts.sum())


def instruction_rows(samples: Sequence[Sample], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's ``instruction_ids`` as ``[S, L]`` ids and mask, right-padded whatever the sequence's padding side
    (only a mean reads them)."""
    width = max(1, max(len(s.instruction_ids) for s in samples))
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        ids[row, : len(s.instruction_ids)] = s.instruction_ids
        mask[row, : len(s.instruction_ids)] = True
    return ids, mask



def loss_weights(labels: torch.Tensor, segments: torch.Tensor, num_samples: int,
                 weighting: LossWeighting) -> tuple[torch.Tensor | None, float | None]:
    """Per-position target weights ``[B, T]`` and their sum for ``weighting`` (``token``: ``(None, None)``).

    Sample i with nᵢ supervised targets gets 1/nᵢ per target (``sample``: each sample's mean counts once) or 1/√nᵢ
    (``square``, InternVL's ``loss_reduction``); ``segments`` ``[B, T]`` names each position's sample. A weight sits at
    the label's position, as ``labels`` does (position t's prediction is scored against label t + 1).
    """
    if weighting == "token":
        return None, None
    if weighting not in ("sample", "square"):
        raise ConfigError(f"data.loss_weighting must be token, sample or square, got {weighting!r}.")
    supervised = labels != IGNORE_INDEX
    supervised[:, 0] = False  # no position predicts a row's first label
    counts = torch.bincount(segments[supervised], minlength=num_samples).double()
    per_sample = torch.where(counts > 0, counts.rsqrt() if weighting == "square" else counts.reciprocal(), 0.0)
    weights = torch.where(supervised, per_sample[segments], 0.0).float()
    return weights, float((per_sample * counts).sum())
