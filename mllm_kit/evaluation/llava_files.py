"""The benchmark files of LLaVA-1.5's results table whose gold answers live in the benchmark's own release, read as
LLaVA's evaluation scripts read them (``scripts/v1_5/eval/*.sh``), as :class:`~mllm_kit.evaluation.formats.Item` objects.

* **ScienceQA** (``model_vqa_science``): ``llava_test_CQM-A.json`` (conversation records) + ``problems.json``.
* **MME** (``llava_mme.jsonl``): the question JSONL, two questions per image, gold answers from the released
  ``MME_Benchmark_release_version`` folder (``<subtask>/[questions_answers_YN/]<image>.txt``: question TAB answer).
* **SEED-Bench** (``llava-seed-bench.jsonl``): the question JSONL + ``SEED-Bench.json`` (``questions``: answer letter,
  ``data_type``).
* **TextVQA** (``llava_textvqa_val_v051_ocr.jsonl``): the question JSONL, whose ``question_id`` is the image id (so it
  repeats), + ``TextVQA_0.5.1_val.json`` (matched on image id and question, as ``llava/eval/eval_textvqa.py`` does).
* **VizWiz** (``llava_test.jsonl``-style question JSONL): gold answers inline or from VizWiz's annotations
  (``[{image, answers, answer_type}]``), matched on the image file name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from mllm_kit.data.formats import read_json_records
from mllm_kit.errors import DataError, sample_ref
from mllm_kit.evaluation.formats import (
    OPTION_LETTERS,
    SHORT_ANSWER,
    Item,
    attach_gold,
    gold_answers,
    image_list,
    load_json,
    read_questions,
)
from mllm_kit.inference import Prompt


def read_scienceqa(path: str | Path, image_root: str | Path | None = None, problems: str | Path | None = None,
                   images_only: bool = True) -> list[Item]:
    """ScienceQA as LLaVA evaluates it (``llava/eval/model_vqa_science.py``): ``llava_test_CQM-A.json``, a JSON list of
    ``{"id", "image"?, "conversations"}``; the prompt is the first human turn with ``<image>`` removed (the image goes
    first) and trimmed. Gold from ``problems`` (default: ``problems.json`` beside the file): ``answer`` (0-based) and
    ``choices``. ``images_only``: only the questions with an image (LLaVA's ``IMG-Accuracy``, the SQA-IMG column)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    problems_path = Path(problems) if problems is not None else path.parent / "problems.json"
    if not problems_path.is_file():
        raise DataError(f"{path}: ScienceQA's gold answers are in problems.json; {str(problems_path)!r} does not exist "
                        f"(pass it with --answers scienceqa_img=PATH).")
    table = load_json(problems_path)
    if not isinstance(table, dict):
        raise DataError(f"{problems_path}: problems.json maps problem ids to {{question, choices, answer, ...}}.")
    items = []
    for index, raw in enumerate(read_json_records(path)):
        ref = sample_ref(str(path), index, raw.get("id") if isinstance(raw, dict) else None)
        turns = raw.get("conversations") if isinstance(raw, dict) else None
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if not isinstance(raw, dict) or raw.get("id") is None or not isinstance(first.get("value"), str):
            raise DataError(f"{ref}: a ScienceQA question is {{'id', 'image'?, 'conversations': [{{'from': 'human', "
                            f"'value': ...}}, ...]}} (llava_test_CQM-A.json from scripts/convert_sqa_to_llava.py).")
        if images_only and not raw.get("image"):
            continue
        pid = str(raw["id"])
        problem = table.get(pid)
        if not isinstance(problem, dict) or not isinstance(problem.get("choices"), list) or not isinstance(problem.get("answer"), int):
            raise DataError(f"{ref}: {problems_path} has no problem {pid!r} with 'choices' and an integer 'answer'.")
        choices = [str(c) for c in problem["choices"]]
        if not 0 <= problem["answer"] < len(choices) <= len(OPTION_LETTERS):
            raise DataError(f"{ref}: problem {pid!r} has answer {problem['answer']} for {len(choices)} choices.")
        text = first["value"].replace("<image>", "").strip()
        images = [root / p for p in image_list(raw.get("image"), ref)]
        items.append(Item(pid, Prompt(text, images, id=pid), [OPTION_LETTERS[problem["answer"]]],
                          dict(zip(OPTION_LETTERS, choices)), extra={"answer_index": problem["answer"]}))
    if not items:
        raise DataError(f"{path}: holds no {'questions with an image' if images_only else 'questions'}.")
    return items


MME_YES_NO = "Please answer yes or no."


def read_mme(path: str | Path, image_root: str | Path | None = None, gold: str | Path | None = None) -> list[Item]:
    """MME as LLaVA evaluates it: ``llava_mme.jsonl`` (``question_id`` = ``<subtask>/<image file>``, two questions per
    image) with the gold answers of the released benchmark folder ``gold`` (default: ``MME_Benchmark_release_version``
    beside the file), matched as LLaVA's ``convert_answer_to_mme.py`` does: on (subtask, ``<image stem>.txt``, the
    question without LLaVA's "Answer the question using a single word or phrase." and with " Please answer yes or
    no."). Gold answers given inline (``answer``) are used as they are. Each item's ``group`` is its image, whose two
    questions MME scores as a pair; ``extra["subtask"]`` is the subtask."""
    from mllm_kit.metrics.mme import MME_SUBTASKS

    path = Path(path)
    items = read_questions(path, image_root, require_answers=False, repeated_ids=True)
    if any(not item.answers for item in items):
        folder = Path(gold) if gold is not None else path.parent / "MME_Benchmark_release_version"
        table = _mme_gold(folder, path)
        for item in items:
            if not item.answers:
                item.answers = [table[_mme_key(item, table, folder)]]
    pairs: Counter = Counter()
    for item in items:
        qid = str(item.extra["question_id"])
        subtask = qid.split("/")[0] if "/" in qid else str(item.extra.get("category", ""))
        if subtask not in MME_SUBTASKS:
            raise DataError(f"{path}: question {item.id!r} is in subtask {subtask!r}, not one of MME's {', '.join(MME_SUBTASKS)} "
                            f"(the subtask is the first part of question_id, or 'category').")
        if item.answers[0].strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}: question {item.id!r} has gold answer {item.answers[0]!r}; MME's answers are Yes or No.")
        item.extra["subtask"] = subtask
        item.group = qid if qid.startswith(f"{subtask}/") else f"{subtask}/{qid}"  # the image: MME scores its two questions as a pair
        pairs[item.group] += 1
    odd = [k for k, n in pairs.items() if n != 2]
    if odd:
        raise DataError(f"{path}: MME asks two questions per image; {odd[:3]} have {[pairs[k] for k in odd[:3]]}.")
    return items


