"""Packing: several samples per row, each isolated (own position ids from 0, attending only to itself).

Rows are filled by first-fit-decreasing over a buffer of shuffled samples, under two budgets per row — tokens
(``max_length``) and images — so that both the LLM's and the encoder's work stay even across rows and ranks (InternVL's
``max_packed_tokens`` + ``num_images_expected``; specs/anchors-2026.md, "How the best pack"). A sample is never split
across rows, so an image span never is either.

Isolation needs no custom attention code: a packed :class:`~mllm_kit.batch.Batch` has no ``attention_mask`` and
``position_ids`` that restart at 0 for every sample. transformers reads the restarts as sequence boundaries — a
block-diagonal causal mask on SDPA/eager, ``cu_seqlens`` for flash-attention's varlen kernel. Each row's padding
tail restarts its positions too, so it is a sequence of its own that no real token attends to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.data.collate import LossWeighting, sample_fields
from mllm_kit.data.dataset import Sample
from mllm_kit.errors import ConfigError

Size = tuple[int, int]  # (tokens, images) of one sample


def first_fit_decreasing(sizes: Sequence[Size | None], order: Sequence[int], max_tokens: int, max_images: int | None = None,
                         buffer: int = 4096) -> list[list[int]]:
    """Rows of sample indices: ``order`` is cut into windows of ``buffer`` samples, each window's samples are placed
    longest first into the first row with room for their tokens and images. ``None`` sizes (samples truncation drops)
    are skipped; every other sample must fit one row (the caller checks, naming the sample). Rows keep the window
    order; the caller shuffles them."""
    rows: list[list[int]] = []
    for start in range(0, len(order), buffer):
        window = sorted((i for i in order[start : start + buffer] if sizes[i] is not None), key=lambda i: -sizes[i][0])
        tokens_left = np.empty(len(window), dtype=np.int64)
        images_left = np.empty(len(window), dtype=np.int64)
        members: list[list[int]] = []
        for i in window:
            tokens, images = sizes[i]
            n = len(members)
            fits = (tokens_left[:n] >= tokens) & (images_left[:n] >= images)
            j = int(fits.argmax()) if n and fits.any() else n
            if j == n:
                members.append([])
                tokens_left[j] = max_tokens
                images_left[j] = max_images if max_images is not None else np.iinfo(np.int64).max
            members[j].append(i)
            tokens_left[j] -= tokens
            images_left[j] -= images
        rows.extend(members)
    return rows


class PackCollator:
    """``[[Sample, ...] per row]`` → one packed :class:`Batch` of ``[R, T]`` rows (T: the longest row, or ``max_length``
    with ``pad_to_max``).

    Every sample's first label is ignored: in a packed row the previous sample's last token would otherwise be
    trained to predict it, which a padded batch never does. ``images_per_sample`` and ``instruction_ids`` hold one
    entry per sample (rows in order, samples in row order), ``segments`` ``[R, T]`` the sample each position belongs
    to (a row's padding: its last sample), ``seq_lens`` each row's sample lengths.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, pad_to_max: bool = False,
                 loss_weighting: LossWeighting = "token") -> None:
        self.pad_token_id = int(pad_token_id)
        self.loss_weighting = loss_weighting
        self.max_length = max_length
        self.pad_to_max = pad_to_max

    def __call__(self, rows: Sequence[Sequence[Sample]]) -> Batch:
        lengths = [[len(s.input_ids) for s in row] for row in rows]
        width = max(sum(n) for n in lengths)
        if self.max_length is not None:
            if width > self.max_length:
                raise ConfigError(f"a packed row holds {width} tokens, more than data.max_length={self.max_length}.")
            width = self.max_length if self.pad_to_max else width
        samples = [s for row in rows for s in row]
        if any(s.teacher is not None or s.rejected is not None for s in samples):
            raise ConfigError("data.packing does not pack preference pairs or a distillation teacher's view; set "
                              "data.packing: false for this stage.")
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        position_ids = torch.empty_like(input_ids)
        segments = torch.empty_like(input_ids)
        k = 0
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                n = len(s.input_ids)
                input_ids[r, at : at + n] = s.input_ids
                labels[r, at + 1 : at + n] = s.labels[1:]
                position_ids[r, at : at + n] = torch.arange(n)
                segments[r, at : at + n] = k
                at, k = at + n, k + 1
            position_ids[r, at:] = torch.arange(width - at)
            segments[r, at:] = k - 1
        return Batch(input_ids=input_ids, labels=labels, attention_mask=None, position_ids=position_ids, seq_lens=lengths,
                     segments=segments, row_lengths=[sum(n) for n in lengths],
                     **sample_fields(samples, labels, segments, self.pad_token_id, self.loss_weighting))
