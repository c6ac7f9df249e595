"""POPE: object-hallucination probing with yes/no questions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.errors import DataError
from mllm_kit.metrics.base import add_sums, category_key, check_lengths, ratio


def pope_answer_is_yes(text: str) -> bool:
    """The official POPE parsing (AoiDragon/POPE ``evaluate.py``, also LLaVA's ``eval_pope.py``): keep the text before
    the first ``.``, delete commas, split on single spaces; the answer is "no" when a word is exactly ``No``, ``no`` or
    ``not``, otherwise "yes" (so an empty or off-topic answer counts as yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ({"No", "no", "not"} & set(words))


class POPE(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio, equal to AoiDragon/POPE's ``evaluate.py`` ("yes" is the
    positive class; precision, recall and F1 are 0 where the official script would divide by zero).

    ``categories`` (e.g. POPE's ``adversarial``, ``popular``, ``random``): LLaVA's ``llava/eval/eval_pope.py`` scores
    each category of its one question file separately, and LLaVA-1.5 reports the mean of the three F1 scores. Built
    with categories, the metric keeps one confusion matrix per category and reports each category's five scores as
    ``<score>_<category>`` and, under the plain names, their mean over the categories that had questions; without,
    one pooled matrix.

    ``update(predictions, labels, categories=None)``: the model's free-text answer, the gold label ``"yes"``/``"no"``
    and (with ``categories``) the question's category. ``compute()`` → ``{"accuracy", "precision", "recall", "f1",
    "yes_ratio", "num_samples"}`` (plus the per-category scores).
    """

    full_state_update = False
    higher_is_better = True
    SCORES = ("accuracy", "precision", "recall", "f1", "yes_ratio")

    def __init__(self, categories: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = list(dict.fromkeys(str(c) for c in categories))
        for k in range(max(1, len(self.categories))):
            add_sums(self, f"tp_{k}", f"fp_{k}", f"tn_{k}", f"fn_{k}")

    def update(self, predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str] | None = None) -> None:
        name = type(self).__name__
        if self.categories and categories is None:
            raise DataError(f"{name} was built with categories {self.categories}: pass each question's category.")
        columns = {"categories": categories} if categories is not None else {}
        check_lengths(name, predictions=predictions, labels=labels, **columns)
        index = {c: k for k, c in enumerate(self.categories)}
        for i, (prediction, label) in enumerate(zip(predictions, labels)):
            label = str(label).strip().lower()
            if label not in ("yes", "no"):
                raise DataError(f"POPE.update: sample {i} of the batch has label {labels[i]!r}; POPE labels are 'yes' or 'no'.")
            k = 0
            if self.categories:
                if str(categories[i]) not in index:
                    raise DataError(f"POPE.update: sample {i} of the batch has category {categories[i]!r}, which is not one "
                                    f"of the categories it was built with {self.categories}.")
                k = index[str(categories[i])]
            cell = {(True, True): "tp", (True, False): "fp", (False, False): "tn", (False, True): "fn"}
            state = f"{cell[(pope_answer_is_yes(prediction), label == 'yes')]}_{k}"
            setattr(self, state, getattr(self, state) + 1)

    def _scores(self, k: int) -> dict[str, torch.Tensor]:
        tp, fp, tn, fn = (getattr(self, f"{c}_{k}") for c in ("tp", "fp", "tn", "fn"))
        total = tp + fp + tn + fn
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        return {"accuracy": ratio(tp + tn, total), "precision": precision, "recall": recall,
                "f1": ratio(2 * precision * recall, precision + recall), "yes_ratio": ratio(tp + fp, total),
                "num_samples": total}

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.categories:
            return self._scores(0)
        per = {c: self._scores(k) for k, c in enumerate(self.categories)}
        seen = [c for c in self.categories if per[c]["num_samples"] > 0]
        out: dict[str, torch.Tensor] = {}
        for score in self.SCORES:
            values = [per[c][score] for c in seen]
            out[score] = torch.stack(values).mean() if values else torch.tensor(0.0, dtype=torch.float64)
            out.update({f"{score}_{category_key(c)}": per[c][score] for c in seen})
        out["num_samples"] = sum((per[c]["num_samples"] for c in self.categories), torch.tensor(0.0, dtype=torch.float64))
        return out
