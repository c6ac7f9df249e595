"""MME: yes/no questions in pairs (one image, two questions), scored per subtask as acc + acc+ and summed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from mllm_kit.errors import DataError
from mllm_kit.metrics.base import add_text_state, append_texts, cat_state, category_key, check_lengths, read_texts

# MME's ``eval_tool/calculation.py`` ``eval_type_dict``: the subtasks whose scores are summed into each total.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


def mme_answer(text: str) -> str:
    """``calculation.py``'s ``parse_pred_ans`` on the lower-cased answer: ``"yes"``/``"no"`` as they are, else
    "yes" when its first 4 characters contain "yes", else "no" when they contain "no", else ``"other"`` (never
    right). "Yes." → yes; "No, it is not" → no; "y" → other; "Not sure" → no (sic: "no" in "not ")."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


class MMEScore(Metric):
    """MME's scores, equal to its ``eval_tool/calculation.py`` (run by LLaVA's ``scripts/v1_5/eval/mme.sh`` after
    ``convert_answer_to_mme.py``): per subtask, ``acc`` = the share of questions answered right
    (:func:`mme_answer` against the lower-cased gold yes/no) and ``acc+`` = the share of images whose two questions
    are both right; the subtask's score is 100·acc + 100·acc+ (at most 200). ``perception`` sums the 10 perception
    subtasks, ``cognition`` the 4 cognition ones (LLaVA-1.5's table reports perception).

    ``update(predictions, labels, subtasks, images)``: the generated text, the gold ``"Yes"``/``"No"``, the subtask
    (one of :data:`MME_SUBTASKS`) and a key naming the question's image (its pair). Rows are kept as ``"cat"``
    states, so the two questions of an image may arrive in any batch and on any rank. ``compute()`` →
    ``{"perception", "cognition", "<subtask>"`` for each subtask that had questions (lower-case: ``ocr``),
    ``"num_samples"}``; an image without exactly two questions is a :class:`DataError` (the official script asserts
    it).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_text_state(self, "images")
        self.add_state("subtask_ids", default=[], dist_reduce_fx="cat")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], labels: Sequence[str], subtasks: Sequence[str], images: Sequence[str]) -> None:
        name = type(self).__name__
        check_lengths(name, predictions=predictions, labels=labels, subtasks=subtasks, images=images)
        for i, (label, subtask) in enumerate(zip(labels, subtasks)):
            if str(label).lower() not in ("yes", "no"):
                raise DataError(f"{name}.update: sample {i} of the batch has label {label!r}; MME labels are Yes or No.")
            if subtask not in MME_SUBTASKS:
                raise DataError(f"{name}.update: sample {i} of the batch has subtask {subtask!r}, not one of MME's "
                                f"{', '.join(MME_SUBTASKS)}.")
        hits = [mme_answer(p) == str(g).lower() for p, g in zip(predictions, labels)]
        append_texts(self, "images", [f"{s}/{im}" for s, im in zip(subtasks, images)])
        self.subtask_ids.append(torch.tensor([MME_SUBTASKS.index(s) for s in subtasks], dtype=torch.float32, device=self.device))
        self.hits.append(torch.tensor(hits, dtype=torch.float32, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        subtasks = [MME_SUBTASKS[int(k)] for k in cat_state(self.subtask_ids).tolist()]
        hits = [h > 0.5 for h in cat_state(self.hits).tolist()]
        pairs: dict[str, list[bool]] = {}
        for image, hit in zip(read_texts(self, "images"), hits):
            pairs.setdefault(image, []).append(hit)
        odd = sorted(k for k, v in pairs.items() if len(v) != 2)
        if odd:
            raise DataError(f"MME scores each image's two questions as a pair; images {odd[:5]} have "
                            f"{[len(pairs[k]) for k in odd[:5]]} questions. Score whole pairs (a --limit keeps them).")
        scores: dict[str, float] = {}
        for subtask in MME_SUBTASKS:
            mine = [h for s, h in zip(subtasks, hits) if s == subtask]
            if not mine:
                continue
            images = [v for k, v in pairs.items() if k.startswith(f"{subtask}/")]
            acc, acc_plus = sum(mine) / len(mine), sum(all(v) for v in images) / len(images)
            scores[subtask] = acc * 100 + acc_plus * 100  # calculation.py: task_score += v * 100 for acc, then acc_plus

        def total(names: Sequence[str]) -> torch.Tensor:
            return torch.tensor(sum(scores[n] for n in names if n in scores), dtype=torch.float64)

        return {"perception": total(MME_PERCEPTION), "cognition": total(MME_COGNITION),
                **{category_key(k): torch.tensor(v, dtype=torch.float64) for k, v in scores.items()},
                "num_samples": torch.tensor(float(len(hits)), dtype=torch.float64)}
