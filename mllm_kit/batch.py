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
    ``images_per_sample``: ``[B]`` image counts. ``num_image_tokens``: image-token positions in the batch
    (counted on the host by the collator, so the model can check it without a device sync).
    Packed rows carry ``position_ids`` (restarting at 0 per sequence) and ``seq_lens`` (lengths of the
    sequences in each row); padded rows leave both ``None``.
    ``num_loss_tokens``: supervised targets after the causal shift (host count); ``window_loss_tokens``: the
    same summed over the micro-batches of this optimiser step on this rank. ``loss_normalizer`` is set by the
    trainer: the global batch's supervised-token count, rescaled for accumulation and data parallelism.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    images_per_sample: list[int] = field(default_factory=list)
    num_image_tokens: int | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: list[list[int]] | None = None
    sample_ids: list[str] = field(default_factory=list)
    num_loss_tokens: int | None = None
    window_loss_tokens: int | None = None
    loss_normalizer: float | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