def _mme_gold(folder: Path, path: Path) -> dict[tuple[str, str, str], str]:
    """``convert_answer_to_mme.py``'s ``get_gt``: (subtask, txt file, question) → answer from every subtask folder."""
    if not folder.is_dir():
        raise DataError(f"{path}: MME's gold answers are in the released benchmark folder; {str(folder)!r} is not a "
                        f"folder (pass MME_Benchmark_release_version with --answers mme=PATH, or put 'answer' in each question).")
    table = {}
    for subtask in sorted(d for d in folder.iterdir() if d.is_dir()):
        qa = subtask / "questions_answers_YN" if (subtask / "images").is_dir() else subtask
        for txt in sorted(qa.glob("*.txt")):
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise DataError(f"{txt}, line {lineno}: expected 'question<TAB>answer', got {line!r}.")
                table[(subtask.name, txt.name, parts[0])] = parts[1]
    if not table:
        raise DataError(f"{folder}: no <subtask>/[questions_answers_YN/]*.txt question files; is it MME_Benchmark_release_version?")
    return table


def _mme_key(item: Item, table: Mapping[tuple[str, str, str], str], folder: Path) -> tuple[str, str, str]:
    qid = str(item.extra["question_id"])
    subtask, file = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
    question = item.prompt.text
    if SHORT_ANSWER in question:
        question = question.replace(SHORT_ANSWER, "").strip()
    if MME_YES_NO not in question:
        question = f"{question} {MME_YES_NO}"
        if (subtask, file, question) not in table:  # some released files put two spaces before it
            question = question.replace(f" {MME_YES_NO}", f"  {MME_YES_NO}")
    if (subtask, file, question) not in table:
        raise DataError(f"{folder}: no gold answer for question {item.id!r} ({subtask}/{file}: {question!r}).")
    return subtask, file, question


