"""Multiple choice: by option log-likelihood, by the generated letter (MMBench's matching), MMBench's circular
evaluation, and the letter rules of LLaVA's ScienceQA and SEED-Bench scripts."""

from __future__ import annotations

import operator
import re
import string
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.errors import ConfigError, DataError
from mllm_kit.metrics.base import (
    MeanByCategory,
    add_sums,
    add_text_state,
    append_texts,
    cat_state,
    check_lengths,
    ratio,
    read_texts,
)

# VLMEvalKit's can_infer_option: answers containing one of these are refusals (it returns 'Z': never correct).
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def option_letters(count: int) -> str:
    if not 1 <= count <= 26:
        raise DataError(f"a multiple-choice question needs 1 to 26 options (letters A-Z); got {count}.")
    return string.ascii_uppercase[:count]


def parse_option_letter(text: str, letters: str = "ABCD", options: Sequence[str] | None = None) -> str | None:
    """The option a free-text answer picks, or ``None``: MMBench's rule-based matching, VLMEvalKit's ``can_infer``
    (``vlmeval/utils/matching_util.py`` as of commit c6bdffd3, the matching MMBench results were reported with).

    ``.()[],:;!*#{}`` become spaces and the text is split on whitespace; if exactly one of ``letters`` is a word, that
    is the answer ("B", "(B)", "B. cat", "The answer is B"). Otherwise, when option texts are given, the one option
    whose lower-cased text is contained in the lower-cased answer ("a cat" for option B "cat"). Refusals and a bare
    "Z" are no answer. Known quirk kept: "A" as an article counts ("A cat" → A). VLMEvalKit's later additions (the
    letter must be among the last 4 words, an "answer is X" regex, a length cap on the text match) and its GPT
    fallback for unmatched answers are not applied.
    """
    if options is not None:
        letters = option_letters(len(options))
    if any(refusal in text for refusal in _REFUSALS):
        return None
    words = text.translate(_SEPARATORS).split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return None
    if options is None:
        return None
    answer = text.lower()
    matches = [letter for letter, option in zip(letters, options) if str(option).lower() in answer]
    return matches[0] if len(matches) == 1 else None


def gold_letter(metric: str, index: int, target: str | int, letters: str) -> str:
    """A gold option given as a letter ("B") or a 0-based index (1), checked against the question's options."""
    if isinstance(target, str):
        letter = target.strip().upper()
        if len(letter) == 1 and letter in letters:
            return letter
    else:
        try:
            position = operator.index(target)
        except TypeError:
            position = -1
        if 0 <= position < len(letters):
            return letters[position]
    raise DataError(f"{metric}.update: sample {index} of the batch has gold option {target!r}, which is not one of its "
                    f"{len(letters)} options {', '.join(letters)} (give a letter or a 0-based index).")


