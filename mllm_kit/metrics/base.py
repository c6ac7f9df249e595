"""What every benchmark metric shares: input checks that raise :class:`~mllm_kit.errors.DataError`, and string states
that survive a DDP sync.

torchmetrics syncs tensors only, so metrics that need the whole corpus (CIDEr-D's document frequencies, MMBench's
circular groups) keep their strings as UTF-8 byte codes plus per-string lengths, two list states reduced with
``"cat"``. Both are float32 on purpose: a rank that saw no sample contributes torchmetrics' empty placeholder, which
has the metric's dtype (float32), and an all-gather needs one dtype on every rank. Bytes (0-255) and lengths
(< 2**24) are exact in float32. Concatenation keeps the rank order of every state alike, so codes, lengths and any
per-string companion state stay aligned after a sync.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mllm_kit.errors import DataError


def check_lengths(metric: str, **columns: Sequence) -> int:
    """The common length of the update's columns; a :class:`DataError` naming them when they differ."""
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{n} {k}" for k, n in lengths.items())
        raise DataError(f"{metric}.update got {described}: pass one entry per sample in each.")
    return next(iter(lengths.values()), 0)


def answer_lists(metric: str, answers: Sequence[str | Sequence[str]], minimum: int = 1, what: str = "gold answer",
                 hint: str = "") -> list[list[str]]:
    """Each sample's gold answers (or reference captions) as a list of strings, a bare string being one; a
    :class:`DataError` for a sample with fewer than ``minimum`` or with one that is not a string."""
    out = []
    for i, gold in enumerate(answers):
        gold = [gold] if isinstance(gold, str) else list(gold)
        if len(gold) < minimum or not all(isinstance(a, str) for a in gold):
            raise DataError(f"{metric}.update: sample {i} of the batch has {what}s {gold!r}; each sample needs at least "
                            f"{minimum} {what} string{'s' if minimum > 1 else ''}.{hint}")
        out.append(gold)
    return out


def add_sums(metric: Metric, *names: str) -> None:
    """Float64 scalar states summed across ranks: counts and sums of per-sample scores."""
    for name in names:
        metric.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (no samples yet, no positives)."""
    return numerator / denominator if denominator > 0 else torch.zeros_like(numerator)


def add_text_state(metric: Metric, name: str) -> None:
    """Give ``metric`` a DDP-syncable list of strings called ``name`` (``name_codes`` + ``name_lengths``)."""
    metric.add_state(f"{name}_codes", default=[], dist_reduce_fx="cat")
    metric.add_state(f"{name}_lengths", default=[], dist_reduce_fx="cat")


def append_texts(metric: Metric, name: str, texts: Sequence[str]) -> None:
    data = [t.encode("utf-8") for t in texts]
    getattr(metric, f"{name}_codes").append(torch.tensor(list(b"".join(data)), dtype=torch.float32, device=metric.device))
    getattr(metric, f"{name}_lengths").append(torch.tensor([len(d) for d in data], dtype=torch.float32, device=metric.device))


def read_texts(metric: Metric, name: str) -> list[str]:
    """The strings of text state ``name``, in update order (rank order after a sync)."""
    lengths = cat_state(getattr(metric, f"{name}_lengths"))
    raw = bytes(cat_state(getattr(metric, f"{name}_codes")).to(torch.int64).tolist())
    ends = lengths.to(torch.int64).cumsum(0).tolist()
    return [raw[start:end].decode("utf-8") for start, end in zip([0, *ends[:-1]], ends)]


def cat_state(values: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A ``"cat"`` list state as one tensor, before (a list) or after (a tensor) a sync; empty when nothing came."""
    if isinstance(values, torch.Tensor):
        return values.flatten()
    return dim_zero_cat(values).flatten() if values else torch.zeros(0)


def category_key(category: str) -> str:
    """A category as a metric-name suffix: runs of other characters than letters and digits become "_" ("yes/no" ->
    "yes_no"), so ``bench/<name>/<metric>`` keys and ``eval.keep_best`` stay unambiguous."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(category)).strip("_").lower() or "none"


class MeanByCategory(Metric):
    """The mean of per-sample scores, overall and per category. ``categories`` are declared when the metric is built
    (a bench knows them from its file) so every rank holds the same sum states; ``compute()`` reports a category only
    when it had samples, as ``<name>_<category_key>``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, categories: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = list(dict.fromkeys(str(c) for c in categories))
        keys = [category_key(c) for c in self.categories]
        if len(set(keys)) < len(keys):
            raise DataError(f"{type(self).__name__}: categories {self.categories} give the same metric name "
                            f"{sorted({k for k in keys if keys.count(k) > 1})}; rename one of them.")
        add_sums(self, "score", "total")
        for k in range(len(self.categories)):
            add_sums(self, f"score_{k}", f"total_{k}")

    def _add(self, scores: Sequence[float], categories: Sequence[str] | None) -> None:
        name = type(self).__name__
        if categories is not None:
            check_lengths(name, scores=scores, categories=categories)
            index = {c: k for k, c in enumerate(self.categories)}
            for i, (score, category) in enumerate(zip(scores, categories)):
                if str(category) not in index:
                    raise DataError(f"{name}.update: sample {i} of the batch has category {category!r}, which is not one "
                                    f"of the categories it was built with {self.categories}.")
                k = index[str(category)]
                setattr(self, f"score_{k}", getattr(self, f"score_{k}") + score)
                setattr(self, f"total_{k}", getattr(self, f"total_{k}") + 1)
        self.score += sum(scores)
        self.total += len(scores)

    def _means(self, name: str) -> dict[str, torch.Tensor]:
        out = {name: ratio(self.score, self.total)}
        for k, category in enumerate(self.categories):
            total = getattr(self, f"total_{k}")
            if total > 0:
                out[f"{name}_{category_key(category)}"] = ratio(getattr(self, f"score_{k}"), total)
        return {**out, "num_samples": self.total}
