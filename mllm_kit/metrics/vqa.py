"""Short-answer VQA: the soft accuracy of VQAv2 (vqaEval.py), TextVQA (m4c ``TextVQAAccuracyEvaluator``) and VizWiz
(the VizWiz API's ``vqaEval.py``), GQA's exact match after LLaVA's conversion, and exact match with lmms-eval's
normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.metrics.base import MeanByCategory, add_sums, answer_lists, check_lengths, ratio
from mllm_kit.metrics.normalize import (
    evalai_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    vqa_clean,
    vqa_digits_articles,
    vqa_punctuation,
)

VIZWIZ_ANSWER_TYPES = ("other", "yes/no", "number", "unanswerable")


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of an already-normalised prediction against already-normalised human answers: the mean over
    the n leave-one-out subsets of ``min(#subset answers equal to the prediction / 3, 1)``. With ``m`` of ``n``
    answers matching: ``(m·min(1, (m-1)/3) + (n-m)·min(1, m/3)) / n`` (0, 0.3, 0.6, 0.9, 1.0 for n = 10)."""
    n, m = len(answers), sum(a == prediction for a in answers)
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQAv2 accuracy: the mean over the leave-one-out subsets of the human answers of
    ``min(#subset answers equal to the prediction / 3, 1)``, as vqaEval.py computes it.

    With ``m`` of ``n`` answers matching, leaving out a matching answer leaves ``m - 1`` matches and leaving out
    another leaves ``m``, so the mean is ``(m·min(1, (m-1)/3) + (n-m)·min(1, m/3)) / n`` — for n = 10: 0, 0.3, 0.6,
    0.9, 1.0 for m = 0, 1, 2, 3, ≥ 4. As in vqaEval.py, answers are normalised only when the humans disagree
    (more than one distinct answer after trimming): with unanimous answers the raw trimmed strings are compared.
    """
    gold = [vqa_clean(a) for a in answers]
    pred = vqa_clean(prediction)
    if len(set(gold)) > 1:
        gold = [vqa_digits_articles(vqa_punctuation(a)) for a in gold]
        pred = vqa_digits_articles(vqa_punctuation(pred))
    return leave_one_out_accuracy(pred, gold)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's TextVQA accuracy as LLaVA's ``llava/eval/m4c_evaluator.py`` ``TextVQAAccuracyEvaluator``
    computes it: prediction and every human answer through :func:`evalai_answer` (always, unlike vqaEval.py), then
    :func:`leave_one_out_accuracy`."""
    return leave_one_out_accuracy(evalai_answer(prediction), [evalai_answer(a) for a in answers])


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's VizWiz accuracy as the VizWiz API's ``vqaEval.py`` (``VQAEval.evaluate``, by Qing Li) computes
    it: the prediction trimmed and normalised with vqaEval.py's punctuation, number-word, article and contraction
    rules, the human answers compared **raw** (the VizWiz script never normalises them), leave-one-out by position.
    "unanswerable" is an ordinary answer string. (Its contraction table writes most apostrophes as ’; the straight
    table used here differs only for a prediction that itself contains ’ in such a word.)"""
    return leave_one_out_accuracy(normalize_vqa_answer(prediction), list(answers))


class VQAv2Accuracy(Metric):
    """VQAv2 soft accuracy, equal to GT-Vision-Lab/VQA's ``vqaEval.py`` (``VQAEval.evaluate``) per question and
    overall (which it reports ×100, rounded to 2 decimals; here a fraction, unrounded).

    ``update(predictions, answers)``: one predicted string and the list of human answers (10 in VQAv2) per question.
    Other answer counts use the same leave-one-out formula over however many there are (n answers: n subsets of
    n − 1), so the best reachable score is ``min(1, (n-1)/3)``; fewer than 2 answers is a :class:`DataError`.
    ``compute()`` → ``{"accuracy", "num_samples"}``. The ``vqav2`` bench feeds it what LLaVA submits: each generated
    answer through :func:`evalai_answer` first.
    """

    full_state_update = False
    higher_is_better = True

    @staticmethod
    def score(prediction: str, answers: Sequence[str]) -> float:
        return vqa_soft_accuracy(prediction, answers)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "score_sum", "total")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, answers=answers)
        gold = _human_answers(type(self).__name__, answers)
        self.score_sum += sum(self.score(p, g) for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.score_sum, self.total), "num_samples": self.total}


def _human_answers(metric: str, answers: Sequence[Sequence[str]]) -> list[list[str]]:
    return answer_lists(metric, answers, minimum=2, hint=(
        " VQA accuracy is leave-one-out over the human answers, so a single answer always scores 0; "
        "use ExactMatch for single-answer data."))


class TextVQAAccuracy(VQAv2Accuracy):
    """TextVQA accuracy, equal to LLaVA's ``llava/eval/m4c_evaluator.py`` ``TextVQAAccuracyEvaluator`` (the TextVQA
    authors' m4c code, run by ``llava/eval/eval_textvqa.py``): :func:`textvqa_accuracy` per question, averaged.
    (The official evaluator asserts 10 answers per question; any n ≥ 2 is scored here with the same formula.)"""

    @staticmethod
    def score(prediction: str, answers: Sequence[str]) -> float:
        return textvqa_accuracy(prediction, answers)


class VizWizAccuracy(MeanByCategory):
    """VizWiz-VQA accuracy, equal to the VizWiz API's ``vqaEval.py`` (``VQAEval.evaluate``): :func:`vizwiz_accuracy`
    per question, averaged overall and per answer type (``other``, ``yes/no``, ``number``, ``unanswerable``) as its
    ``accuracy['perAnswerType']`` (fractions here; it reports ×100 rounded to 2 decimals).

    ``update(predictions, answers, answer_types=None)``: one predicted string, the human answers (10 in VizWiz) and
    optionally the question's ``answer_type``. ``compute()`` → ``{"accuracy", "accuracy_<type>"`` for the types that
    had questions (``yes/no`` → ``accuracy_yes_no``), ``"num_samples"}``. The ``vizwiz`` bench feeds it what LLaVA
    submits (``scripts/convert_vizwiz_for_submission.py``): each answer through :func:`evalai_answer` first.
    """

    def __init__(self, answer_types: Sequence[str] = VIZWIZ_ANSWER_TYPES, **kwargs) -> None:
        super().__init__(answer_types, **kwargs)

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]],
               answer_types: Sequence[str] | None = None) -> None:
        check_lengths(type(self).__name__, predictions=predictions, answers=answers)
        gold = _human_answers(type(self).__name__, answers)
        self._add([vizwiz_accuracy(p, g) for p, g in zip(predictions, gold)], answer_types)

    def compute(self) -> dict[str, torch.Tensor]:
        return self._means("accuracy")


def gqa_answer(text: str) -> str:
    """What LLaVA submits to GQA's evaluation (``scripts/convert_gqa_for_eval.py``): ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


