"""A map-style dataset over LLaVA records: tokenised, image-expanded, truncated, with pixel values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.conversation import ConversationEncoder, Encoded, Truncation, truncate, truncate_to
from mllm_kit.data.formats import Record, load_records
from mllm_kit.data.images import FolderImages
from mllm_kit.data.templates import Turn
from mllm_kit.data.transforms import BaseTransform, CropGridTransform, ImageViews
from mllm_kit.errors import DataError, ImageError
from mllm_kit.log import get_logger

log = get_logger(__name__)

MAX_SKIPS = 64


@dataclass
class Sample:
    """One encoded sample. ``pixel_values``: ``[k, 3, H, W]`` for the k images it kept, or ``None``.

    Connectors that read a high-resolution view also get ``crop_pixel_values`` ``[Σ crops, 3, H, W]`` and
    each image's crop ``(rows, cols)`` in ``crop_grids``; ``image_sizes`` holds each image's original ``(width, height)``.
    Models with an instance-level gate (LoRA-MoE) also get
    ``instruction_ids``: the first user turn's text tokens. ``teacher``: the same sample as a distillation teacher
    sees it (its own template and image-token count), when that differs. ``rejected``: a preference sample's
    rejected reply (this sample holds the chosen one).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    num_image_tokens: int
    id: str
    target: str | None = None
    crop_pixel_values: torch.Tensor | None = None
    crop_grids: list[tuple[int, int]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    instruction_ids: torch.Tensor | None = None
    teacher: Sample | None = None
    rejected: Sample | None = None


@dataclass(frozen=True)
class View:
    """How one model reads samples: its conversation encoder (template, tokenizer, image-token count) and image transform."""

    encoder: ConversationEncoder
    image_transform: BaseTransform | CropGridTransform
    instruction: bool = False  # the model reads each sample's instruction (adds Sample.instruction_ids)


class LlavaDataset(Dataset[Sample]):
    """LLaVA JSON/JSONL samples for training (``prompt=False``) or generation prompts (``prompt=True``).

    Over-long samples are trimmed or dropped by ``truncation`` (never inside an image span); a dropped
    sample is replaced by the next one, and both events are counted and logged. ``instruction`` adds each
    sample's ``instruction_ids``. ``teacher``: a distillation teacher's view; every sample is encoded for it too, cut
    where the model's view was cut (not by ``max_length``), and must supervise exactly the model's tokens.
    ``preference``: samples are ``chosen``/``rejected`` pairs (DPO, KTO-pair). ``images``: where image names resolve
    (``load(name, ref)``, ``size(name, ref)``; default the files under ``image_root``, or indexed tar shards).
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        encoder: ConversationEncoder,
        image_transform: BaseTransform | CropGridTransform,
        max_length: int = 2048,
        truncation: Truncation = "trim",
        prompt: bool = False,
        records: list[Record] | None = None,
        instruction: bool = False,
        teacher: View | None = None,
        preference: bool = False,
        images: Any = None,
        max_bad_fraction: float = 0.001,
    ) -> None:
        self.path = str(path)
        self.image_root = Path(image_root) if image_root is not None else Path(path).parent
        self.images = images if images is not None else FolderImages(self.image_root)  # load(name, ref), size(name, ref)
        self.records = records if records is not None else load_records(path)
        if not self.records:
            raise DataError(f"data file {self.path!r} holds no samples.")
        self.max_length = max_length
        self.truncation = truncation
        self.prompt = prompt
        self.view = View(encoder, image_transform, instruction)
        self.teacher = teacher
        self.preference = preference
        self.num_trimmed = 0
        self.num_dropped = 0
        self.bad: set[int] = set()  # records skipped for an unreadable image
        self.max_bad_fraction = max_bad_fraction
        self._packed_sizes: list[tuple[int, int] | None] | None = None

    @property
    def encoder(self) -> ConversationEncoder:
        return self.view.encoder

    @property
    def image_transform(self) -> BaseTransform | CropGridTransform:
        return self.view.image_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        tried = min(MAX_SKIPS, len(self.records))
        longest = 0
        for step in range(tried):
            sample = self.get(index + step)
            if isinstance(sample, Sample):
                return sample
            longest = max(longest, sample or 0)
        raise self._all_dropped(index, tried, longest)

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def get(self, index: int) -> Sample | int | None:
        """Record ``index`` encoded: a :class:`Sample`, its token length when truncation drops it, or ``None`` when an
        image of it cannot be read — skipped, counted and logged; more than ``max_bad_fraction`` of the records
        (in this process) is an error."""
        index %= len(self.records)
        if index in self.bad:
            return None
        record = self.records[index]
        try:
            return self._encode(record)
        except ImageError as err:
            self.bad.add(index)
            limit = self.max_bad_fraction * len(self.records)
            log.warning("%s: skipped (%s; %d bad samples so far)", record.ref, err, self.num_bad)
            if self.num_bad > limit:
                raise DataError(f"{self.path}: {self.num_bad} samples with unreadable images, more than data.max_bad_fraction="
                                f"{self.max_bad_fraction} of {len(self.records)}; the last: {err}") from None
            return None

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
        turns, target = record.turns, None
        if record.pair is not None and not self.preference:
            raise DataError(f"{record.ref}: a preference sample (chosen/rejected) in a stage whose objective reads no pairs; "
                            f"use objective dpo or kto_pair, or data without 'chosen'/'rejected'.")
        if self.preference:
            if record.pair is None:
                raise DataError(f"{record.ref}: the stage's objective trains on preference pairs, but the sample has no "
                                f"'chosen'/'rejected' replies to its last human turn.")
            chosen, rejected = (self._encode_both(record, (*turns, Turn("assistant", reply))) for reply in record.pair)
            if isinstance(chosen, int) or isinstance(rejected, int):
                return chosen if isinstance(chosen, int) else rejected
            chosen.rejected = rejected
            return chosen
        if self.prompt:
            last_user = max(i for i, t in enumerate(turns) if t.role == "user")
            target = next((t.content for t in turns[last_user + 1 :] if t.role == "assistant"), None)
            turns = turns[: last_user + 1]
        sample = self._encode_both(record, turns)
        if isinstance(sample, Sample):
            sample.target = target
        return sample

    def _encode_both(self, record: Record, turns: tuple[Turn, ...]) -> Sample | int:
        """The sample in the model's view and, with a teacher, in the teacher's (same supervised tokens, checked).

        Only the model's view is fitted to ``max_length``; when that cuts it, the teacher's view is cut where it keeps the
        same reply tokens and images (:func:`~mllm_kit.data.conversation.truncate_to`), whatever its own length — a
        teacher with fewer image tokens per image would otherwise keep replies the model's view lost."""
        images: dict[str, object] = {}  # decoded once, transformed per view
        encoded = self._tokens(record, turns, self.view, images)
        fitted = truncate(encoded, self.max_length, self.truncation)
        if fitted is None:
            self.num_dropped += 1
            log.warning("%s: dropped (%d tokens > max_length=%d; %d dropped so far)", record.ref, len(encoded), self.max_length,
                        self.num_dropped)
            return len(encoded)
        if fitted is not encoded:
            self.num_trimmed += 1
            log.warning("%s: trimmed from %d to %d tokens (%d trimmed so far)", record.ref, len(encoded), len(fitted), self.num_trimmed)
        sample = self._sample(record, turns, self.view, fitted, images)
        if self.teacher is None:
            return sample
        theirs = self._tokens(record, turns, self.teacher, images)
        if fitted is not encoded:
            theirs = truncate_to(theirs, fitted.num_supervised, len(fitted.image_spans))
        mine = sample.labels[sample.labels != IGNORE_INDEX]
        their_labels = torch.tensor([t for t in theirs.labels if t != IGNORE_INDEX], dtype=torch.long)
        if not torch.equal(mine, their_labels):
            raise DataError(f"{record.ref}: the teacher's view of this sample supervises {len(their_labels)} tokens, the "
                            f"student's {len(mine)} tokens differ from it; distillation aligns replies through their tokens, so "
                            f"the teacher's template and tokenizer must encode replies exactly like the student's (teacher.template, "
                            f"teacher.vocab).")
        sample.teacher = self._sample(record, turns, self.teacher, theirs, images)
        return sample

    def _tokens(self, record: Record, turns: tuple[Turn, ...], view: View, images: dict[str, object]) -> Encoded:
        """``turns`` encoded in ``view`` (decoding the images first when their sizes set the token counts)."""
        sizes = None
        if view.encoder.dynamic:  # each image's token count follows from its size: decode the images first
            for p in record.images:
                if p not in images:
                    images[p] = self.images.load(p, record.ref)
            sizes = [images[p].size for p in record.images]
        return view.encoder.encode_prompt(turns, sizes) if self.prompt else view.encoder.encode(turns, sizes)

    def _sample(self, record: Record, turns: tuple[Turn, ...], view: View, fitted: Encoded, images: dict[str, object]) -> Sample:
        """The :class:`Sample` of ``fitted`` in ``view``: its ids and labels, and the images it kept, transformed."""
        kept = record.images[: len(fitted.image_spans)]
        pixel_values, crops, grids = None, None, []
        if kept:
            for p in kept:
                if p not in images:
                    images[p] = self.images.load(p, record.ref)
            views = [view.image_transform(images[p]) for p in kept]
            if isinstance(views[0], ImageViews):  # a connector that also reads a high-resolution view (DeepStack, AnyRes)
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
            crop_pixel_values=crops,
            crop_grids=grids,
            image_sizes=[images[p].size for p in kept],
            instruction_ids=torch.tensor(view.encoder.encode_instruction(turns), dtype=torch.long) if view.instruction else None,
        )

    def packed_sizes(self) -> list[tuple[int, int] | None]:
        """Each record's exact ``(tokens, images)`` as :meth:`__getitem__` encodes it, or ``None`` where truncation
        drops it — what packing budgets rows with. Tokenises every record once (memoised); no pixels are decoded (an
        encoder whose token count follows the image size reads the image headers)."""
        if self._packed_sizes is None:
            if self.prompt or self.preference or self.teacher is not None:
                raise DataError(f"{self.path}: packing applies to training samples in the model's own view only "
                                f"(no prompts, preference pairs or teacher view).")
            out: list[tuple[int, int] | None] = []
            for r in self.records:
                sizes = [self.images.size(p, r.ref) for p in r.images] if self.encoder.dynamic else None
                fitted = truncate(self.encoder.encode(r.turns, sizes), self.max_length, self.truncation)
                out.append(None if fitted is None else (len(fitted.input_ids), len(fitted.image_spans)))
            self._packed_sizes = out
        return self._packed_sizes

    def modality_lengths(self) -> list[int]:
        """Estimated token lengths without tokenising: positive for samples with images, negative for text-only."""
        per_image = self.encoder.tokens_per_image
        out = []
        for r in self.records:
            n = r.num_text_chars() // 4 + len(r.images) * per_image
            out.append(n if r.images else -max(n, 1))
        return out
