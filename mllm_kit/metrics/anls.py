"""ANLS: average normalised Levenshtein similarity (DocVQA, InfographicVQA, ST-VQA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.errors import ConfigError
from mllm_kit.metrics.base import add_sums, answer_lists, check_lengths, ratio
from mllm_kit.metrics.normalize import levenshtein, normalize_anls_answer


def anls_score(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """One question's ANLS as the DocVQA script computes it: ``1 - min over gold answers of NL``, set to 0 when below
    ``threshold``, with ``NL = levenshtein(a', p') / max(len(a), len(p))`` on the lower-cased, whitespace-collapsed
    strings a', p' — and, sic, the *raw* lengths of the upper-cased strings in the denominator (the official script
    divides by ``max(len(answer.upper()), len(pred.upper()))``, so surrounding whitespace enlarges the denominator)."""
    pred = normalize_anls_answer(prediction)
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(normalize_anls_answer(answer), pred) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


class ANLS(Metric):
    """Average normalised Levenshtein similarity, equal to the DocVQA evaluation script of the Robust Reading
    Competition (also lmms-eval's ``anls``): per question the best similarity over its gold answers, 0 below
    ``threshold`` (τ = 0.5), averaged over questions.

    ``update(predictions, answers)``: a predicted string and a list of gold answers (or one string) per question.
    ``compute()`` → ``{"anls", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"ANLS threshold must be in [0, 1] (DocVQA uses 0.5); got {threshold}.")
        self.threshold = threshold
        add_sums(self, "score", "total")

    def update(self, predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, answers=answers)
        gold = answer_lists(type(self).__name__, answers)
        self.score += sum(anls_score(p, g, self.threshold) for p, g in zip(predictions, gold))
        self.total += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"anls": ratio(self.score, self.total), "num_samples": self.total}
