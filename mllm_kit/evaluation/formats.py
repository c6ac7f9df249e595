"""Benchmark files in the formats LLaVA's evaluation scripts read, as :class:`Item`s (a prompt plus what scores it).

* **question JSONL** (``model_vqa_loader``): one ``{"question_id", "image", "text"}`` per line; gold answers inline as
  ``answers`` (VQAv2: a list of strings or of ``{"answer": ...}``), ``answer`` or ``label`` (POPE), or in a separate
  answers file with the same ids. A LLaVA conversation record (``id``, ``image``, ``conversations``) works too: the
  prompt is the conversation up to its last human turn, the answer the reply after it.
  Gold answers files: that JSONL/JSON list, VQAv2's official annotations (``{"annotations": [{question_id,
  answers}]}``) or GQA's questions file (``{question_id: {"answer": ...}}``).
* **MMBench TSV** (``model_vqa_mmbench``): ``index, question, hint, A..E, answer, image`` (base64). Each question is
  asked once per circular shift of its options (LLaVA's ``--all-rounds``); rows whose ``index`` differ by multiples
  of 10⁶ are the shifts of one question, either generated here or, in MMBench's released files, already there.
* **COCO captions** (``captions_*.json``): ``images`` + ``annotations``; one prompt per image, its captions the references.

The files whose gold answers live in a benchmark's own release (ScienceQA, MME, SEED-Bench, TextVQA, VizWiz) are read
by :mod:`mllm_kit.evaluation.llava_files`.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mllm_kit.data.formats import parse_record, read_json_records
from mllm_kit.errors import DataError, sample_ref
from mllm_kit.inference import Prompt

OPTION_LETTERS = "ABCDEFGHIJ"
# LLaVA-1.5's answer instructions (llava/eval scripts; most of LLaVA's question files already end with theirs)
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"  # model_vqa_mmbench.py --lang cn (scripts/v1_5/eval/mmbench_cn.sh)
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
                   require_answers: bool = True, repeated_ids: bool = False) -> list[Item]:
    """Items of a question JSONL/JSON file; images resolve under ``image_root`` (default: the file's folder).

    ``repeated_ids``: the file may repeat a ``question_id`` (LLaVA's MME and TextVQA files use the image as the id);
    the k-th repeat (k ≥ 1) gets the id ``<question_id>#<k>`` and every item keeps the file's id in
    ``extra["question_id"]``. Otherwise a repeated id is a :class:`DataError` (predictions are keyed by id)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    gold = _answers_file(answers) if answers is not None else {}
    items, seen, repeats = [], set(), Counter()
    for index, raw in enumerate(read_json_records(path)):
        ref = sample_ref(str(path), index, raw.get("question_id", raw.get("id")) if isinstance(raw, dict) else None)
        if not isinstance(raw, dict):
            raise DataError(f"{ref}: a question must be a JSON object, got {type(raw).__name__}.")
        item = _conversation_item(raw, index, path, root) if "conversations" in raw else _question_item(raw, ref, root)
        qid = item.id
        if repeated_ids:
            item.extra["question_id"] = qid
            if repeats[qid]:
                item.id = item.prompt.id = f"{qid}#{repeats[qid]}"
            repeats[qid] += 1
        if item.id in seen:
            raise DataError(f"{ref}: question id {item.id!r} appears twice; ids must be unique (predictions are keyed by them).")
        seen.add(item.id)
        if qid in gold:
            if repeated_ids and repeats[qid] > 1:
                raise DataError(f"{ref}: question id {qid!r} repeats, so an answers file keyed by question_id cannot tell "
                                f"its questions apart; give the answers inline or use the bench's annotation file.")
            item.answers = gold[qid]
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
    images = image_list(raw.get("image", raw.get("images")), ref)
    # LLaVA's question files put no <image> in the text; the image goes first (Prompt does it).
    extra = {k: v for k, v in raw.items() if k not in ("question_id", "id", "text", "question", "image", "images", "answers", "answer")}
    return Item(str(qid), Prompt(text, [root / p for p in images], id=str(qid)), gold_answers(raw, ref), extra=extra)


def _conversation_item(raw: Mapping[str, Any], index: int, path: Path, root: Path) -> Item:
    record = parse_record(raw, index, str(path))
    turns = list(record.turns)
    system = turns.pop(0).content if turns and turns[0].role == "system" else None
    last = max(i for i, t in enumerate(turns) if t.role == "user")
    reply = next((t.content for t in turns[last + 1 :] if t.role == "assistant"), None)
    qid = record.id if record.id is not None else str(index)
    prompt = Prompt(turns[last].content, [root / p for p in record.images], tuple(turns[:last]), system, id=qid)
    answers = gold_answers(raw, record.ref) or ([reply] if reply is not None else [])
    return Item(qid, prompt, answers, extra=dict(record.extra))


def gold_answers(raw: Mapping[str, Any], ref: str) -> list[str]:
    value = raw.get("answers", raw.get("answer", raw.get("label")))
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out = [v.get("answer") if isinstance(v, dict) else v for v in values]
    if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in out):
        raise DataError(f"{ref}: answers must be strings (or VQAv2's {{'answer': ...}} objects), got {value!r}.")
    return [str(v) for v in out]


def image_list(value: Any, ref: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{ref}: 'image' must be a path or a list of paths.")


def _answers_file(path: str | Path) -> dict[str, list[str]]:
    """``question_id`` → gold answers from a JSONL/JSON list of ``{"question_id", "answers"|"answer"|"label"}``,
    VQAv2's official annotations (``{"annotations": [...]}``, same records) or GQA's questions file
    (``{question_id: {"answer": ...}}``)."""
    path = Path(path)
    data = load_json(path) if path.suffix == ".json" else None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        records = data["annotations"]
    elif isinstance(data, dict):
        records = [{"question_id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    else:
        records = read_json_records(path)
    out = {}
    for index, raw in enumerate(records):
        ref = sample_ref(str(path), index)
        if not isinstance(raw, dict) or raw.get("question_id", raw.get("id")) is None:
            raise DataError(f"{ref}: an answer record needs 'question_id' and 'answers' (or 'answer'/'label').")
        gold = gold_answers(raw, ref)
        if not gold:
            raise DataError(f"{ref}: no 'answers', 'answer' or 'label'.")
        out[str(raw.get("question_id", raw.get("id")))] = gold
    return out


def load_json(path: str | Path) -> Any:
    """A ``.json`` file's content; a :class:`DataError` naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}).") from None


def attach_gold(items: Sequence[Item], path: str | Path, gold: Mapping[str, list[str]], key: Callable[[Item], str],
                source: str) -> list[Item]:
    """Set each item's answers to ``gold[key(item)]``; a :class:`DataError` naming the first items ``source`` (the
    gold file) has no answer for."""
    missing = [item.id for item in items if key(item) not in gold]
    if missing:
        raise DataError(f"{path}: {len(missing)} question(s) have no gold answer in {source} (first: "
                        f"{[key(i) for i in items if i.id in set(missing[:3])]}); is it the annotation file of the same split?")
    for item in items:
        item.answers = list(gold[key(item)])
    return list(items)


def read_mmbench(path: str | Path, rotate: bool = True) -> list[Item]:
    """Items of an MMBench-style TSV; the prompt is LLaVA's (``llava/eval/model_vqa_mmbench.py``): hint, question,
    ``A. …`` lines, then the instruction.

    ``rotate``: every question is asked once per circular shift of its options, as LLaVA's ``--all-rounds`` does (round
    r shows options r, r+1, ... under the letters A, B, ...; the gold letter moves with its option), and the items of
    one question share ``group`` (its index) so a question counts only when every shift is right. Round r of
    question i has the id ``i + r·10⁶``, MMBench's own numbering of circular passes. A file that already holds those
    passes (rows with index ≥ 10⁶, as MMBench's released dev/test TSVs do) is used as it is; each of its questions must
    then have one row per option, all showing the same options and the same gold option, else a :class:`DataError`.
    Options must run from A without a gap (LLaVA stops reading at the first empty one), and a gold answer must be one
    of them. ``rotate=False``: one item per row, grouped by ``index mod 10⁶``."""
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
    questions = [_mmbench_row(row, sample_ref(str(path), k, row.get("index"))) for k, row in enumerate(rows)]
    has_passes = any(q["index"] >= CIRCULAR_STRIDE for q in questions)
    if not rotate or has_passes:
        if rotate:
            _check_circular_passes(questions, path)
        return [_mmbench_item(q, q["index"], q["options"], q["answer"]) for q in questions]
    items = []
    for q in questions:
        texts, n = list(q["options"].values()), len(q["options"])
        gold = OPTION_LETTERS.index(q["answer"]) if q["answer"] else None
        for r in range(n):  # model_vqa_mmbench.py: options = options[1:] + options[:1] after each round
            shown = dict(zip(OPTION_LETTERS, texts[r:] + texts[:r]))
            answer = OPTION_LETTERS[(gold - r) % n] if gold is not None else None
            items.append(_mmbench_item(q, q["index"] + r * CIRCULAR_STRIDE, shown, answer))
    return items


def _mmbench_row(row: Mapping[str, Any], ref: str) -> dict[str, Any]:
    letters = [c for c in OPTION_LETTERS if _present(row.get(c))]
    if letters != list(OPTION_LETTERS[: len(letters)]):
        raise DataError(f"{ref}: options {letters} do not run from A without a gap; LLaVA reads options up to the first "
                        f"empty one, so the rotations of this question are undefined. Fill or move the options.")
    try:
        index = int(float(row["index"]))
    except ValueError:
        raise DataError(f"{ref}: 'index' must be an integer, got {row['index']!r}.") from None
    options = {c: row[c] for c in letters}
    answer = row.get("answer") if _present(row.get("answer")) else None
    if answer is not None and answer not in options:
        raise DataError(f"{ref}: answer {answer!r} is not one of the options {list(options)}.")
    question = row["question"] if not _present(row.get("hint")) else f"{row['hint']}\n{row['question']}"
    image = _decode_base64(row["image"], ref) if _present(row.get("image")) else None
    return {"ref": ref, "index": index, "question": question, "options": options, "answer": answer, "image": image,
            "category": row.get("category")}


def _mmbench_item(q: Mapping[str, Any], index: int, options: dict[str, str], answer: str | None) -> Item:
    text = q["question"] + "".join(f"\n{c}. {v}" for c, v in options.items())
    images = [q["image"]] if q["image"] is not None else []
    return Item(str(index), Prompt(text, images, id=str(index)), [answer] if answer else [], options,
                group=str(index % CIRCULAR_STRIDE), extra={"category": q["category"]})


def _check_circular_passes(questions: Sequence[Mapping[str, Any]], path: Path) -> None:
    """MMBench's released passes: per question, one row per option, each showing the same options and gold option."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for q in questions:
        groups.setdefault(q["index"] % CIRCULAR_STRIDE, []).append(q)
    for index, rows in groups.items():
        first = rows[0]
        gold = {r["options"].get(r["answer"]) for r in rows} if all(r["answer"] for r in rows) else None
        same = all(sorted(r["options"].values()) == sorted(first["options"].values()) for r in rows)
        if len(rows) != len(first["options"]) or not same or (gold is not None and len(gold) != 1):
            raise DataError(f"{path}: question {index} has {len(rows)} circular pass(es) for {len(first['options'])} "
                            f"options{'' if same else ' with different option texts'}"
                            f"{'' if gold is None or len(gold) == 1 else ' with different gold options'}; a file with "
                            f"passes (index ≥ 10⁶) needs one row per option per question, each a shift of the same "
                            f"question. Give one row per question instead and they are generated.")


# LLaVA (and VLMEvalKit) load the TSV with pandas, whose default NA strings make a cell empty; LLaVA's ``is_none`` also
# takes "nan" and "none" in any case. A hint or option written so is absent, as there.
_PANDAS_NA = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
                        "NULL", "NaN", "None", "n/a", "nan", "null"})


def _present(value: Any) -> bool:
    return isinstance(value, str) and value not in _PANDAS_NA and value.strip().lower() not in ("", "nan", "none")


def _decode_base64(data: str, ref: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    except Exception as err:  # noqa: BLE001 - binascii.Error, PIL's UnidentifiedImageError, ...: all mean a bad column
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
    """Append a bench's answer instruction (e.g. "Answer the question using a single word or phrase.") to each prompt
    that does not already end with it: LLaVA's question files (``llava_vqav2_*.jsonl``, ``llava_pope_test.jsonl``,
    ``llava_mme.jsonl``, ...) carry it in their ``text``, and it must not be asked twice."""
    if not suffix:
        return list(items)
    for item in items:
        if not item.prompt.text.endswith(suffix):
            item.prompt.text = f"{item.prompt.text}\n{suffix}" if item.prompt.text else suffix
    return list(items)


def take(items: Sequence[Item], limit: int | None) -> list[Item]:
    """The items of the first ``limit`` questions (``--limit``, ``eval.bench_limit``): items that share a ``group``
    (MMBench's circular shifts, MME's image pairs) count once and are kept or dropped together."""
    if limit is None:
        return list(items)
    groups: dict[Any, int] = {}
    for k, item in enumerate(items):
        key = item.group if item.group is not None else ("item", k)
        groups.setdefault(key, len(groups))
    return [item for k, item in enumerate(items) if groups[item.group if item.group is not None else ("item", k)] < limit]