class LikelihoodChoiceAccuracy(Metric):
    """Multiple-choice accuracy by option score, equal to lm-evaluation-harness / lmms-eval's ``acc`` for
    ``multiple_choice`` tasks: the prediction is the argmax of the per-option scores (the first on ties, as
    ``np.argmax``). Pass summed log-likelihoods for ``acc``, or log-likelihoods divided by each option's length for
    ``acc_norm``.

    ``update(scores, targets)``: ``scores`` a ``[N, K]`` tensor or one score sequence per question (ragged option
    counts allowed); ``targets`` the gold option index per question. ``compute()`` → ``{"accuracy", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "correct", "total")

    def update(self, scores: torch.Tensor | Sequence[Sequence[float]], targets: torch.Tensor | Sequence[int]) -> None:
        name = type(self).__name__
        targets = torch.as_tensor(targets).flatten().tolist()
        rows = list(scores.unbind(0)) if isinstance(scores, torch.Tensor) and scores.dim() == 2 else list(scores)
        check_lengths(name, scores=rows, targets=targets)
        correct = 0
        for i, (row, target) in enumerate(zip(rows, targets)):
            row = torch.as_tensor(row, dtype=torch.float64).flatten()
            if row.numel() == 0 or float(target) != int(target) or not 0 <= int(target) < row.numel():
                raise DataError(f"{name}.update: sample {i} of the batch has gold option index {target!r} and "
                                f"{row.numel()} option scores; the index must be in [0, {row.numel()}).")
            correct += int(row.argmax()) == int(target)
        self.correct += correct
        self.total += len(rows)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}


class _LetterChoice(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, num_options: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_options, int) or not 1 <= num_options <= 26:
            raise ConfigError(f"{type(self).__name__}: num_options must be an int from 1 to 26; got {num_options!r}.")
        self.num_options = num_options

    def _hits(self, predictions: Sequence[str], targets: Sequence[str | int],
              options: Sequence[Sequence[str] | None] | None, **columns: Sequence) -> list[bool]:
        name = type(self).__name__
        if options is not None:
            columns["options"] = options = list(options)
        check_lengths(name, predictions=predictions, targets=targets, **columns)
        options = options if options is not None else [None] * len(predictions)
        hits = []
        for i, (prediction, target, opts) in enumerate(zip(predictions, targets, options)):
            letters = option_letters(len(opts)) if opts is not None else string.ascii_uppercase[: self.num_options]
            hits.append(parse_option_letter(prediction, letters, opts) == gold_letter(name, i, target, letters))
        return hits


class LetterChoiceAccuracy(_LetterChoice):
    """Multiple-choice accuracy from generated text, the option read with MMBench's matching
    (:func:`parse_option_letter`, VLMEvalKit's ``can_infer``) — MMBench's ``vanilla`` evaluation without its GPT
    fallback for answers no rule matches (those count as wrong).

    ``update(predictions, targets, options=None)``: the generated text, the gold letter (or 0-based index) and
    optionally the option texts per question (they set its letters, A.. up to their count, and allow matching by
    option text); without options each question has ``num_options`` letters. ``compute()`` → ``{"accuracy",
    "num_samples"}``.
    """

    def __init__(self, num_options: int = 4, **kwargs) -> None:
        super().__init__(num_options, **kwargs)
        add_sums(self, "correct", "total")

    def update(self, predictions: Sequence[str], targets: Sequence[str | int],
               options: Sequence[Sequence[str] | None] | None = None) -> None:
        hits = self._hits(predictions, targets, options)
        self.correct += sum(hits)
        self.total += len(hits)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}


class CircularChoiceAccuracy(_LetterChoice):
    """MMBench's circular evaluation (VLMEvalKit ``mcq_circular_eval`` / ``eval_circular_group``): every question is
    asked once per circular shift of its options, and it counts as correct only if every shift is answered correctly
    (each answer read with :func:`parse_option_letter`; no GPT fallback).

    ``update(predictions, targets, groups, options=None)``: as :class:`LetterChoiceAccuracy`, plus the id of the
    original question per row (an int or a string; ``str(group)`` is the key, so ``1`` and ``"1"`` are one group).
    Rows of a group may arrive in any batch and on any rank: rows and group keys are kept (``"cat"`` list states) and
    grouped in ``compute()`` → ``{"accuracy"`` (over groups), ``"vanilla_accuracy"`` (over rows), ``"num_groups"``,
    ``"num_samples"}``.
    """

    def __init__(self, num_options: int = 4, **kwargs) -> None:
        super().__init__(num_options, **kwargs)
        add_text_state(self, "groups")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], targets: Sequence[str | int], groups: Sequence[int | str],
               options: Sequence[Sequence[str] | None] | None = None) -> None:
        hits = self._hits(predictions, targets, options, groups=groups)
        append_texts(self, "groups", [str(g) for g in groups])
        self.hits.append(torch.tensor(hits, dtype=torch.float32, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        hits = cat_state(self.hits).to(torch.float64)
        passed: dict[str, bool] = {}
        for group, hit in zip(read_texts(self, "groups"), hits.tolist()):
            passed[group] = passed.get(group, True) and hit > 0.5
        groups = torch.tensor(len(passed), dtype=torch.float64)
        return {"accuracy": ratio(torch.tensor(float(sum(passed.values())), dtype=torch.float64), groups),
                "vanilla_accuracy": ratio(hits.sum(), torch.tensor(float(hits.numel()), dtype=torch.float64)),
                "num_groups": groups, "num_samples": torch.tensor(float(hits.numel()), dtype=torch.float64)}


# ---- ScienceQA (LLaVA's llava/eval/eval_science_qa.py) ---------------------------------------------------------

_SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's ``--options`` default (a list: "AB" is not in it)
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(text: str, num_choices: int) -> int | None:
    """The option index LLaVA's ``eval_science_qa.py`` reads from an answer, or ``None`` ("FAILED"): the whole text
    is one of ``A``–``E``; else it starts with a letter of those followed by ". "; else ``The answer is X.``
    (``re.findall(r'The answer is ([A-Z]).')``, sic: the final "." is any character, so the letter cannot end the
    text) matches exactly once. The letter counts only among the question's first ``num_choices`` options
    (``get_pred_idx``). Case matters: "b" is no answer."""
    if text in _SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return _SQA_OPTIONS.index(letter) if letter and letter in _SQA_OPTIONS[:num_choices] else None


class ScienceQAAccuracy(Metric):
    """ScienceQA accuracy, equal to LLaVA's ``llava/eval/eval_science_qa.py`` (its ``Accuracy``, or ``IMG-Accuracy``
    when fed the questions with an image only, as the ``scienceqa_img`` bench does): the option read by
    :func:`scienceqa_choice` against ``problems.json``'s ``answer`` index.

    ``update(predictions, targets, num_choices)``: the generated text, the gold option index and the question's
    number of choices. ``compute()`` → ``{"accuracy", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_sums(self, "correct", "total")

    def update(self, predictions: Sequence[str], targets: Sequence[int], num_choices: Sequence[int]) -> None:
        name = type(self).__name__
        check_lengths(name, predictions=predictions, targets=targets, num_choices=num_choices)
        for i, (target, count) in enumerate(zip(targets, num_choices)):
            if not 0 <= int(target) < int(count):
                raise DataError(f"{name}.update: sample {i} of the batch has gold option {target!r} but {count} choices.")
        self.correct += sum(scienceqa_choice(p, int(n)) == int(t) for p, t, n in zip(predictions, targets, num_choices))
        self.total += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": ratio(self.correct, self.total), "num_samples": self.total}


# ---- SEED-Bench (LLaVA's scripts/convert_seed_for_submission.py) -----------------------------------------------


class SEEDAccuracy(MeanByCategory):
    """SEED-Bench accuracy, equal to LLaVA's ``scripts/convert_seed_for_submission.py``: an answer is right when the
    generated text *is* the gold letter (``row['text'] == question['answer']``: "B" counts, "B." and "b" do not),
    averaged over all questions and per ``data_type`` (``image``, ``video``) as its "Total", "image" and "video"
    accuracies.

    ``update(predictions, targets, data_types=None)``: the generated text, the gold letter and optionally the
    question's ``data_type``. ``compute()`` → ``{"accuracy", "accuracy_<data_type>"..., "num_samples"}``.
    """

    def __init__(self, data_types: Sequence[str] = ("image", "video"), **kwargs) -> None:
        super().__init__(data_types, **kwargs)

    def update(self, predictions: Sequence[str], targets: Sequence[str], data_types: Sequence[str] | None = None) -> None:
        check_lengths(type(self).__name__, predictions=predictions, targets=targets)
        self._add([float(p == t) for p, t in zip(predictions, targets)], data_types)

    def compute(self) -> dict[str, torch.Tensor]:
        return self._means("accuracy")
