"""Benchmarks, registered by name: how each reads its file, prompts the model and scores the answers.

``mllm-kit eval --bench NAME=PATH`` and the in-training :class:`~mllm_kit.evaluation.callback.BenchEvaluation` look
benches up here; a bench of your own subclasses :class:`Bench` and registers with ``@register_bench("name")``.

Each bench reads the files LLaVA's evaluation scripts read (``scripts/v1_5/eval/*.sh``), asks with LLaVA-1.5's prompt
suffix, and feeds its metric what LLaVA's pipeline feeds the official scorer: the generated text trimmed (LLaVA's
answer files hold ``outputs.strip()``), converted as LLaVA converts it for submission where it does
(``scripts/convert_vqav2_for_submission.py``, ``convert_vizwiz_for_submission.py``: EvalAI's answer processor), then
scored by the benchmark's own rules (:mod:`mllm_kit.metrics`). docs/evaluation.md lists each bench, its official
scorer and the test that compares it with lmms-eval's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from torchmetrics import Metric

from mllm_kit.errors import DataError
from mllm_kit.evaluation.formats import (
    OPTION_LETTER,
    OPTION_LETTER_CN,
    SHORT_ANSWER,
    Item,
    read_coco_captions,
    read_mmbench,
    read_questions,
    with_suffix,
)
from mllm_kit.evaluation.llava_files import read_mme, read_scienceqa, read_seed, read_textvqa, read_vizwiz
from mllm_kit.registry import BENCHES, register_bench

CAPTION = "Provide a one-sentence caption for the provided image."
VIZWIZ = f"When the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT_ANSWER}"

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


def answers_of(outputs: Sequence[Output]) -> list[str]:
    """Generated answers as LLaVA's answer files hold them: ``tokenizer.batch_decode(...)[0].strip()``
    (``llava/eval/model_vqa_loader.py``; lmms-eval strips every response too)."""
    return [str(o).strip() for o in outputs]


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
    """Short-answer VQA in LLaVA's question JSONL; ``metric_name`` names the :mod:`mllm_kit.metrics` metric.
    ``submitted``: LLaVA converts each answer with EvalAI's answer processor before submitting it, so the metric gets
    the converted answer and the predictions file keeps it as ``submission``."""

    suffix = SHORT_ANSWER
    metric_name: ClassVar[str] = ""
    submitted: ClassVar[bool] = False

    def answers(self, outputs: Sequence[Output]) -> list[str]:
        from mllm_kit.metrics import evalai_answer

        texts = answers_of(outputs)
        return [evalai_answer(t) for t in texts] if self.submitted else texts

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import build_metric

        return build_metric(self.metric_name)

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(self.answers(outputs), [i.answers for i in items])

    def record(self, item: Item, output: Output) -> dict[str, Any]:
        return {"submission": self.answers([output])[0]} if self.submitted else {}


@register_bench("vqav2")
class VQAv2Bench(_QuestionBench):
    """VQAv2: each answer converted as LLaVA submits it (``scripts/convert_vqav2_for_submission.py``:
    ``EvalAIAnswerProcessor``), then vqaEval.py's soft accuracy over the 10 human answers (the EvalAI server's)."""

    metric_name = "vqav2"
    submitted = True


@register_bench("textvqa")
class TextVQABench(_QuestionBench):
    """TextVQA: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (its ``question_id`` is the image id, so it repeats) with
    ``TextVQA_0.5.1_val.json`` (``--answers``, default: beside the file) matched as ``llava/eval/eval_textvqa.py``
    does; scored by m4c's ``TextVQAAccuracyEvaluator`` (EvalAI's processor on both sides, then the soft accuracy).
    A question file with unique ids and inline answers (or a JSONL answers file) works too."""

    metric_name = "textvqa"

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_textvqa(path, image_root, answers), self.suffix)


@register_bench("vizwiz")
class VizWizBench(_QuestionBench):
    """VizWiz-VQA: LLaVA's question JSONL (``llava_test.jsonl`` layout) asked with LLaVA-1.5's VizWiz suffix ("When the
    provided information is insufficient, respond with 'Unanswerable'. ..."); each answer converted as LLaVA submits
    it (``scripts/convert_vizwiz_for_submission.py``: ``EvalAIAnswerProcessor``), then the VizWiz evaluation's accuracy
    (human answers compared raw; "unanswerable" an ordinary answer) overall and per answer type. Gold answers inline,
    or VizWiz's annotations (``Annotations/val.json``) with ``--answers``, matched on the image file name."""

    suffix = VIZWIZ
    metric_name = "vizwiz"
    submitted = True

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_vizwiz(path, image_root, answers), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import VizWizAccuracy
        from mllm_kit.metrics.vqa import VIZWIZ_ANSWER_TYPES

        extra = sorted({str(i.extra["answer_type"]) for i in items if i.extra.get("answer_type") is not None}
                       - set(VIZWIZ_ANSWER_TYPES))
        return VizWizAccuracy([*VIZWIZ_ANSWER_TYPES, *extra])

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        types = [i.extra.get("answer_type") for i in items]
        metric.update(self.answers(outputs), [i.answers for i in items], types if all(t is not None for t in types) else None)


@register_bench("gqa")
class GQABench(_QuestionBench):
    """GQA: each answer converted as LLaVA's ``scripts/convert_gqa_for_eval.py`` does (``rstrip('.').lower()``) and
    compared with the gold answer as GQA's ``eval.py`` does (exact equality). Gold answers inline, in a JSONL, or
    GQA's ``testdev_balanced_questions.json`` (``--answers``)."""

    metric_name = "gqa"

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(self.answers(outputs), [i.answers[0] for i in items])


@register_bench("docvqa")
class DocVQABench(_QuestionBench):
    """DocVQA / ST-VQA: ANLS (τ = 0.5) against every gold answer."""

    metric_name = "anls"


@register_bench("pope")
class POPEBench(_QuestionBench):
    """POPE: yes/no questions about object presence, read with POPE's rule; accuracy, precision, recall, F1 and the
    yes ratio. With a ``category`` per question (LLaVA's ``llava_pope_test.jsonl``: adversarial, popular, random) each
    category is scored separately, as ``llava/eval/eval_pope.py`` does, and the plain scores are their means (F1:
    LLaVA-1.5's POPE column)."""

    max_new_tokens = 8
    metric_name = "pope"

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import POPE

        categories = [i.extra.get("category") for i in items]
        return POPE(sorted({str(c) for c in categories}) if all(c is not None for c in categories) else ())

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        categories = [str(i.extra.get("category")) for i in items] if metric.categories else None
        metric.update(self.answers(outputs), [i.answers[0] for i in items], categories)


@register_bench("mmbench")
class MMBenchBench(Bench):
    """MMBench (TSV): every question asked once per circular shift of its options (LLaVA's
    ``model_vqa_mmbench.py --all-rounds``, or the passes an MMBench release file already holds), the option letter read
    with MMBench's matching, and MMBench's circular accuracy (a question counts once all its shifts are right; the
    plain per-row accuracy as ``vanilla_accuracy``)."""

    suffix = OPTION_LETTER
    max_new_tokens = 8
    rotate: ClassVar[bool] = True

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(_scored(read_mmbench(path, rotate=self.rotate), path), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import CircularChoiceAccuracy

        return CircularChoiceAccuracy()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(answers_of(outputs), [i.answers[0] for i in items], [i.group for i in items],
                      [list(i.options.values()) for i in items])


@register_bench("mmbench_cn")
class MMBenchCNBench(MMBenchBench):
    """MMBench-CN (its Chinese TSV, e.g. ``mmbench_dev_cn_20231003.tsv``): as ``mmbench``, asked with LLaVA's Chinese
    instruction (``--lang cn``)."""

    suffix = OPTION_LETTER_CN


@register_bench("mmbench_likelihood")
class MMBenchLikelihoodBench(MMBenchBench):
    """MMBench (TSV) by option log-likelihood: each option's text is scored as the reply; the most likely one is the
    answer. One item per row (no rotations: the option texts are scored, not a letter)."""

    suffix = ""
    scoring = "loglikelihood"
    rotate = False

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import LikelihoodChoiceAccuracy

        return LikelihoodChoiceAccuracy()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update([list(o) for o in outputs], [list(i.options).index(i.answers[0]) for i in items])


@register_bench("scienceqa_img")
class ScienceQAImageBench(Bench):
    """ScienceQA-IMG: LLaVA's ``llava_test_CQM-A.json`` (the questions with an image) and ``problems.json``
    (``--answers``, default: beside the file); the option letter read as ``llava/eval/eval_science_qa.py`` reads it,
    accuracy = its ``IMG-Accuracy``."""

    suffix = OPTION_LETTER

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_scienceqa(path, image_root, answers), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import ScienceQAAccuracy

        return ScienceQAAccuracy()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(answers_of(outputs), [i.extra["answer_index"] for i in items], [len(i.options) for i in items])


@register_bench("mme")
class MMEBench(Bench):
    """MME: LLaVA's ``llava_mme.jsonl`` with the released benchmark folder's answers (``--answers``, default:
    ``MME_Benchmark_release_version`` beside the file); MME's ``calculation.py`` scores: per subtask acc + acc+
    (×100), summed into ``perception`` (LLaVA-1.5's MME column) and ``cognition``."""

    suffix = SHORT_ANSWER

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_mme(path, image_root, answers), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import MMEScore

        return MMEScore()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(answers_of(outputs), [i.answers[0] for i in items], [i.extra["subtask"] for i in items],
                      [str(i.group) for i in items])


@register_bench("seedbench")
class SEEDBench(Bench):
    """SEED-Bench: LLaVA's ``llava-seed-bench.jsonl`` and ``SEED-Bench.json`` (``--answers``, default: beside the
    file); right when the answer is exactly the gold letter, as ``scripts/convert_seed_for_submission.py`` counts;
    ``accuracy`` over all questions (LLaVA-1.5's SEED column), ``accuracy_image`` and ``accuracy_video``."""

    suffix = OPTION_LETTER
    data_types: ClassVar[tuple[str, ...] | None] = None

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return with_suffix(read_seed(path, image_root, answers, self.data_types), self.suffix)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import SEEDAccuracy

        types = [i.extra.get("data_type") for i in items]
        return SEEDAccuracy(sorted({str(t) for t in types}) if all(t is not None for t in types) else ())

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        types = [str(i.extra.get("data_type")) for i in items] if metric.categories else None
        metric.update(answers_of(outputs), [i.answers[0] for i in items], types)


@register_bench("seedbench_img")
class SEEDImageBench(SEEDBench):
    """SEED-Bench's image questions only (``data_type == "image"``; SEED-IMG)."""

    data_types = ("image",)


@register_bench("coco_caption")
class COCOCaptionBench(Bench):
    """COCO-style captions, scored as coco-caption (pycocoevalcap) scores them: PTB tokenisation (the Java tokenizer
    when installed), "Bleu_4", "ROUGE_L" (β = 1.2) and "CIDEr" (CIDEr-D)."""

    max_new_tokens = 64

    def read(self, path: str | Path, image_root: str | Path | None = None, answers: str | Path | None = None) -> list[Item]:
        return read_coco_captions(path, image_root, prompt=CAPTION)

    def metric(self, items: Sequence[Item]) -> Metric:
        from mllm_kit.metrics import COCOCaptionScores

        return COCOCaptionScores()

    def update(self, metric: Metric, items: Sequence[Item], outputs: Sequence[Output]) -> None:
        metric.update(answers_of(outputs), [i.answers for i in items])


def _scored(items: list[Item], path: str | Path) -> list[Item]:
    missing = [i.id for i in items if not i.answers]
    if missing:
        raise DataError(f"{path}: rows {missing[:5]} have no 'answer'; scoring needs the gold option letter of every row.")
    return items