def read_seed(path: str | Path, image_root: str | Path | None = None, annotation: str | Path | None = None,
              data_types: Sequence[str] | None = None) -> list[Item]:
    """SEED-Bench as LLaVA evaluates it: ``llava-seed-bench.jsonl`` (question JSONL; video questions come with one
    frame) and the gold of ``annotation`` (default: ``SEED-Bench.json`` beside the file; its ``questions`` give
    ``question_id``, ``answer`` letter and ``data_type``), as ``scripts/convert_seed_for_submission.py`` reads it.
    Gold answers given inline (``answer``, ``data_type``) need no annotation file. ``data_types``: keep only
    those (``["image"]`` for SEED-Bench's image part). ``extra["data_type"]`` is each question's."""
    path = Path(path)
    items = read_questions(path, image_root, require_answers=False)
    if any(not item.answers for item in items):
        source = Path(annotation) if annotation is not None else path.parent / "SEED-Bench.json"
        data = load_json(source)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise DataError(f"{source}: SEED-Bench.json holds {{'questions': [{{question_id, answer, data_type, ...}}]}}.")
        table = {}
        for k, q in enumerate(data["questions"]):
            if not isinstance(q, dict) or q.get("question_id") is None or not isinstance(q.get("answer"), str):
                raise DataError(f"{sample_ref(str(source), k)}: a SEED-Bench question needs 'question_id' and 'answer'.")
            table[str(q["question_id"])] = q
        attach_gold(items, path, {k: [q["answer"]] for k, q in table.items()}, lambda i: i.id, str(source))
        for item in items:
            item.extra.setdefault("data_type", table[item.id].get("data_type"))
    if data_types is not None:
        items = [item for item in items if item.extra.get("data_type") in data_types]
        if not items:
            raise DataError(f"{path}: holds no questions of data_type {list(data_types)}.")
    return items


def textvqa_question(text: str) -> str:
    """The question ``llava/eval/eval_textvqa.py``'s ``prompt_processor`` reads from a LLaVA TextVQA prompt, lower-
    cased: the line that is not "Reference OCR token: ..." of "question / OCR tokens / instruction", the first line
    of "question / instruction", the "Question: ... Short answer:" part of an "OCR tokens: " prompt (and, beyond
    the original, a one-line prompt as it is)."""
    lines = text.split("\n")
    if text.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", text, re.DOTALL)
        question = match.group(1) if match else text
    elif "Reference OCR token: " in text and len(lines) == 3:
        question = lines[1] if text.startswith("Reference OCR token:") else lines[0]
    else:
        question = lines[0]
    return question.lower()