class GQAAccuracy(Metric):
    """GQA accuracy as LLaVA scores it: each answer converted by ``scripts/convert_gqa_for_eval.py``
    (:func:`gqa_answer`: trailing periods dropped, lower-cased) and compared with GQA's ``eval.py``, which counts
    ``prediction == gold`` (GQA's gold answers are lower-case words; nothing else is normalised: "t-shirt" ≠
    "tshirt", "yes!" ≠ "yes"). lmms-eval's ``gqa`` deletes all punctuation instead (:class:`ExactMatch`).

    ``update(predictions, targets)``: a gold string, or a list of accepted strings (any may match), per question.
    ``compute()`` → ``{"accuracy", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "correct", "total")

    def update(self, predictions: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, targets=targets)
        gold = answer_lists(type(self).__name__, targets)
        self.correct += sum(gqa_answer(p) in g for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}


class ExactMatch(Metric):
    """Exact-match accuracy with lmms-eval's normalisation (its ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation``, used by its ``gqa`` task: lower-case, every ``string.punctuation`` character deleted).
    GQA as LLaVA scores it is :class:`GQAAccuracy`.

    ``update(predictions, targets)``: a gold string, or a list of accepted strings (any may match), per sample.
    ``remove_articles=True`` also drops a/an/the (not done by either official script). Both sides are whitespace-
    trimmed. ``compute()`` → ``{"accuracy", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, remove_articles: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.remove_articles = remove_articles
        add_sums(self, "correct", "total")

    def update(self, predictions: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, targets=targets)
        gold = answer_lists(type(self).__name__, targets)
        norm = lambda text: normalize_gqa_answer(text, self.remove_articles)
        self.correct += sum(norm(p) in {norm(a) for a in g} for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}
