"""What one forward call knows about its batch, built once by :meth:`MLLM.embed_inputs` and read by every layer step.

The context is immutable and lives for one call (a training forward, a scoring forward, or one ``generate``): nothing
of it is ever stored on a module. Counts the data pipeline knew before batching (images per sample, image tokens per
image, packed sample lengths) are host integers, so steps size their tensors without reading the device.

Samples: a padded batch holds one sample per row; a packed batch (``segments`` set) holds several per row, numbered
0..S−1 in row order — the order of ``images_per_sample`` and of the images themselves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mllm_kit.batch import IGNORE_INDEX

if TYPE_CHECKING:
    from mllm_kit.connectors.base import ConnectorOutput


@dataclass(frozen=True, eq=False)
class ForwardContext:
    """One call's facts.

    ``input_ids`` ``[B, T]``; ``attention_mask`` ``[B, T]`` (1 = a real token; ``None``: no padding, or packed rows);
    ``position_ids`` ``[B, T]`` as the batch gives them (packed rows restart at 0 per sample; ``None``: 0..T−1);
    ``segments`` ``[B, T]``: each position's sample (packed rows only); ``seq_lens``: each packed row's sample lengths;
    ``row_lengths``: each row's positions that are not padding (host; ``None`` when unknown).
    ``image_mask`` ``[B, T]``: the image-token positions; ``tokens_per_image``: N per image (host); ``images_per_sample``
    (host). ``instruction_mask`` ``[B, T]``: each sample's prompt up to its first supervised token (``None`` at
    inference, where the whole prompt is the instruction); ``labels`` ``[B, T]`` when the batch has them, with
    ``num_answer_spans`` (host) counting their supervised spans. ``instruction``: each sample's instruction embeddings
    and mask (``[S, L, D]``, ``[S, L]``), when a module reads them (an instance-level gate).
    ``visual``: the connector's output for this call. ``generating``: the call is a ``generate`` (prefill, then decode
    steps on the KV cache).
    """

    input_ids: torch.Tensor
    image_mask: torch.Tensor
    tokens_per_image: tuple[int, ...] = ()
    images_per_sample: tuple[int, ...] = ()
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    seq_lens: tuple[tuple[int, ...], ...] | None = None
    row_lengths: tuple[int, ...] | None = None
    instruction_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    num_answer_spans: int | None = None
    instruction: tuple[torch.Tensor, torch.Tensor] | None = None
    visual: ConnectorOutput | None = None
    generating: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])

    @property
    def num_images(self) -> int:
        return len(self.tokens_per_image)

    @property
    def num_samples(self) -> int:
        if self.seq_lens is not None:
            return sum(len(row) for row in self.seq_lens)
        return self.shape[0]

    @functools.cached_property
    def image_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` ``[Σ Nᵢ]`` of the image positions, row-major — the order ``masked_scatter`` fills them, so
        image i holds the ``tokens_per_image[i]`` entries after those of images 0..i−1."""
        flat = torch.nonzero_static(self.image_mask, size=sum(self.tokens_per_image))
        return flat[:, 0], flat[:, 1]

    @functools.cached_property
    def sample_ids(self) -> torch.Tensor:
        """``[B, T]``: each position's sample (packed rows: ``segments``, numbered over the whole batch; a packed row's
        padding counts as its last sample's)."""
        if self.segments is not None:
            return self.segments
        b, t = self.shape
        return torch.arange(b, device=self.input_ids.device)[:, None].expand(b, t)

    @functools.cached_property
    def image_samples(self) -> torch.Tensor:
        """``[n_img]``: the sample each image belongs to."""
        counts = torch.tensor(self.images_per_sample, dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(counts)), counts).to(self.input_ids.device)

    @functools.cached_property
    def image_rows(self) -> list[int]:
        """The batch row of each image (host)."""
        rows = [r for r, row in enumerate(self.seq_lens) for _ in row] if self.seq_lens is not None else range(self.shape[0])
        return [row for row, n in zip(rows, self.images_per_sample) for _ in range(n)]

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool: positions holding a token of a sample (padding excluded)."""
        if self.attention_mask is not None:
            return self.attention_mask.bool()
        if self.seq_lens is not None:
            lengths = torch.tensor([sum(r) for r in self.seq_lens], device=self.input_ids.device)
            return torch.arange(self.shape[1], device=lengths.device)[None] < lengths[:, None]
        return torch.ones(self.shape, dtype=torch.bool, device=self.input_ids.device)

    def prompt_ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` ``[S]``: each sample's last prompt token — the token before its first supervised one, or
        at inference its last token. FastV's query (specs/components.md §8.2)."""
        mask = self.instruction_mask if self.instruction_mask is not None else self.valid
        cols = torch.arange(self.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, cols, torch.full_like(cols, -1))
        per_sample = torch.full((self.num_samples,), -1, dtype=torch.long, device=mask.device)
        per_sample = per_sample.scatter_reduce(0, self.sample_ids.reshape(-1), last.reshape(-1), "amax")
        rows = self._sample_rows()
        return rows, per_sample.clamp_min(0)

    def answer_queries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, samples)``: every position whose next token starts a supervised span (the last instruction
        token before each answer, PDrop's training queries, §8.6); without labels, :meth:`prompt_ends`."""
        if self.labels is None or self.num_answer_spans is None:
            rows, cols = self.prompt_ends()
            return rows, cols, torch.arange(rows.shape[0], device=rows.device)
        supervised = self.labels != IGNORE_INDEX
        starts = torch.zeros_like(supervised)
        same = self.sample_ids[:, 1:] == self.sample_ids[:, :-1]
        starts[:, :-1] = ~supervised[:, :-1] & supervised[:, 1:] & same
        flat = torch.nonzero_static(starts, size=self.num_answer_spans)
        rows, cols = flat[:, 0], flat[:, 1]
        return rows, cols, self.sample_ids[rows, cols]

    def _sample_rows(self) -> torch.Tensor:
        if self.seq_lens is None:
            return torch.arange(self.shape[0], device=self.input_ids.device)
        rows = [r for r, row in enumerate(self.seq_lens) for _ in row]
        return torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

