"""The batch that flows from the collator to the model."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A training or inference batch.

    ``input_ids`` / ``labels`` / ``attention_mask``: ``[B, T]``; image placeholders are already expanded to
    N image-token ids per image and their labels are ``IGNORE_INDEX``.
    ``pixel_values``: ``[n_img, 3, H, W]``, images of row 0 first, in order of appearance.
    ``images_per_sample``: image counts, one per sample. ``num_image_tokens``: image-token positions in the batch
    (counted on the host by the collator, so the model can check it without a device sync).
    Packed rows (:mod:`mllm_kit.data.packing`) hold several samples each: ``position_ids`` restart at 0 per sample,
    ``attention_mask`` is ``None`` (the restarts isolate the samples), ``seq_lens`` lists each row's sample lengths and
    ``segments`` ``[B, T]`` the sample (0..S−1) of every position; padded rows leave the three ``None``.
    ``row_lengths``: each row's positions that are not padding (host count, set by the collators), so that throughput
    and padding waste are known without reading ``attention_mask`` back from the device.
    ``num_loss_tokens``: supervised targets after the causal shift (host count); ``num_answer_spans``: supervised
    spans, i.e. positions whose next token starts an answer (host count; PDrop's training queries). A batch is not changed after
    collation; the trainer derives the loss normaliser from the loader's per-step counts. ``loss_weights`` ``[B, T]``:
    each label position's weight under ``data.loss_weighting`` other than ``token`` (``None``: every supervised token
    weighs 1), with their host sum ``loss_weight_sum``; :attr:`loss_total` is what the normaliser sums.
    ``crop_pixel_values`` ``[Σ crops, 3, H, W]`` / ``crop_grids`` (one ``(rows, cols)`` per image): the
    high-resolution view, for connectors that read one (DeepStack, AnyRes); ``image_sizes``: each image's
    original ``(width, height)`` (AnyRes unpads with it). A mixture's ``pixel_values`` are ``[n_img, Σ 3·Hᵢ·Wᵢ]``
    (every member's image flattened, member order; crops likewise).
    ``instruction_ids`` / ``instruction_mask`` ``[S, L]``: each sample's first user message by itself, for an
    instance-level gate (LoRA-MoE); without them the gate reads :meth:`prompt_mask`'s tokens.
    ``teacher``: the same samples as a distillation teacher reads them (its own template and image-token count),
    when they differ from this view; :meth:`teacher_view` is what the teacher runs on. ``pairs``: preference batches
    hold ``pairs`` chosen rows, then the ``pairs`` rejected rows in the same order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    images_per_sample: list[int] = field(default_factory=list)
    num_image_tokens: int | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: list[list[int]] | None = None
    row_lengths: list[int] | None = None
    segments: torch.Tensor | None = None
    sample_ids: list[str] = field(default_factory=list)
    num_loss_tokens: int | None = None
    num_answer_spans: int | None = None
    loss_weights: torch.Tensor | None = None
    loss_weight_sum: float | None = None
    crop_pixel_values: torch.Tensor | None = None
    crop_grids: list[tuple[int, int]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    instruction_ids: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = None
    teacher: Batch | None = None
    pairs: int | None = None

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors: ``DataLoader(pin_memory=True)`` calls this, so that :meth:`to` a GPU
        overlaps the copy with compute."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        moved = {f.name: fn(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.teacher is not None:
            moved["teacher"] = self.teacher._map(fn)
        return replace(self, **moved)

    def teacher_view(self) -> Batch:
        """The batch a distillation teacher runs on: its own view, or this one when both read samples alike."""
        return self if self.teacher is None else self.teacher

    def prompt_mask(self) -> torch.Tensor | None:
        """``[B, T]`` bool: each sequence's prompt up to its first supervised token (the first instruction and
        what precedes it), padding excluded; packed rows restart at every ``position_ids == 0``. ``None``
        without labels (at inference the whole prompt is the instruction)."""
        if self.labels is None:
            return None
        supervised = (self.labels != IGNORE_INDEX).long()
        seen = supervised.cumsum(dim=-1)
        if self.position_ids is not None:  # subtract what earlier packed sequences saw (a non-decreasing count)
            starts = torch.where(self.position_ids == 0, seen - supervised, torch.zeros_like(seen))
            seen = seen - starts.cummax(dim=-1).values
        mask = seen == 0
        return mask if self.attention_mask is None else mask & self.attention_mask.bool()

    @property
    def loss_total(self) -> float:
        """Σ of the supervised targets' weights: ``num_loss_tokens`` under token weighting."""
        return float(self.loss_weight_sum if self.loss_weights is not None else (self.num_loss_tokens or 0))

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def keep_image_prefix(batch: Batch, image_token_id: int, tokens_per_image: int, keep: int, pad_token_id: int) -> Batch:
    """Shorten every image span from ``tokens_per_image`` to its first ``keep`` positions.

    For connectors that can emit fewer tokens than the data pipeline expanded (Matryoshka scales): the
    other positions are removed and the rows re-padded on the right, so text, labels and attention keep
    their order. Image positions carry no labels, so the supervised targets are unchanged. Needs right
    padding and no packing. The new length is found from host counts, without a device sync.
    """
    if keep == tokens_per_image:
        return batch
    if not 0 < keep < tokens_per_image:
        raise ValueError(f"keep must be in 1..{tokens_per_image}, got {keep}.")
    if batch.position_ids is not None:
        raise ValueError("keep_image_prefix does not support packed batches (position_ids set).")
    ids = batch.input_ids
    is_image = ids == image_token_id
    index_in_span = (is_image.cumsum(1) - 1) % tokens_per_image
    kept = ~is_image | (index_in_span < keep)
    removed = [n * (tokens_per_image - keep) for n in batch.images_per_sample]
    length = ids.shape[1] - min(removed, default=0)
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :length]  # kept positions first, in order
    valid = torch.arange(length, device=ids.device) < kept.sum(1, keepdim=True)

    def take(t: torch.Tensor | None, fill: int) -> torch.Tensor | None:
        return None if t is None else torch.where(valid, t.gather(1, order), fill)

    lengths = None if batch.row_lengths is None else [n - r for n, r in zip(batch.row_lengths, removed)]
    return replace(
        batch,
        input_ids=take(ids, pad_token_id),
        labels=take(batch.labels, IGNORE_INDEX),
        attention_mask=take(batch.attention_mask, 0),
        num_image_tokens=sum(batch.images_per_sample) * keep,
        row_lengths=lengths,
    )
