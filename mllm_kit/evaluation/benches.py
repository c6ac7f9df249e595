"""Benchmarks, registered by name: how each reads its file, prompts the model and scores the answers.

``mllm-kit eval --bench NAME=PATH`` and the in-training :class:`~mllm_kit.evaluation.callback.BenchEvaluation` look
benches up here; a bench of your own subclasses :class:`Bench` and registers with ``@register_bench("name")``. The
prompt suffixes are LLaVA-1.5's (``llava/eval`` scripts), so scores are comparable with its reported numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from torchmetrics import Metric

from mllm_kit.evaluation.formats import Item, read_coco_captions, read_mmbench, read_questions, with_suffix
from mllm_kit.registry import BENCHES, register_bench

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."

Output = str | list[float]  # a generated answer, or one log-likelihood per option
COUNTS = ("num_samples", "num_groups")


class Bench:
    """Base class. ``scoring``: ``generate`` (answers are generated) or ``loglikelihood`` (each option of a multiple-choice
    item is scored as the reply; the output is one log-likelihood per option). ``max_new_tokens``: the default answer
    budget. ``metric()`` builds a fresh torchmetrics ``Metric`` (DDP-synced states); ``update`` feeds it one batch."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 16
    scoring: ClassVar[Literal["generate", "loglikelihood"]] = "generate"

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_questions(path, image_root, answers), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        raise NotImplementedError

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        raise NotImplementedError

    def compute(self, metric: Metric) -> dict[str, float]:
        """The scores to report (counts, which the results file keeps under ``n-samples``, left out)."""
        return {k: float(v) for k, v in metric.compute().items() if k not in COUNTS}

    def record(self, item: Item, output: Output) -> dict[str, Any]:
        """What the per-sample predictions file keeps besides the prompt, target and response."""
        return {}


def get_bench(name: str) -> Bench:
    bench = BENCHES.get(name)
    return bench() if isinstance(bench, type) else bench


@register_bench("synthetic")
class SyntheticBench(Bench):
    """mllm-kit's synthetic shapes eval set (LLaVA conversation JSON): exact match per task, as ``mllm-kit fit`` reports."""

    max_new_tokens = 8

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.training.evaluate import GenerationAccuracy

        return GenerationAccuracy(sorted({_task(i) for i in items}))

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers[0] for i in items], [_task(i) for i in items])


def _task(item: Item) -> str:
    return str(item.extra.get("task", "all"))


class _QuestionBench(Bench):
    """Short-answer VQA in LLaVA's question JSONL; ``metric_name`` names the :mod:`mllm_kit.metrics` metric."""

    suffix = SHORT_ANSWER
    metric_name: ClassVar[str] = ""

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import build_metric

        return build_metric(self.metric_name)

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers for i in items])


@register_bench("vqav2")
class VQAv2Bench(_QuestionBench):
    """VQAv2 (and VizWiz-style files): soft accuracy over the 10 human answers with the official normalisation."""

    metric_name = "vqav2"


@register_bench("textvqa")
class TextVQABench(VQAv2Bench):
    """TextVQA: scored with the VQA accuracy, as its official evaluation does."""


@register_bench("gqa")
class GQABench(_QuestionBench):
    """GQA: exact match after GQA-style normalisation."""

    metric_name = "gqa"

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers[0] for i in items])


@register_bench("docvqa")
class DocVQABench(_QuestionBench):
    """DocVQA / ST-VQA: ANLS (τ = 0.5) against every gold answer."""

    metric_name = "anls"


@register_bench("pope")
class POPEBench(_QuestionBench):
    """POPE: yes/no questions about object presence; accuracy, precision, recall, F1 and the yes ratio."""

    max_new_tokens = 8
    metric_name = "pope"

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers[0] for i in items])


@register_bench("mmbench")
class MMBenchBench(Bench):
    """MMBench (TSV): the generated option letter, MMBench's circular evaluation (a question counts once all its
    circular shifts are right) and the plain per-row accuracy."""

    suffix = OPTION_LETTER
    max_new_tokens = 8

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(_scored(read_mmbench(path), path), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import CircularChoiceAccuracy

        return CircularChoiceAccuracy()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers[0] for i in items], [i.group for i in items], [list(i.options.values()) for i in items])


@register_bench("mmbench_likelihood")
class MMBenchLikelihoodBench(MMBenchBench):
    """MMBench (TSV) by option log-likelihood: each option's text is scored as the reply; the most likely one is the answer."""

    suffix = ""
    scoring = "loglikelihood"

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import LikelihoodChoiceAccuracy

        return LikelihoodChoiceAccuracy()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update([list(o) for o in outputs], [list(i.options).index(i.answers[0]) for i in items])


@register_bench("coco_caption")
class COCOCaptionBench(Bench):
    """COCO-style captions: BLEU-4, ROUGE-L (torchmetrics) and CIDEr-D, on PTB-like tokenised text."""

    max_new_tokens = 64

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return read_coco_captions(path, image_root, prompt=CAPTION)

    def metric(self, items: Sequence[Item]) -> Metric:
        from torchmetrics import MetricCollection

        from mllm_kit.metrics import BLEU4, CIDErD, RougeL

        return MetricCollection({"bleu4": BLEU4(tokenize=True), "rouge_l": RougeL(tokenize=True), "cider": CIDErD(tokenize=True)})

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(list(outputs), [i.answers for i in items])


def _scored(items: list[Item], path: str | Path) -> list[Item]:
    from mllm_kit.errors import DataError

    missing = [i.id for i in items if not i.answers]
    if missing:
        raise DataError(f"{path}: rows {missing[:5]} have no 'answer'; scoring needs the gold option letter of every row.")
    return items
