"""Short-answer VQA: VQAv2 soft accuracy (vqaEval.py) and exact match with GQA's normalisation (lmms-eval ``gqa``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.metrics.base import add_sums, answer_lists, check_lengths, ratio
from mllm_kit.metrics.normalize import normalize_gqa_answer, vqa_clean, vqa_digits_articles, vqa_punctuation


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
    n, m = len(gold), sum(g == pred for g in gold)
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


class VQAv2Accuracy(Metric):
    """VQAv2 soft accuracy, equal to GT-Vision-Lab/VQA's ``vqaEval.py`` (``VQAEval.evaluate``) per question and
    overall (which it reports ×100, rounded to 2 decimals; here a fraction, unrounded).

    ``update(predictions, answers)``: one predicted string and the list of human answers (10 in VQAv2) per question.
    Other answer counts use the same leave-one-out formula over however many there are (n answers: n subsets of
    n − 1), so the best reachable score is ``min(1, (n-1)/3)``; fewer than 2 answers is a :class:`DataError`.
    ``compute()`` → ``{"accuracy", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "score", "total")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, answers=answers)
        gold = answer_lists(type(self).__name__, answers, minimum=2, hint=(
            " VQAv2 accuracy is leave-one-out over the human answers, so a single answer always scores 0; "
            "use ExactMatch for single-answer data."))
        self.score += sum(vqa_soft_accuracy(p, g) for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.score, self.total), "num_samples": self.total}


class ExactMatch(Metric):
    """Exact-match accuracy with GQA's normalisation, equal to lmms-eval's ``gqa`` task (``exact_match`` with
    ``ignore_case`` and ``ignore_punctuation``: lower-case, every ``string.punctuation`` character deleted), which
    also covers LLaVA's GQA conversion (``text.rstrip('.').lower()`` against GQA's lower-case answers).

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
        norm = lambda text: normalize_gqa_answer(text, self.remove_articles)  # noqa: E731
        self.correct += sum(norm(p) in {norm(a) for a in g} for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}
