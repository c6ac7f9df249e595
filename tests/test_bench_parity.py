"""Parity with a scorer no one here wrote: every bench that lmms-eval also has scores the same fixture predictions as
lmms-eval's own task functions do.

lmms-eval (0.7.3, the ``dev`` extra) is imported once for the module. Each of its tasks is built from its own YAML
(``lmms_eval.utils.load_yaml_config``) as a ``ConfigurableTask`` whose ``download`` is replaced by the fixture documents
(offline; ``process_docs``, which only loads images, is dropped), and the fixtures are scored through
``ConfigurableTask.process_results`` and the task's aggregation functions, as lmms-eval's evaluator calls them. The
mllm-kit side reads the files LLaVA's scripts read and scores through the bench (``Bench.update`` + ``Bench.compute``).

Where lmms-eval deviates from the official scorer (LLaVA's scripts, the benchmark's own evaluator), mllm-kit follows the
official one; scores are compared with ``==`` (they are bit-identical). Those fixtures are kept apart (``*_DIFFERS``) and the test asserts both values, so the known difference is
pinned (docs/evaluation.md lists each). MMBench: lmms-eval's GPT matcher needs an API key, so the comparison is with its
rule-based path (``mmbench_en_dev_static``: the same rules, then ``extract_mcq_answer`` instead of GPT).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import shutil
import types
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'mllm-kit[dev]')")

import datasets
import lmms_eval
import lmms_eval.api.metrics  # registers exact_match, anls, mean, ... that the task YAMLs name
from bench_files import MMB_HEADER, mmb_row
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.utils import load_yaml_config

from mllm_kit.evaluation.benches import get_bench
from mllm_kit.evaluation.formats import read_coco_captions, read_questions

TASKS = Path(lmms_eval.__file__).parent / "tasks"


def lmms_scores(yaml: str, docs: list[dict], predictions: list[str], out, metrics=None) -> dict[str, float]:
    """lmms-eval's scores of ``predictions`` on ``docs``: ``process_results`` per document, then each metric's
    aggregation (given ``args`` where it asks for them)."""
    config = load_yaml_config(str(TASKS / yaml))
    config.pop("process_docs", None)
    split = config["test_split"]

    class OfflineTask(ConfigurableTask):
        def download(self, dataset_kwargs=None) -> None:
            self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})

    task = OfflineTask(config=config)
    values: dict[str, list] = {}
    for doc, prediction in zip(task.test_docs(), predictions, strict=True):
        for metric, value in task.process_results(doc, [prediction]).items():
            values.setdefault(metric, []).append(value)
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for metric, items in values.items():
            if metrics is not None and metric not in metrics:
                continue
            aggregate = task.aggregation()[metric]
            args = {"args": types.SimpleNamespace(output_path=str(out))} if "args" in inspect.signature(aggregate).parameters else {}
            scores[metric] = float(aggregate(items, **args))
    return scores


def mllm_scores(bench: str, items, predictions: list[str]) -> dict[str, float]:
    b = get_bench(bench)
    metric = b.metric(items)
    b.update(metric, items, predictions)
    return b.compute(metric)


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- VQAv2 ----------------------------------------------------------------------------------------------------------

VQA_AGREES = [
    ("Yes", ["yes"] * 10),                       # case (unanimous answers)
    ("Two", ["2"] * 4 + ["3"] * 6),               # number word
    ("a dog", ["dog"] * 3 + ["cat"] * 7),         # article
    ("yes!", ["yes"] * 2 + ["no"] * 8),           # punctuation
    ("1,000", ["1000"] * 5 + ["100"] * 5),        # digit-comma-digit
    ("", ["yes"] * 10),                           # empty answer
    ("red", ["blue"] * 10),
]
# (prediction, human answers, official score, lmms-eval's score). LLaVA submits EvalAIAnswerProcessor(answer) and the
# VQA server's vqaEval.py compares unanimous human answers raw; lmms-eval normalises the human answers always and does
# not apply the processor's "'s" split.
VQA_DIFFERS = [("two", ["Two"] * 10, 0.0, 1.0), ("dog's", ["dog's"] * 10, 0.0, 1.0)]


def _vqa_docs(rows):
    return [{"question_id": k, "question": "Q?", "answer": a[0], "answers": [{"answer": x, "answer_id": i} for i, x in enumerate(a)]}
            for k, (_, a, *_) in enumerate(rows)]


def _vqa_items(tmp_path, rows, name="vqa.jsonl", **extra):
    path = tmp_path / name
    _jsonl(path, [{"question_id": k, "image": "a.jpg", "text": "Q?", "answers": list(a), **extra} for k, (_, a, *_) in enumerate(rows)])
    return read_questions(path)


def test_vqav2_equals_lmms_eval(tmp_path):
    ours = mllm_scores("vqav2", _vqa_items(tmp_path, VQA_AGREES), [p for p, _ in VQA_AGREES])
    theirs = lmms_scores("vqav2/vqav2_val.yaml", _vqa_docs(VQA_AGREES), [p for p, _ in VQA_AGREES], tmp_path)
    assert ours["accuracy"] == theirs["exact_match"] and ours["accuracy"] == pytest.approx((1 + 1 + 0.9 + 0.6 + 1) / 7)
    for prediction, answers, official, lmms in VQA_DIFFERS:
        rows = [(prediction, answers)]
        assert mllm_scores("vqav2", _vqa_items(tmp_path, rows), [prediction])["accuracy"] == official
        assert lmms_scores("vqav2/vqav2_val.yaml", _vqa_docs(rows), [prediction], tmp_path)["exact_match"] == lmms


# ---- TextVQA ---------------------------------------------------------------------------------------------------------

TEXTVQA_AGREES = [*VQA_AGREES, ("two", ["Two"] * 10), ("dog's", ["dog's"] * 10), ("The Dakota.", ["dakota"] * 3 + ["kodak"] * 7)]


def test_textvqa_equals_lmms_eval(tmp_path):
    """m4c's TextVQAAccuracyEvaluator (LLaVA's eval_textvqa.py) = lmms-eval's textvqa: EvalAI's processor on both sides."""
    ours = mllm_scores("textvqa", _vqa_items(tmp_path, TEXTVQA_AGREES), [p for p, _ in TEXTVQA_AGREES])
    docs = [{"question_id": k, "question": "Q?", "answer": a[0], "answers": list(a)} for k, (_, a) in enumerate(TEXTVQA_AGREES)]
    theirs = lmms_scores("textvqa/textvqa_val.yaml", docs, [p for p, _ in TEXTVQA_AGREES], tmp_path, ["exact_match"])
    assert ours["accuracy"] == theirs["exact_match"] and ours["accuracy"] > 0.5


# ---- VizWiz ----------------------------------------------------------------------------------------------------------

VIZWIZ_AGREES = [("Unanswerable", ["unanswerable"] * 10), ("2", ["2"] * 3 + ["3"] * 7), ("", ["unanswerable"] * 10),
                 ("Red.", ["red"] * 10), ("two", ["2"] * 10), ("unanswerable", ["unanswerable"] * 6 + ["red"] * 4)]
# The VizWiz evaluation compares the human answers raw; lmms-eval runs them through EvalAI's processor.
VIZWIZ_DIFFERS = [("coca cola", ["Coca-Cola"] * 10, 0.0, 1.0)]


def test_vizwiz_equals_lmms_eval(tmp_path):
    def docs(rows):
        return [{"question_id": f"VizWiz_val_{k}", "question": "Q?", "answer": a[0], "answers": list(a), "category": "other"}
                for k, (_, a, *_) in enumerate(rows)]

    ours = mllm_scores("vizwiz", _vqa_items(tmp_path, VIZWIZ_AGREES), [p for p, _ in VIZWIZ_AGREES])
    theirs = lmms_scores("vizwiz_vqa/vizwiz_vqa_val.yaml", docs(VIZWIZ_AGREES), [p for p, _ in VIZWIZ_AGREES], tmp_path,
                         ["exact_match"])
    assert ours["accuracy"] == theirs["exact_match"] and ours["accuracy"] == pytest.approx((1 + 0.9 + 0 + 1 + 1 + 1) / 6)
    for prediction, answers, official, lmms in VIZWIZ_DIFFERS:
        rows = [(prediction, answers)]
        assert mllm_scores("vizwiz", _vqa_items(tmp_path, rows), [prediction])["accuracy"] == official
        assert lmms_scores("vizwiz_vqa/vizwiz_vqa_val.yaml", docs(rows), [prediction], tmp_path, ["exact_match"])["exact_match"] == lmms


# ---- GQA -------------------------------------------------------------------------------------------------------------

GQA_AGREES = [("Yes.", "yes"), ("left", "left"), ("Left", "left"), ("the dog", "dog"), ("", "yes"), ("T-shirt", "t-shirt")]
# LLaVA's convert_gqa_for_eval.py only drops trailing periods and lower-cases; lmms-eval deletes every punctuation mark.
GQA_DIFFERS = [("tshirt", "t-shirt", 0.0, 1.0), ("yes!", "yes", 0.0, 1.0)]


def test_gqa_equals_lmms_eval(tmp_path):
    def run(rows):
        path = tmp_path / "gqa.jsonl"
        _jsonl(path, [{"question_id": k, "image": "a.jpg", "text": "Q?", "answer": g} for k, (_, g, *_) in enumerate(rows)])
        ours = mllm_scores("gqa", read_questions(path), [p for p, *_ in rows])["accuracy"]
        docs = [{"question": "Q?", "answer": g, "imageId": str(k)} for k, (_, g, *_) in enumerate(rows)]
        return ours, lmms_scores("gqa/gqa.yaml", docs, [p for p, *_ in rows], tmp_path)["exact_match"]

    ours, theirs = run(GQA_AGREES)
    assert ours == theirs and ours == pytest.approx(4 / 6)
    for row in GQA_DIFFERS:
        assert run([row]) == (row[2], row[3])


# ---- DocVQA ----------------------------------------------------------------------------------------------------------

DOCVQA_AGREES = [(" Hello  World ", ["hello world"]), ("hallo", ["hello"]), ("ab", ["ax"]), ("abc", ["xyz"]), ("", ["a"]),
                 ("abcd", ["wxyz", "abcx", "ab"]), ("  hallo  ", ["hello"])]


def test_docvqa_equals_lmms_eval(tmp_path):
    path = tmp_path / "docvqa.jsonl"
    _jsonl(path, [{"question_id": k, "image": "a.jpg", "text": "Q?", "answers": a} for k, (_, a) in enumerate(DOCVQA_AGREES)])
    ours = mllm_scores("docvqa", read_questions(path), [p for p, _ in DOCVQA_AGREES])
    docs = [{"questionId": k, "question": "Q?", "answers": a} for k, (_, a) in enumerate(DOCVQA_AGREES)]
    theirs = lmms_scores("docvqa/docvqa_val.yaml", docs, [p for p, _ in DOCVQA_AGREES], tmp_path)
    assert ours["anls"] == theirs["anls"] and ours["anls"] == pytest.approx((1 + 0.8 + 0.5 + 0 + 0 + 0.75 + 0.8) / 7)


# ---- POPE ------------------------------------------------------------------------------------------------------------

POPE_KEYS = {"accuracy": "pope_accuracy", "precision": "pope_precision", "recall": "pope_recall", "f1": "pope_f1_score",
             "yes_ratio": "pope_yes_ratio"}


def _pope(tmp_path, predictions, labels, categories=None):
    path = tmp_path / "pope.jsonl"
    _jsonl(path, [{"question_id": k, "image": "a.jpg", "text": "Is there a dog?", "label": lab,
                   **({"category": categories[k]} if categories else {})} for k, lab in enumerate(labels)])
    ours = mllm_scores("pope", read_questions(path), predictions)
    docs = [{"question_id": k, "question": "Is there a dog?", "answer": lab, "category": categories[k] if categories else "x"}
            for k, lab in enumerate(labels)]
    return ours, lmms_scores("pope/pope.yaml", docs, predictions, tmp_path)


def test_pope_equals_lmms_eval(tmp_path):
    # one-word answers, as many predicted "yes" as gold "yes" (lmms-eval's yes_ratio is the gold one; see below)
    ours, theirs = _pope(tmp_path, ["Yes", "no", "No", "yes"], ["yes", "no", "yes", "no"])
    assert all(ours[k] == theirs[v] for k, v in POPE_KEYS.items()) and ours["f1"] == 0.5
    # POPE's rule reads the first sentence for "no"/"not" (anything else is yes); lmms-eval needs exactly "yes"/"no"
    ours, theirs = _pope(tmp_path, ["Yes, there is a dog.", "There is no dog.", "", "no"], ["yes", "no", "no", "yes"])
    assert (ours["accuracy"], theirs["pope_accuracy"]) == (0.5, 0.0)
    # lmms-eval's yes_ratio is the share of gold "yes"; POPE's is the share of predicted "yes"
    ours, theirs = _pope(tmp_path, ["yes", "yes", "yes", "no"], ["yes", "no", "no", "no"])
    assert (ours["yes_ratio"], theirs["pope_yes_ratio"]) == (0.75, 0.25)
    # LLaVA's eval_pope.py scores each category (LLaVA-1.5: the mean F1); lmms-eval pools them
    ours, theirs = _pope(tmp_path, ["yes", "yes", "yes", "no"], ["yes", "no", "yes", "no"],
                         ["adversarial", "adversarial", "random", "random"])
    assert ours["f1"] == pytest.approx((2 / 3 + 1) / 2) and theirs["pope_f1_score"] == pytest.approx(0.8)


# ---- MMBench ---------------------------------------------------------------------------------------------------------

MMB_OPTIONS = ["red", "blue", "green", "pink"]
# one row per question; the gold option, then the answer given to each of its 4 rotations (LLaVA's --all-rounds)
MMB_AGREES = [
    ("B", ["B", "(A)", "The answer is D", "C. blue"]),      # right in every rotation, in four answer styles
    ("A", ["A", "D", "", "B"]),                              # one rotation unanswered: the question is wrong
    ("C", ["It is green.", "B", "A", "D"]),                  # the option's text counts
    ("D", ["D", "C", "B", "B"]),                             # one rotation wrong
]
# An ambiguous answer: MMBench's rules (VLMEvalKit can_infer) find no option, so without the GPT matcher it is wrong;
# lmms-eval's static path falls back to extract_mcq_answer, which picks B.
MMB_DIFFERS = [("B", ["B or C", "A", "D", "C"], 0.0, 100.0)]


def _mmbench(tmp_path, rows):
    path = tmp_path / "mmbench.tsv"
    path.write_text(MMB_HEADER + "".join(mmb_row(k, MMB_OPTIONS, gold) for k, (gold, _) in enumerate(rows)))
    items = get_bench("mmbench").read(path)
    predictions = [p for _, answers in rows for p in answers]
    ours = mllm_scores("mmbench", items, predictions)
    docs = [{"index": int(i.id), "question": "Which colour?", "hint": "Look closely.", **i.options, "E": None,
             "answer": i.answers[0], "category": "colour", "L2-category": "l2", "source": "s", "split": "dev"} for i in items]
    theirs = lmms_scores("mmbench/mmbench_en_dev_static.yaml", docs, predictions, tmp_path, ["gpt_eval_score"])
    return ours, theirs["gpt_eval_score"]


def test_mmbench_circular_equals_lmms_eval_rule_based(tmp_path):
    ours, theirs = _mmbench(tmp_path, MMB_AGREES)
    assert ours["accuracy"] * 100 == theirs and ours["accuracy"] == 0.5     # lmms-eval reports ×100
    for gold, answers, official, lmms in MMB_DIFFERS:
        ours, theirs = _mmbench(tmp_path, [(gold, answers)])
        assert (ours["accuracy"] * 100, theirs) == (official, lmms)


# ---- ScienceQA-IMG ---------------------------------------------------------------------------------------------------

SQA_AGREES = [("B", 1, 2), ("B", 0, 2), ("C. green", 2, 3), ("", 0, 3), ("A. dog", 0, 2)]
# eval_science_qa.py: exact letter, "X. " or "The answer is X."; lmms-eval: case-insensitive letter or "X." at the start
SQA_DIFFERS = [("b", 1, 2, 0.0, 1.0), ("The answer is B.", 1, 2, 1.0, 0.0), ("B.cat", 1, 2, 0.0, 1.0)]


def _scienceqa(tmp_path, rows):
    choices = ["red", "blue", "green"]
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([{"id": str(k), "image": f"{k}/image.png",
                                 "conversations": [{"from": "human", "value": "Which?\n<image>"}, {"from": "gpt", "value": "A"}]}
                                for k in range(len(rows))]))
    (tmp_path / "problems.json").write_text(json.dumps({str(k): {"choices": choices[:n], "answer": g}
                                                       for k, (_, g, n, *_) in enumerate(rows)}))
    ours = mllm_scores("scienceqa_img", get_bench("scienceqa_img").read(path), [p for p, *_ in rows])["accuracy"]
    docs = [{"question": "Which?", "hint": "", "choices": choices[:n], "answer": g, "image": None} for _, g, n, *_ in rows]
    return ours, lmms_scores("scienceqa/scienceqa_img.yaml", docs, [p for p, *_ in rows], tmp_path)["exact_match"]


def test_scienceqa_img_equals_lmms_eval(tmp_path):
    ours, theirs = _scienceqa(tmp_path, SQA_AGREES)
    assert ours == theirs and ours == pytest.approx(3 / 5)
    for row in SQA_DIFFERS:
        assert _scienceqa(tmp_path, [row]) == row[3:]


# ---- MME -------------------------------------------------------------------------------------------------------------

# (subtask, image, gold, answer): two questions per image
MME_AGREES = [("existence", "a", "Yes", "Yes"), ("existence", "a", "No", "No"), ("count", "b", "Yes", "yes."),
              ("count", "b", "No", "Not really"), ("code_reasoning", "c", "Yes", ""), ("code_reasoning", "c", "No", "No")]
# calculation.py reads "y"/"n" as "other" (never right); lmms-eval's parser maps them to yes/no
MME_DIFFERS = [("existence", "a", "Yes", "y"), ("existence", "a", "No", "n")]


def _mme(tmp_path, rows):
    path = tmp_path / "llava_mme.jsonl"
    _jsonl(path, [{"question_id": f"{s}/{im}.png", "image": f"{s}/{im}.png", "answer": g,
                   "text": f"Question {k}? Please answer yes or no.\nAnswer the question using a single word or phrase."}
                  for k, (s, im, g, _) in enumerate(rows)])
    ours = mllm_scores("mme", get_bench("mme").read(path), [p for *_, p in rows])
    docs = [{"question_id": f"{s}/{im}.png", "question": f"Question {k}? Please answer yes or no.", "answer": g, "category": s}
            for k, (s, im, g, _) in enumerate(rows)]
    theirs = lmms_scores("mme/mme.yaml", docs, [p for *_, p in rows], tmp_path)
    return ours, theirs


def test_mme_equals_lmms_eval(tmp_path):
    ours, theirs = _mme(tmp_path, MME_AGREES)
    assert ours["perception"] == theirs["mme_perception_score"] and ours["perception"] == 400.0
    assert ours["cognition"] == theirs["mme_cognition_score"] and ours["cognition"] == 50.0
    ours, theirs = _mme(tmp_path, MME_DIFFERS)
    assert (ours["perception"], theirs["mme_perception_score"]) == (0.0, 200.0)


# ---- SEED-Bench ------------------------------------------------------------------------------------------------------

SEED_AGREES = [("B", "B", "image"), ("A", "B", "image"), ("", "C", "video"), ("D", "D", "video"), ("C", "C", "image")]
# convert_seed_for_submission.py: the answer must be the letter; lmms-eval keeps the first character, any case
SEED_DIFFERS = [("B.", "B", "image", 0.0, 1.0), ("b", "B", "image", 0.0, 1.0)]
SEED_KEYS = {"accuracy": "seed_all", "accuracy_image": "seed_image", "accuracy_video": "seed_video"}


def _seed(tmp_path, rows):
    path = tmp_path / "llava-seed-bench.jsonl"
    _jsonl(path, [{"question_id": k, "image": f"{k}.jpg", "text": "How many?\nA. 1\nB. 2\nC. 3\nD. 4"} for k in range(len(rows))])
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": [
        {"question_id": str(k), "answer": g, "data_type": t} for k, (_, g, t, *_) in enumerate(rows)]}))
    ours = mllm_scores("seedbench", get_bench("seedbench").read(path), [p for p, *_ in rows])
    docs = [{"question_id": str(k), "question": "How many?", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4",
             "answer": g, "data_type": t} for k, (_, g, t, *_) in enumerate(rows)]
    return ours, lmms_scores("seedbench/seedbench.yaml", docs, [p for p, *_ in rows], tmp_path)


def test_seedbench_equals_lmms_eval(tmp_path):
    ours, theirs = _seed(tmp_path, SEED_AGREES)
    assert all(ours[k] == theirs[v] for k, v in SEED_KEYS.items()) and ours["accuracy"] == pytest.approx(3 / 5)
    for row in SEED_DIFFERS:
        ours, theirs = _seed(tmp_path, [row])
        assert (ours["accuracy"], theirs["seed_all"]) == row[3:]


# ---- COCO captions ---------------------------------------------------------------------------------------------------

COCO_ROWS = [("A dog runs in the park.", ["a dog running in a park", "A brown dog (running)."]),
             ("", ["two cats sleeping", "cats on a bed"]),                                     # empty caption
             ("Mr. Smith's car, at 5:30 p.m.", ["a car parked at night", "Mr. Smith's red car."]),
             ("a man - riding a bike!", ["a man rides a bicycle", "someone riding a bike"])]


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed: lmms-eval's coco_cap runs coco-caption's "
                                                         "Java PTBTokenizer")
def test_coco_captions_equal_lmms_eval(tmp_path):
    """lmms-eval's coco_cap = pycocoevalcap (Java PTBTokenizer, Bleu, Rouge, Cider); the bench tokenises with the same
    Java tokenizer when it is installed, and scores bit-for-bit as pycocoevalcap."""
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 42 + k, "file_name": f"{k}.jpg"} for k in range(len(COCO_ROWS))],
                                "annotations": [{"image_id": 42 + k, "caption": c} for k, (_, refs) in enumerate(COCO_ROWS) for c in refs]}))
    ours = mllm_scores("coco_caption", read_coco_captions(path), [p for p, _ in COCO_ROWS])
    docs = [{"question_id": f"COCO_val2014_{42 + k:012d}.jpg", "id": k, "answer": refs} for k, (_, refs) in enumerate(COCO_ROWS)]
    theirs = lmms_scores("coco_cap/coco2014_cap_val.yaml", docs, [p for p, _ in COCO_ROWS], tmp_path,
                         ["coco_Bleu_4", "coco_ROUGE_L", "coco_CIDEr"])
    assert ours["bleu4"] == theirs["coco_Bleu_4"] and ours["rouge_l"] == theirs["coco_ROUGE_L"]
    assert ours["cider"] == theirs["coco_CIDEr"] and ours["cider"] > 0
