"""A map-style dataset over LLaVA records: tokenised, image-expanded, truncated, with pixel values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mllm_kit.data.formats import Record, load_records
from mllm_kit.data.images import load_image
from mllm_kit.data.conversation import ConversationEncoder, Truncation, truncate
from mllm_kit.data.transforms import CropGridTransform, ImageTransform, ImageViews
from mllm_kit.errors import DataError
from mllm_kit.log import get_logger

log = get_logger(__name__)

MAX_SKIPS = 64


@dataclass
class Sample:
    """One encoded sample. ``pixel_values``: ``[k, 3, H, W]`` for the k images it kept, or ``None``.

    Connectors that read a high-resolution view also get ``crop_pixel_values`` ``[Σ crops, 3, H, W]`` and
    each image's crop ``(rows, cols)`` in ``crop_grids``. Models with an instance-level gate (LoRA-MoE) also get
    ``instruction_ids``: the first user turn's text tokens.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    num_image_tokens: int
    id: str
    target: str | None = None
    crop_pixel_values: torch.Tensor | None = None
    crop_grids: list[tuple[int, int]] = field(default_factory=list)
    instruction_ids: torch.Tensor | None = None


class LlavaDataset(Dataset[Sample]):
    """LLaVA JSON/JSONL samples for training (``prompt=False``) or generation prompts (``prompt=True``).

    Over-long samples are trimmed or dropped by ``truncation`` (never inside an image span); a dropped
    sample is replaced by the next one, and both events are counted and logged. ``instruction`` adds each
    sample's ``instruction_ids``.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        encoder: ConversationEncoder,
        image_transform: ImageTransform | CropGridTransform,
        max_length: int = 2048,
        truncation: Truncation = "trim",
        prompt: bool = False,
        records: list[Record] | None = None,
        instruction: bool = False,
    ) -> None:
        self.path = str(path)
        self.image_root = Path(image_root) if image_root is not None else Path(path).parent
        self.records = records if records is not None else load_records(path)
        if not self.records:
            raise DataError(f"data file {self.path!r} holds no samples.")
        self.encoder = encoder
        self.image_transform = image_transform
        self.max_length = max_length
        self.truncation = truncation
        self.prompt = prompt
        self.instruction = instruction
        self.num_trimmed = 0
        self.num_dropped = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        tried = min(MAX_SKIPS, len(self.records))
        longest = 0
        for step in range(tried):
            sample = self._encode(self.records[(index + step) % len(self.records)])
            if isinstance(sample, Sample):
                return sample
            longest = max(longest, sample)
        raise self._all_dropped(index, tried, longest)

    def _all_dropped(self, index: int, tried: int, longest: int) -> DataError:
        total = len(self.records)
        if self.truncation == "drop":
            fix = f"Raise data.max_length to at least {longest}, or set truncation: trim to cut over-long samples instead"
        else:  # trim drops a sample only when the cut leaves no supervised token
            fix = f"With truncation: trim every reply was cut away; raise data.max_length ({longest} keeps them whole)"
        return DataError(
            f"{self.path}: {tried} of {total} consecutive samples from index {index} exceed max_length={self.max_length}"
            f"{' (every sample in the file)' if tried == total else ''}; the longest tried has {longest} tokens. {fix}."
        )

    def _encode(self, record: Record) -> Sample | int:
        """The encoded sample, or its token length when truncation drops it."""
        turns = record.turns
        target = None
        if self.prompt:
            last_user = max(i for i, t in enumerate(turns) if t.role == "user")
            target = next((t.content for t in turns[last_user + 1 :] if t.role == "assistant"), None)
            encoded = self.encoder.encode_prompt(turns[: last_user + 1])
        else:
            encoded = self.encoder.encode(turns)
        fitted = truncate(encoded, self.max_length, self.truncation)
        if fitted is None:
            self.num_dropped += 1
            log.warning("%s: dropped (%d tokens > max_length=%d; %d dropped so far)", record.ref, len(encoded), self.max_length, self.num_dropped)
            return len(encoded)
        if fitted is not encoded:
            self.num_trimmed += 1
            log.warning("%s: trimmed from %d to %d tokens (%d trimmed so far)", record.ref, len(encoded), len(fitted), self.num_trimmed)
        images = record.images[: len(fitted.image_spans)]
        pixel_values, crops, grids = None, None, []
        if images:
            views = [self.image_transform(load_image(self.image_root / p, record.ref)) for p in images]
            if isinstance(views[0], ImageViews):  # a connector that also reads a high-resolution view (DeepStack)
                pixel_values = torch.stack([v.global_view for v in views])
                crops, grids = torch.cat([v.crops for v in views]), [v.grid for v in views]
            else:
                pixel_values = torch.stack(views)
        return Sample(
            input_ids=torch.tensor(fitted.input_ids, dtype=torch.long),
            labels=torch.tensor(fitted.labels, dtype=torch.long),
            pixel_values=pixel_values,
            num_image_tokens=sum(s.length for s in fitted.image_spans),
            id=record.id if record.id is not None else str(record.index),
            target=target,
            crop_pixel_values=crops,
            crop_grids=grids,
            instruction_ids=torch.tensor(self.encoder.encode_instruction(turns), dtype=torch.long) if self.instruction else None,
        )

    def modality_lengths(self) -> list[int]:
        """Estimated token lengths without tokenising: positive for samples with images, negative for text-only."""
        per_image = self.encoder.tokens_per_image
        out = []
        for r in self.records:
            n = r.num_text_chars() // 4 + len(r.images) * per_image
            out.append(n if r.images else -max(n, 1))
        return out
