"""Benchmark files in the formats LLaVA's evaluation scripts read, as :class:`Item`s (a prompt plus what scores it).

* **question JSONL** (``model_vqa_loader``): one ``{"question_id", "image", "text"}`` per line; gold answers inline as
  ``answers`` (VQAv2: a list of strings or of ``{"answer": ...}``), ``answer`` or ``label`` (POPE), or in a separate
  answers file with the same ids. A LLaVA conversation record (``id``, ``image``, ``conversations``) works too: the
  prompt is the conversation up to its last human turn, the answer the reply after it.
* **MMBench TSV** (``model_vqa_mmbench``): ``index, question, hint, A..E, answer, image`` (base64); rows whose
  ``index`` differ by multiples of 10⁶ are the circular shifts of one question.
* **COCO captions** (``captions_*.json``): ``images`` + ``annotations``; one prompt per image, its captions the references.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mllm_kit.data.formats import parse_record, read_json_records
from mllm_kit.errors import DataError, sample_ref
from mllm_kit.inference import Prompt

OPTION_LETTERS = "ABCDEFGHIJ"
CIRCULAR_STRIDE = 1_000_000  # MMBench: index + k·10⁶ is the k-th circular shift of question `index`


@dataclass
class Item:
    """One question: its ``prompt``, gold ``answers`` (references), multiple-choice ``options`` (letter → text, in
    order) and ``group`` (MMBench's circular group); ``extra`` keeps the record's other fields for the output."""

    id: str
    prompt: Prompt
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_questions(path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None,
                   require_answers: bool = True) -> list[Item]:
    """Items of a question JSONL/JSON file; images resolve under ``image_root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    gold = _answers_file(answers) if answers is not None else {}
    items, seen = [], set()
    for index, raw in enumerate(read_json_records(path)):
        ref = sample_ref(str(path), index, raw.get("question_id", raw.get("id")) if isinstance(raw, dict) else None)
        if not isinstance(raw, dict):
            raise DataError(f"{ref}: a question must be a JSON object, got {type(raw).__name__}.")
        item = _conversation_item(raw, index, path, root) if "conversations" in raw else _question_item(raw, ref, root)
        if item.id in seen:
            raise DataError(f"{ref}: question id {item.id!r} appears twice; ids must be unique (predictions are keyed by them).")
        seen.add(item.id)
        if item.id in gold:
            item.answers = gold[item.id]
        if require_answers and not item.answers:
            raise DataError(f"{ref}: no gold answer; give 'answers' (list), 'answer' or 'label' in the question, or an "
                            f"answers file with this question_id.")
        items.append(item)
    if not items:
        raise DataError(f"{path}: holds no questions.")
    return items


def _question_item(raw: Mapping[str, Any], ref: str, root: Path) -> Item:
    qid = raw.get("question_id", raw.get("id"))
    if qid is None or not isinstance(raw.get("text", raw.get("question")), str):
        raise DataError(f"{ref}: a question needs 'question_id' and 'text' (LLaVA's question JSONL: "
                        f'{{"question_id": 1, "image": "x.jpg", "text": "What is ...?"}}).')
    text = raw.get("text", raw.get("question"))
    images = _image_list(raw.get("image", raw.get("images")), ref)
    # LLaVA's question files put no <image> in the text; the image goes first (Prompt does it).
    extra = {k: v for k, v in raw.items() if k not in ("question_id", "id", "text", "question", "image", "images", "answers", "answer")}
    return Item(str(qid), Prompt(text, [root / p for p in images], id=str(qid)), _gold(raw, ref), extra=extra)


def _conversation_item(raw: Mapping[str, Any], index: int, path: Path, root: Path) -> Item:
    record = parse_record(raw, index, str(path))
    turns = list(record.turns)
    system = turns.pop(0).content if turns and turns[0].role == "system" else None
    last = max(i for i, t in enumerate(turns) if t.role == "user")
    reply = next((t.content for t in turns[last + 1 :] if t.role == "assistant"), None)
    qid = record.id if record.id is not None else str(index)
    prompt = Prompt(turns[last].content, [root / p for p in record.images], tuple(turns[:last]), system, id=qid)
    answers = _gold(raw, record.ref) or ([reply] if reply is not None else [])
    return Item(qid, prompt, answers, extra=dict(record.extra))


def _gold(raw: Mapping[str, Any], ref: str) -> list[str]:
    value = raw.get("answers", raw.get("answer", raw.get("label")))
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out = [v.get("answer") if isinstance(v, dict) else v for v in values]
    if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in out):
        raise DataError(f"{ref}: answers must be strings (or VQAv2's {{'answer': ...}} objects), got {value!r}.")
    return [str(v) for v in out]