def textvqa_gold(items: Sequence[Item], path: str | Path, annotation: str | Path) -> list[Item]:
    """Gold answers from TextVQA's ``TextVQA_0.5.1_val.json`` (``data``: image_id, question, answers), keyed as
    ``eval_textvqa.py`` keys them: (``question_id`` of the LLaVA file, which is the image id; the lower-cased
    question of the prompt)."""
    data = load_json(Path(annotation))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{annotation}: TextVQA's annotations hold {{'data': [{{image_id, question, answers}}]}}.")
    table = {}
    for k, a in enumerate(data["data"]):
        if not isinstance(a, dict) or not isinstance(a.get("question"), str) or not isinstance(a.get("answers"), list):
            raise DataError(f"{sample_ref(str(annotation), k)}: an annotation needs 'image_id', 'question' and 'answers'.")
        table[(str(a.get("image_id")), a["question"].lower())] = [str(x) for x in a["answers"]]
    return attach_gold(items, path, table, lambda i: (str(i.extra.get("question_id", i.id)), textvqa_question(i.prompt.text)),
                       str(annotation))


def vizwiz_gold(items: Sequence[Item], path: str | Path, annotation: str | Path) -> list[Item]:
    """Gold answers and answer types from VizWiz's annotations (``Annotations/val.json``: a list of ``{image, answers:
    [{answer, answer_confidence}], answer_type, answerable}``), matched on the image file name, as VizWiz's
    evaluation keys results by ``image``."""
    data = load_json(Path(annotation))
    if not isinstance(data, list):
        raise DataError(f"{annotation}: VizWiz's annotations are a list of {{image, question, answers, answer_type}}.")
    table, types = {}, {}
    for k, a in enumerate(data):
        ref = sample_ref(str(annotation), k)
        if not isinstance(a, dict) or not isinstance(a.get("image"), str):
            raise DataError(f"{ref}: an annotation needs 'image' and 'answers'.")
        table[a["image"]] = gold_answers(a, ref)
        types[a["image"]] = a.get("answer_type")
    out = attach_gold(items, path, table, _image_name, str(annotation))
    for item in out:
        item.extra["answer_type"] = types[_image_name(item)]
    return out


def _image_name(item: Item) -> str:
    return Path(str(item.prompt.images[0])).name if item.prompt.images else ""


def read_textvqa(path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
    """TextVQA as LLaVA evaluates it: the question JSONL (its ids may repeat) with the gold answers of TextVQA's
    annotations (``answers``, else ``TextVQA_0.5.1_val.json`` beside the file) via :func:`textvqa_gold`; a question file
    with unique ids and inline answers, or a JSONL answers file, works too."""
    annotation = Path(answers) if answers is not None and _json_object_with(answers, "data") else None
    items = read_questions(path, image_root, None if annotation else answers, require_answers=False,
                           repeated_ids=annotation is not None or answers is None)
    if annotation is None and answers is None and any(not i.answers for i in items):
        annotation = Path(path).parent / "TextVQA_0.5.1_val.json"
        if not annotation.is_file():
            raise DataError(f"{path}: no gold answers; pass TextVQA's annotations with --answers textvqa="
                            f"TextVQA_0.5.1_val.json (or give 'answers' in each question).")
    if annotation is not None:
        items = textvqa_gold(items, path, annotation)
    missing = [i.id for i in items if not i.answers]
    if missing:
        raise DataError(f"{path}: questions {missing[:5]} have no gold answer; give 'answers' in each question or an "
                        f"answers file with --answers.")
    return items


def read_vizwiz(path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
    """VizWiz questions (LLaVA's question JSONL layout) with gold answers inline, in a JSONL answers file, or in
    VizWiz's annotations (``answers`` = ``Annotations/val.json``, via :func:`vizwiz_gold`)."""
    data = load_json(answers) if answers is not None and Path(answers).suffix == ".json" else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0] and "question_id" not in data[0]:
        return vizwiz_gold(read_questions(path, image_root, require_answers=False), path, answers)
    return read_questions(path, image_root, answers)


def _json_object_with(path: str | Path, key: str) -> bool:
    """Whether ``path`` is a ``.json`` file holding an object with ``key`` (e.g. TextVQA's ``{"data": [...]}``)."""
    return Path(path).suffix == ".json" and isinstance(data := load_json(path), dict) and key in data
