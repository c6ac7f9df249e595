"""LLaVA-format records (JSON list or JSONL), validated when loaded so bad data fails before training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_kit.data.templates import IMAGE_PLACEHOLDER, Turn
from mllm_kit.errors import DataError, sample_ref

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Record:
    """One validated sample: image paths (relative to the image root) and its turns. A preference sample's turns end
    with the user's question and ``pair`` holds the ``(chosen, rejected)`` replies to it."""

    index: int
    id: str | None
    images: tuple[str, ...]
    turns: tuple[Turn, ...]
    source: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    pair: tuple[str, str] | None = None

    @property
    def ref(self) -> str:
        return sample_ref(self.source, self.index, self.id)

    def num_text_chars(self) -> int:
        return sum(len(t.content) for t in self.turns)


def read_json_records(path: str | Path) -> list[dict[str, Any]]:
    """Raw records from a ``.json`` list or a ``.jsonl`` file, with the line/position of any syntax error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({err.msg}).") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples (or use .jsonl with one sample per line).")
    return data


def load_records(path: str | Path) -> list[Record]:
    return [parse_record(raw, i, str(path)) for i, raw in enumerate(read_json_records(path))]


def parse_record(raw: Any, index: int, source: str) -> Record:
    """Validate one LLaVA sample: ``image`` (str or list), ``conversations`` of ``{from, value}``; a preference sample
    also has ``chosen`` and ``rejected`` replies to its last (human) turn."""
    ref = sample_ref(source, index, raw.get("id") if isinstance(raw, dict) else None)
    if not isinstance(raw, dict):
        raise DataError(f"{ref}: a sample must be a JSON object, got {type(raw).__name__}.")
    image = raw.get("image", raw.get("images"))
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = tuple(image)
    else:
        raise DataError(f"{ref}: 'image' must be a path or a list of paths.")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{ref}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
    turns = []
    for k, item in enumerate(conversations):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise DataError(f"{ref}: turn {k} must be an object with 'from' and 'value'.")
        role = ROLES.get(item["from"])
        if role is None:
            raise DataError(f"{ref}: turn {k} has from={item['from']!r}; expected one of {sorted(ROLES)}.")
        if not isinstance(item["value"], str):
            raise DataError(f"{ref}: turn {k} 'value' must be a string.")
        if role == "system" and k != 0:
            raise DataError(f"{ref}: a system turn may only come first (turn {k}).")
        turns.append(Turn(role, item["value"]))
    dialogue = [t for t in turns if t.role != "system"]
    for k, turn in enumerate(dialogue):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            raise DataError(f"{ref}: turns must alternate human/gpt starting with human; turn {k} is {turn.role}.")
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.content:
            raise DataError(f"{ref}: {IMAGE_PLACEHOLDER} may only appear in human turns (turn {k}).")
    pair = None
    if "chosen" in raw or "rejected" in raw:
        if not all(isinstance(raw.get(k), str) and raw.get(k) for k in ("chosen", "rejected")):
            raise DataError(f"{ref}: a preference sample needs both 'chosen' and 'rejected' as non-empty strings.")
        if dialogue[-1].role != "user":
            raise DataError(f"{ref}: a preference sample's conversations end with the human turn that 'chosen' and 'rejected' answer.")
        pair = (raw["chosen"], raw["rejected"])
    elif not any(t.role == "assistant" for t in dialogue):
        raise DataError(f"{ref}: the conversation has no assistant (gpt) turn, so there is nothing to learn from.")
    placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(images):
        raise DataError(
            f"{ref}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s); "
            f"put one {IMAGE_PLACEHOLDER} in the human text for each image."
        )
    extra = {k: v for k, v in raw.items() if k not in ("id", "image", "images", "conversations", "chosen", "rejected")}
    sid = raw.get("id")
    return Record(index=index, id=None if sid is None else str(sid), images=images, turns=tuple(turns), source=source, extra=extra,
                  pair=pair)
