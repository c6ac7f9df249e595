"""Turn-by-turn tokenisation with exact label masks, image expansion and image-safe truncation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.templates import IMAGE_PLACEHOLDER, Segment, Template, Turn
from mllm_kit.errors import ConfigError

Truncation = Literal["trim", "drop"]
TRUNCATIONS = ("trim", "drop")


@dataclass(frozen=True)
class ImageSpan:
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Encoded:
    """Token ids and labels of one sample; ``image_spans`` in order of the sample's images."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[ImageSpan]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class ConversationEncoder:
    """Encodes turns with a template; each ``<image>`` becomes ``tokens_per_image`` image-token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: Template, image_token_id: int, tokens_per_image: int,
                 system_prompt: str | None = None) -> None:
        if tokens_per_image <= 0:
            raise ConfigError(f"tokens_per_image must be positive, got {tokens_per_image}.")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = int(image_token_id)
        self.tokens_per_image = int(tokens_per_image)
        self.system_prompt = system_prompt
        self._cache: dict[str, list[int]] = {}

    def _text_ids(self, text: str) -> list[int]:
        # Prompt scaffolding (system prompt, headers) repeats across samples; cache short strings.
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(text) <= 256 and len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    def encode_segments(self, segments: Sequence[Segment]) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        spans: list[ImageSpan] = []
        if self.template.add_bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for segment in segments:
            parts = segment.text.split(IMAGE_PLACEHOLDER)
            for k, part in enumerate(parts):
                if part:
                    piece = self._text_ids(part)
                    ids.extend(piece)
                    labels.extend(piece if segment.supervised else [IGNORE_INDEX] * len(piece))
                if k < len(parts) - 1:
                    spans.append(ImageSpan(len(ids), self.tokens_per_image))
                    ids.extend([self.image_token_id] * self.tokens_per_image)
                    labels.extend([IGNORE_INDEX] * self.tokens_per_image)
        return Encoded(ids, labels, spans)

    def _with_system(self, turns: Sequence[Turn]) -> Sequence[Turn]:
        if self.system_prompt is None or (turns and turns[0].role == "system"):
            return turns
        return [Turn("system", self.system_prompt), *turns]

    def encode(self, turns: Sequence[Turn]) -> Encoded:
        """Training encoding: labels on assistant replies (+ stop token) only."""
        return self.encode_segments(self.template.render(self._with_system(turns), self.tokenizer))

    def encode_prompt(self, turns: Sequence[Turn]) -> Encoded:
        """Inference encoding of turns ending with a user turn, up to the assistant header."""
        return self.encode_segments(self.template.render_prompt(self._with_system(turns), self.tokenizer))

    def encode_instruction(self, turns: Sequence[Turn]) -> list[int]:
        """The first user turn's text alone (no template, no ``<image>``), as an instance-level gate reads it
        (Octavius tokenises the first human message by itself)."""
        first = next((t.content for t in turns if t.role == "user"), "")
        return self._text_ids(" ".join(first.replace(IMAGE_PLACEHOLDER, " ").split()))

    def stop_token_ids(self) -> list[int]:
        ids = []
        for s in self.template.stop_strings(self.tokenizer):
            piece = self.tokenizer.encode(s, add_special_tokens=False)
            if len(piece) == 1:
                ids.append(piece[0])
        return list(dict.fromkeys(ids))


def truncate(encoded: Encoded, max_length: int, policy: Truncation = "trim") -> Encoded | None:
    """Fit ``encoded`` into ``max_length`` without cutting inside an image span.

    ``trim`` cuts the tail; a cut that would fall inside an image span moves to the span's start, and
    images after the cut are dropped with it. ``drop`` discards any over-long sample. Returns ``None``
    when the sample is dropped or nothing supervised survives.
    """
    if policy not in TRUNCATIONS:
        raise ConfigError(f"truncation must be one of {TRUNCATIONS}, got {policy!r}.")
    if len(encoded) <= max_length:
        return encoded
    if policy == "drop":
        return None
    cut = max_length
    for span in encoded.image_spans:
        if span.start < cut < span.end:
            cut = span.start
    out = Encoded(encoded.input_ids[:cut], encoded.labels[:cut], [s for s in encoded.image_spans if s.end <= cut])
    return out if out.num_supervised > 0 else None
