"""Whole-string tokenisation with offset labels, image expansion and image-safe truncation.

One function turns text into ids for training, generation prompts, evaluation and instance-level gates
(:meth:`ConversationEncoder.encode_text`), so a prompt is always tokenised as the same characters are in training:

1. The template renders the conversation to one string, with the character ranges of its supervised parts
   (each assistant reply plus its stop token).
2. The string is split **only at** ``<image>`` placeholders. Each text chunk is encoded whole, in one
   tokenizer call (``add_special_tokens=False``; control tokens in the text, such as ``</s>`` or
   ``<|im_end|>``, become their single ids), and each placeholder becomes ``tokens_per_image`` image-token
   ids. This is LLaVA's ``tokenizer_image_token``: a SentencePiece tokenizer starts every chunk, including the
   one right after an image, with its ``▁`` dummy prefix, exactly as LLaVA trains and prompts.
3. A token is supervised iff the characters it covers (the fast tokenizer's ``offset_mapping``) overlap a
   supervised range. A token that straddles the start of a reply — e.g. Qwen's ``"\\n\\n"`` when a reply that
   starts with ``"\\n"`` follows a ``"\\n"`` header — is therefore labelled with the reply; this is the only way a
   supervised token can carry characters from outside a reply. A token with an empty span counts as covering
   the character at its start.

Tokenizers without offsets (slow, Python or mistral-common backends) get the same labels from prefix encodings:
a reply starts at the first token where the encoding of the chunk up to that character stops being a prefix of
the chunk's encoding (slower: one extra call per reply boundary).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.templates import IMAGE_PLACEHOLDER, Segment, Template, Turn
from mllm_kit.errors import ConfigError

Truncation = Literal["trim", "drop"]
TRUNCATIONS = ("trim", "drop")
Range = tuple[int, int]
Key = tuple[str, tuple[Range, ...]]  # a text chunk and the supervised character ranges in it
Piece = tuple[list[int], tuple[Range, ...]]  # its ids and the [first, last) token runs that are supervised
NOMINAL_SIZE = (1024, 1024)  # (width, height) whose count estimates stand for a dynamic one
CACHE_ENTRIES = 4096  # chunks kept per encoder ...
CACHE_CHARS = 512  # ... of at most this many characters


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


def render_segments(segments: Sequence[Segment]) -> tuple[str, list[Range]]:
    """The rendered string of ``segments`` and the ``[start, end)`` character ranges of the supervised ones."""
    text: list[str] = []
    ranges: list[Range] = []
    position = 0
    for segment in segments:
        if segment.supervised and segment.text:
            if ranges and ranges[-1][1] == position:  # adjacent supervised segments form one range
                ranges[-1] = (ranges[-1][0], position + len(segment.text))
            else:
                ranges.append((position, position + len(segment.text)))
        text.append(segment.text)
        position += len(segment.text)
    return "".join(text), ranges


class ConversationEncoder:
    """Encodes turns with a template; each ``<image>`` becomes ``tokens_per_image`` image-token ids.

    ``tokens_per_image`` is N, or a function of an image's ``(width, height)`` when the count depends on the size
    (AnyRes: :meth:`MLLM.tokens_per_image`); then every encoding call takes the images' sizes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: Template, image_token_id: int,
                 tokens_per_image: int | Callable[[tuple[int, int]], int], system_prompt: str | None = None) -> None:
        self.count = tokens_per_image if callable(tokens_per_image) else None
        if self.count is None and tokens_per_image <= 0:
            raise ConfigError(f"tokens_per_image must be positive, got {tokens_per_image}.")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = int(image_token_id)
        # A dynamic count's nominal N (a square image): what estimates (length grouping, view comparisons) read.
        self.tokens_per_image = int(tokens_per_image) if self.count is None else int(self.count(NOMINAL_SIZE))
        self.system_prompt = system_prompt
        # Fast (tokenizers-backed) tokenizers give character offsets; others take the prefix-encoding route.
        self.uses_offsets = bool(getattr(tokenizer, "is_fast", False))
        # (chunk, its supervised character ranges) → (ids, supervised token runs). A chunk's tokens depend only on
        # its text, so repeated chunks (the system prompt + first user header before an image, templated
        # questions) are tokenised once. Bounded; build a new encoder if the tokenizer's vocabulary changes.
        self._cache: dict[Key, Piece] = {}
        # The tokenizers.Tokenizer that tokenizer(...) calls, used directly where that is the same (it saves the
        # BatchEncoding round trip); checked against tokenizer(...) on first use.
        self._backend = _direct_backend(tokenizer)
        self._backend_checked = False

    # -- the one tokenisation ------------------------------------------------------------------------
    def _tokenize(self, chunks: list[str], offsets: bool) -> tuple[list[list[int]], list[list[Range]] | None]:
        """Each chunk encoded whole (no BOS/EOS: the template decides those), as ``tokenizer(chunk,
        add_special_tokens=False)`` encodes it."""
        backend = self._backend
        if (backend is not None and backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            encodings = [backend.encode(chunk, add_special_tokens=False) for chunk in chunks]
            out = [e.ids for e in encodings], ([e.offsets for e in encodings] if offsets else None)
            if self._backend_checked:
                return out
            self._backend_checked = True
            reference = self._tokenize_with_tokenizer(chunks, offsets)
            if out == reference:
                return out
            self._backend = None
            return reference
        return self._tokenize_with_tokenizer(chunks, offsets)

    def _tokenize_with_tokenizer(self, chunks: list[str], offsets: bool) -> tuple[list[list[int]], list[list[Range]] | None]:
        out = self.tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]], ([list(o) for o in out["offset_mapping"]] if offsets else None)

    @property
    def dynamic(self) -> bool:
        """Whether each image's token count depends on its size."""
        return self.count is not None

    def image_tokens(self, image_sizes: Sequence[tuple[int, int]] | None, n: int) -> list[int]:
        """The token count of each of ``n`` images (their ``(width, height)`` are needed when the count is dynamic)."""
        if self.count is None or n == 0:
            return [self.tokens_per_image] * n
        if image_sizes is None or len(image_sizes) < n:
            raise ConfigError(f"the model's visual token count depends on each image's size, but {n} <image> placeholders "
                              f"came with {0 if image_sizes is None else len(image_sizes)} image sizes.")
        return [int(self.count(tuple(size))) for size in image_sizes[:n]]

    def encode_text(self, text: str, supervised: Sequence[Range] = (), bos: bool | None = None,
                    image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """``text`` split at ``<image>``, each chunk encoded whole; tokens overlapping a ``supervised`` character
        range ``[start, end)`` get labels. ``bos`` (default: the template's ``add_bos``) prepends the BOS id.
        ``image_sizes``: each image's ``(width, height)``, for a dynamic token count."""
        bos = self.template.add_bos if bos is None else bos
        chunks = text.split(IMAGE_PLACEHOLDER)
        counts = self.image_tokens(image_sizes, len(chunks) - 1)
        keys: list[Key] = []
        start = 0
        for chunk in chunks:  # each chunk with the supervised ranges inside it, relative to the chunk
            end = start + len(chunk)
            keys.append((chunk, tuple((max(a - start, 0), min(b - start, end - start)) for a, b in supervised
                                      if a < end and b > start and a < b)))
            start = end + len(IMAGE_PLACEHOLDER)
        cache = self._cache
        missing = [key for key in keys if key[0] and key not in cache]
        found: dict[Key, Piece] = {}
        if missing:
            missing = list(dict.fromkeys(missing))
            found = dict(zip(missing, self._encode_chunks(missing), strict=True))
        ids: list[int] = []
        labels: list[int] = []
        spans: list[ImageSpan] = []
        if bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for k, key in enumerate(keys):
            if key[0]:
                piece_ids, runs = cache.get(key) or found[key]
                at = len(ids)
                ids += piece_ids
                labels += [IGNORE_INDEX] * len(piece_ids)
                for first, last in runs:
                    labels[at + first : at + last] = piece_ids[first:last]
            if k < len(keys) - 1:
                spans.append(ImageSpan(len(ids), counts[k]))
                ids += [self.image_token_id] * counts[k]
                labels += [IGNORE_INDEX] * counts[k]
        if len(cache) < CACHE_ENTRIES:
            cache.update((key, value) for key, value in found.items() if len(key[0]) <= CACHE_CHARS)
        return Encoded(ids, labels, spans)

    def _encode_chunks(self, keys: list[Key]) -> list[Piece]:
        """(ids, supervised token runs) of each (chunk, supervised character ranges in it), tokenised in one call."""
        offsets = self.uses_offsets and any(local for _, local in keys)
        chunk_ids, chunk_offsets = self._tokenize([chunk for chunk, _ in keys], offsets)
        out = []
        for j, (chunk, local) in enumerate(keys):
            piece = chunk_ids[j]
            if not local:
                runs: tuple[Range, ...] = ()
            elif chunk_offsets is not None:
                runs = _runs_from_offsets(chunk_offsets[j], local)
            else:
                runs = _runs(self._mask_from_prefixes(piece, chunk, local))
            out.append((piece, runs))
        return out

    def _mask_from_prefixes(self, piece: list[int], chunk: str, local: Sequence[Range]) -> np.ndarray:
        """Supervised tokens without offsets. For a boundary at character p, the tokens that the encoding of
        ``chunk[:p]`` shares with ``piece`` lie before p; the next one starts after p or straddles it (then it joins
        the reply)."""
        cuts = sorted({p for r in local for p in r if 0 < p < len(chunk)})
        prefixes, _ = self._tokenize([chunk[:p] for p in cuts], False) if cuts else ([], None)
        at: dict[int, tuple[int, bool]] = {}
        for p, prefix in zip(cuts, prefixes, strict=True):
            k = next((i for i, (x, y) in enumerate(zip(prefix, piece)) if x != y), min(len(prefix), len(piece)))
            at[p] = (k, k == len(prefix))
        mask = np.zeros(len(piece), dtype=bool)
        for a, b in local:
            first = 0 if a <= 0 else at[a][0]
            last = len(piece) if b >= len(chunk) else at[b][0] + (0 if at[b][1] else 1)
            mask[first:last] = True
        return mask

    def encode_segments(self, segments: Sequence[Segment], image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """Rendered ``segments`` through :meth:`encode_text`, supervised where the segments are."""
        text, supervised = render_segments(segments)
        return self.encode_text(text, supervised, image_sizes=image_sizes)

    # -- conversations -------------------------------------------------------------------------------
    def _with_system(self, turns: Sequence[Turn]) -> Sequence[Turn]:
        if self.system_prompt is None or (turns and turns[0].role == "system"):
            return turns
        return [Turn("system", self.system_prompt), *turns]

    def encode(self, turns: Sequence[Turn], image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """Training encoding: labels on assistant replies (+ stop token) only."""
        return self.encode_segments(self.template.render(self._with_system(turns), self.tokenizer), image_sizes)

    def encode_prompt(self, turns: Sequence[Turn], image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """Inference encoding of turns ending with a user turn, up to the assistant header (no labels). Its
        ids are a prefix of the training ids of any conversation that continues these turns, except when the
        reply's first token straddles the header (see the module docstring)."""
        return self.encode_segments(self.template.render_prompt(self._with_system(turns), self.tokenizer), image_sizes)

    def encode_instruction(self, turns: Sequence[Turn]) -> list[int]:
        """The first user turn's text alone (no template, no ``<image>``, no BOS), as an instance-level gate reads it
        (Octavius tokenises the first human message by itself)."""
        first = next((t.content for t in turns if t.role == "user"), "")
        return self.encode_text(" ".join(first.replace(IMAGE_PLACEHOLDER, " ").split()), bos=False).input_ids

    def stop_token_ids(self) -> list[int]:
        ids = []
        for s in self.template.stop_strings(self.tokenizer):
            piece = self.encode_text(s, bos=False).input_ids
            if len(piece) == 1:
                ids.append(piece[0])
        return list(dict.fromkeys(ids))


def _direct_backend(tokenizer: PreTrainedTokenizerBase):
    """The tokenizer's ``tokenizers.Tokenizer`` when ``tokenizer(...)`` is a plain call of it (a tokenizers-backed
    class that does not override how it encodes); else ``None``."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, name, None) is not getattr(TokenizersBackend, name, None)
           for name in ("__call__", "_encode_plus", "_batch_encode_plus", "encode", "tokenize")):
        return None
    return getattr(tokenizer, "backend_tokenizer", None)


def _runs_from_offsets(offsets: list[Range], local: Sequence[Range]) -> tuple[Range, ...]:
    """``[first, last)`` runs of a chunk's supervised tokens: those whose character span overlaps a supervised
    range. An empty span counts as covering the character at its start."""
    starts = [a for a, _ in offsets]
    ends = [b if b > a else a + 1 for a, b in offsets]
    if starts != sorted(starts) or ends != sorted(ends):  # never seen; keep the rule without the binary search
        mask = np.zeros(len(offsets), dtype=bool)
        start, end = np.asarray(starts), np.asarray(ends)
        for a, b in local:
            mask |= (start < b) & (end > a)
        return _runs(mask)
    runs: list[Range] = []
    for a, b in local:
        first, last = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)  # tokens ending after a, starting before b
        if first < last:
            if runs and runs[-1][1] >= first:
                runs[-1] = (runs[-1][0], max(runs[-1][1], last))
            else:
                runs.append((first, last))
    return tuple(runs)


def _runs(mask: np.ndarray | None) -> tuple[Range, ...]:
    """``[first, last)`` token index runs where ``mask`` is set."""
    if mask is None or not mask.any():
        return ()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return tuple(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


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


def truncate_to(encoded: Encoded, num_supervised: int, num_images: int) -> Encoded:
    """The shortest prefix of ``encoded`` that keeps its first ``num_supervised`` supervised tokens and its first
    ``num_images`` image spans whole: how a second view of a sample (a distillation teacher's, with another image-token
    count or template) is cut where :func:`truncate` cut the first, so both supervise the same reply tokens.

    Nothing after the last kept reply token or image is needed: every position a distillation term reads lies before it
    (causal attention). A cut that would fall inside a later image span moves to the span's start, as in :func:`truncate`.
    """
    supervised = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    spans = encoded.image_spans
    cut = 0  # asking for more than there is keeps everything: the caller's label check then reports the mismatch
    if num_supervised:
        cut = supervised[num_supervised - 1] + 1 if num_supervised <= len(supervised) else len(encoded)
    if num_images:
        cut = max(cut, spans[num_images - 1].end if num_images <= len(spans) else len(encoded))
    if cut >= len(encoded):
        return encoded
    for span in spans:
        if span.start < cut < span.end:
            cut = span.start
    return Encoded(encoded.input_ids[:cut], encoded.labels[:cut], [s for s in spans if s.end <= cut])
