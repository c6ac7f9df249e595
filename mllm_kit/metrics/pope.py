"""POPE: object-hallucination probing with yes/no questions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.errors import DataError
from mllm_kit.metrics.base import add_sums, check_lengths, ratio


def pope_answer_is_yes(text: str) -> bool:
    """The official POPE parsing (AoiDragon/POPE ``evaluate.py``, also LLaVA's ``eval_pope.py``): keep the text before
    the first ``.``, delete commas, split on single spaces; the answer is "no" when a word is exactly ``No``, ``no`` or
    ``not``, otherwise "yes" (so an empty or off-topic answer counts as yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ({"No", "no", "not"} & set(words))


class POPE(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio, equal to AoiDragon/POPE's ``evaluate.py`` ("yes" is the
    positive class; precision, recall and F1 are 0 where the official script would divide by zero).

    ``update(predictions, labels)``: the model's free-text answer and the gold label ``"yes"``/``"no"`` per question.
    ``compute()`` → ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "tp", "fp", "tn", "fn")

    def update(self, predictions: Sequence[str], labels: Sequence[str]) -> None:
        check_lengths(type(self).__name__, predictions=predictions, labels=labels)
        gold = []
        for i, label in enumerate(labels):
            label = str(label).strip().lower()
            if label not in ("yes", "no"):
                raise DataError(f"POPE.update: sample {i} of the batch has label {labels[i]!r}; POPE labels are 'yes' or 'no'.")
            gold.append(label == "yes")
        pred = [pope_answer_is_yes(p) for p in predictions]
        self.tp += sum(p and g for p, g in zip(pred, gold))
        self.fp += sum(p and not g for p, g in zip(pred, gold))
        self.tn += sum(not p and not g for p, g in zip(pred, gold))
        self.fn += sum(not p and g for p, g in zip(pred, gold))

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.tp + self.fp + self.tn + self.fn
        precision, recall = ratio(self.tp, self.tp + self.fp), ratio(self.tp, self.tp + self.fn)
        return {"accuracy": ratio(self.tp + self.tn, total), "precision": precision, "recall": recall,
                "f1": ratio(2 * precision * recall, precision + recall), "yes_ratio": ratio(self.tp + self.fp, total),
                "num_samples": total}