def _image_list(value: Any, ref: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{ref}: 'image' must be a path or a list of paths.")


def _answers_file(path: str | Path) -> dict[str, list[str]]:
    """``question_id`` → gold answers from a JSONL/JSON list of ``{"question_id", "answers"|"answer"|"label"}``."""
    out = {}
    for index, raw in enumerate(read_json_records(path)):
        ref = sample_ref(str(path), index)
        if not isinstance(raw, dict) or raw.get("question_id", raw.get("id")) is None:
            raise DataError(f"{ref}: an answer record needs 'question_id' and 'answers' (or 'answer'/'label').")
        gold = _gold(raw, ref)
        if not gold:
            raise DataError(f"{ref}: no 'answers', 'answer' or 'label'.")
        out[str(raw.get("question_id", raw.get("id")))] = gold
    return out


def read_mmbench(path: str | Path) -> list[Item]:
    """Items of an MMBench-style TSV; the prompt is LLaVA's: hint, question, ``A. …`` lines, then the instruction."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"bench file {str(path)!r} does not exist.")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise DataError(f"{path}: holds no rows.")
    missing = [k for k in ("index", "question", "A", "B") if k not in rows[0]]
    if missing:
        raise DataError(f"{path}: MMBench TSV columns {missing} are missing (expected index, question, hint, A, B, ..., answer, image).")
    items = []
    for k, row in enumerate(rows):
        ref = sample_ref(str(path), k, row.get("index"))
        options = {c: row[c] for c in OPTION_LETTERS if _present(row.get(c))}
        question = row["question"] if not _present(row.get("hint")) else f"{row['hint']}\n{row['question']}"
        text = question + "".join(f"\n{c}. {v}" for c, v in options.items())
        images = [_decode_base64(row["image"], ref)] if _present(row.get("image")) else []
        try:
            index = int(float(row["index"]))
        except ValueError:
            raise DataError(f"{ref}: 'index' must be an integer, got {row['index']!r}.") from None
        answer = row.get("answer")
        if _present(answer) and answer not in options:
            raise DataError(f"{ref}: answer {answer!r} is not one of the options {list(options)}.")
        items.append(Item(str(index), Prompt(text, images, id=str(index)), [answer] if _present(answer) else [], options,
                          group=str(index % CIRCULAR_STRIDE), extra={"category": row.get("category")}))
    return items


def _present(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and value.strip().lower() != "nan"


def _decode_base64(data: str, ref: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    except Exception as err:  # binascii.Error, PIL's UnidentifiedImageError, ...
        raise DataError(f"{ref}: the 'image' column is not a base64-encoded image ({type(err).__name__}).") from None


def read_coco_captions(path: str | Path, image_root: str | Path | None = None, prompt: str = "") -> list[Item]:
    """One item per image of a COCO captions file; its captions are the references."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise DataError(f"bench file {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: a COCO captions file is an object with 'images' [{{id, file_name}}] and "
                        f"'annotations' [{{image_id, caption}}].")
    captions: dict[str, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{k}] needs 'image_id' and 'caption'.")
        captions.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    items = []
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"{path}: images[{k}] needs 'id' and 'file_name'.")
        iid = str(image["id"])
        if iid not in captions:
            raise DataError(f"{path}: image {iid} ({image['file_name']}) has no caption in 'annotations'.")
        items.append(Item(iid, Prompt(prompt, [root / image["file_name"]], id=iid), captions[iid]))
    return items


def with_suffix(items: Sequence[Item], suffix: str) -> list[Item]:
    """Append a bench's answer instruction (e.g. "Answer the question using a single word or phrase.") to each prompt."""
    if not suffix:
        return list(items)
    for item in items:
        item.prompt.text = f"{item.prompt.text}\n{suffix}" if item.prompt.text else suffix
    return list(items)
