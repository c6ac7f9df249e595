"""Benchmark metrics as torchmetrics ``Metric``s whose states sync across DDP ranks, each equal to its benchmark's
official implementation (docs/evaluation.md#metrics).

``METRICS`` maps the names a recipe or bench config uses (``metric: vqav2``) to classes; :func:`build_metric`
builds one by name with keyword options.
"""

from __future__ import annotations

from torchmetrics import Metric

from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.metrics.anls import ANLS, anls_score
from mllm_kit.metrics.caption import (
    BLEU4,
    CIDErD,
    COCOCaptionScores,
    RougeL,
    cider_d_scores,
    coco_bleu4,
    coco_rouge_l_scores,
    coco_tokenize,
)
from mllm_kit.metrics.choice import (
    CircularChoiceAccuracy,
    LetterChoiceAccuracy,
    LikelihoodChoiceAccuracy,
    ScienceQAAccuracy,
    SEEDAccuracy,
    parse_option_letter,
    scienceqa_choice,
)
from mllm_kit.metrics.mme import MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS, MMEScore, mme_answer
from mllm_kit.metrics.normalize import (
    evalai_answer,
    normalize_anls_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    ptb_tokenize,
)
from mllm_kit.metrics.pope import POPE, pope_answer_is_yes
from mllm_kit.metrics.vqa import (
    ExactMatch,
    GQAAccuracy,
    TextVQAAccuracy,
    VizWizAccuracy,
    VQAv2Accuracy,
    gqa_answer,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_soft_accuracy,
)

METRICS: dict[str, type[Metric]] = {
    "vqav2": VQAv2Accuracy,
    "textvqa": TextVQAAccuracy,
    "vizwiz": VizWizAccuracy,
    "gqa": GQAAccuracy,
    "exact_match": ExactMatch,
    "anls": ANLS,
    "docvqa": ANLS,
    "mc_likelihood": LikelihoodChoiceAccuracy,
    "mc_letter": LetterChoiceAccuracy,
    "mmbench": CircularChoiceAccuracy,
    "mmbench_circular": CircularChoiceAccuracy,
    "pope": POPE,
    "scienceqa": ScienceQAAccuracy,
    "seed": SEEDAccuracy,
    "mme": MMEScore,
    "coco_caption": COCOCaptionScores,
    "bleu4": BLEU4,
    "rouge_l": RougeL,
    "cider": CIDErD,
    "cider_d": CIDErD,
}


def build_metric(name: str, **options) -> Metric:
    """``METRICS[name](**options)``; a :class:`ConfigError` listing the names for an unknown one."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}.{did_you_mean(name, METRICS)} Known metrics: {', '.join(sorted(METRICS))}.")
    try:
        return METRICS[name](**options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metric {name!r} ({METRICS[name].__name__}) does not take these options {sorted(options)}: {err}")


__all__ = [
    "ANLS",
    "BLEU4",
    "METRICS",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "MME_SUBTASKS",
    "POPE",
    "CIDErD",
    "COCOCaptionScores",
    "CircularChoiceAccuracy",
    "ExactMatch",
    "GQAAccuracy",
    "LetterChoiceAccuracy",
    "LikelihoodChoiceAccuracy",
    "MMEScore",
    "RougeL",
    "SEEDAccuracy",
    "ScienceQAAccuracy",
    "TextVQAAccuracy",
    "VQAv2Accuracy",
    "VizWizAccuracy",
    "anls_score",
    "build_metric",
    "cider_d_scores",
    "coco_bleu4",
    "coco_rouge_l_scores",
    "coco_tokenize",
    "evalai_answer",
    "gqa_answer",
    "mme_answer",
    "normalize_anls_answer",
    "normalize_gqa_answer",
    "normalize_vqa_answer",
    "parse_option_letter",
    "pope_answer_is_yes",
    "ptb_tokenize",
    "scienceqa_choice",
    "textvqa_accuracy",
    "vizwiz_accuracy",
    "vqa_soft_accuracy",
]
