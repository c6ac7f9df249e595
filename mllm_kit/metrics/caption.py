"""Captioning: BLEU-4 and ROUGE-L (torchmetrics' own implementations) and CIDEr-D (coco-caption's scorer).

Inputs are tokenised captions (tokens separated by spaces), as coco-caption scores them after its Java
``PTBTokenizer``; that tokenizer is not run here. For raw captions pass ``tokenize=True``: :func:`ptb_tokenize`
lower-cases and drops PTB's punctuation tokens in pure python (an approximation, see its docstring).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore, ROUGEScore

from mllm_kit.errors import ConfigError
from mllm_kit.metrics.base import add_text_state, answer_lists, append_texts, cat_state, check_lengths, read_texts
from mllm_kit.metrics.normalize import ptb_tokenize


def caption_inputs(metric: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                   tokenize: bool) -> tuple[list[str], list[list[str]]]:
    """Checked candidates and their references (at least one per candidate), PTB-tokenised when asked."""
    check_lengths(metric, predictions=predictions, references=references)
    refs = answer_lists(metric, references, what="reference caption", hint=" Pass the reference captions of "
                       "every candidate (drop candidates whose image has none).")
    if tokenize:
        return [ptb_tokenize(p) for p in predictions], [[ptb_tokenize(r) for r in rs] for rs in refs]
    return list(predictions), refs


def _ngrams(caption: str, n: int) -> Counter:
    words = caption.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                   sigma: float = 6.0) -> list[float]:
    """Per-candidate CIDEr-D, as pycocoevalcap's ``CiderScorer.compute_cider`` (= vrama91/cider's ``CiderD`` with
    ``df_mode="corpus"``) computes it on whitespace-tokenised captions.

    n-gram vectors are tf × (log(#candidates) − log(max(1, df))), df = the number of candidates whose references
    contain the n-gram; per reference and n-gram order, Σ min(w_cand, w_ref)·w_ref (candidate weights clipped by the
    reference's) over the two norms, times exp(−δ²/2σ²); averaged over orders and references, ×10. Sic: δ, the
    "length" difference, is the difference in *bigram* counts (coco-caption counts ``len(ngram) == 2`` terms).
    """
    cands = [_ngrams(c, n) for c in candidates]
    refs = [[_ngrams(r, n) for r in rs] for rs in references]
    df = Counter(gram for rs in refs for gram in set().union(*rs))
    log_docs = math.log(len(refs)) if refs else 0.0

    def vector(counts: Counter) -> tuple[dict, list[float], int]:
        vec = {g: tf * (log_docs - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
        norms = [0.0] * n
        for g, w in vec.items():
            norms[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norms], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norm, length = vector(cand)
        total = 0.0
        for ref in rs:
            vec_r, norm_r, length_r = vector(ref)
            sims = [0.0] * n
            for g, w in vec.items():
                sims[len(g) - 1] += min(w, vec_r.get(g, 0.0)) * vec_r.get(g, 0.0)
            sims = [s / (a * b) if a != 0 and b != 0 else s for s, a, b in zip(sims, norm, norm_r)]
            total += sum(sims) * math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * total / n / len(rs))
    return scores


class CIDErD(Metric):
    """CIDEr-D, equal to pycocoevalcap's ``Cider`` scorer (coco-caption's "CIDEr", which is CIDEr-D: clipped
    candidate counts and the Gaussian length penalty, n = 4, σ = 6, ×10) and vrama91/cider's ``CiderD`` in corpus
    mode. Document frequencies come from the references of the whole evaluated corpus, so candidates and references
    are kept as states (``"cat"``-reduced across ranks) and scored in ``compute()``.

    ``update(predictions, references)``: one candidate caption and its reference captions per image, tokenised and
    space-separated (``tokenize=True`` applies :func:`ptb_tokenize` first). ``compute()`` → ``{"cider", "num_samples"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(n, int) or n < 1 or sigma <= 0:
            raise ConfigError(f"CIDErD needs an n-gram order n >= 1 and sigma > 0 (CIDEr-D uses 4 and 6.0); got n={n!r}, "
                              f"sigma={sigma!r}.")
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        add_text_state(self, "candidates")
        add_text_state(self, "references")
        self.add_state("reference_counts", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        cands, refs = caption_inputs(type(self).__name__, predictions, references, self.tokenize)
        append_texts(self, "candidates", cands)
        append_texts(self, "references", [r for rs in refs for r in rs])
        self.reference_counts.append(torch.tensor([len(rs) for rs in refs], dtype=torch.float32, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        cands, flat = read_texts(self, "candidates"), read_texts(self, "references")
        ends = cat_state(self.reference_counts).to(torch.int64).cumsum(0).tolist()
        refs = [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]
        scores = cider_d_scores(cands, refs, self.n, self.sigma)
        return {"cider": torch.tensor(sum(scores) / len(scores) if scores else 0.0, dtype=torch.float64),
                "num_samples": torch.tensor(float(len(scores)), dtype=torch.float64)}


class BLEU4(BLEUScore):
    """Corpus BLEU-4 from torchmetrics' ``BLEUScore`` (n = 4, uniform weights, no smoothing, brevity penalty from the
    closest reference length). It agrees with pycocoevalcap's ``Bleu(4)`` "Bleu_4" up to coco-caption's 1e-9 / 1e-15
    smoothing constants, except that on a tie between two closest reference lengths torchmetrics takes the first
    reference and coco-caption the shorter one.

    ``update(predictions, references)``: as :class:`CIDErD`. ``compute()`` → ``{"bleu4"}``.
    """

    def __init__(self, tokenize: bool = False, **kwargs) -> None:
        super().__init__(n_gram=4, **kwargs)
        self.tokenize = tokenize

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        super().update(*caption_inputs(type(self).__name__, predictions, references, self.tokenize))

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"bleu4": super().compute()}


class RougeL(ROUGEScore):
    """ROUGE-L from torchmetrics' ``ROUGEScore`` (LCS F1, the best reference per candidate, averaged over candidates;
    torchmetrics' default normaliser: lower-case, non-alphanumerics to spaces). Not coco-caption's "ROUGE_L", which
    uses β = 1.2 and the best precision and best recall over references separately.

    ``update(predictions, references)``: as :class:`CIDErD`. ``compute()`` → ``{"rouge_l", "rouge_l_precision",
    "rouge_l_recall"}``.
    """

    def __init__(self, tokenize: bool = False, **kwargs) -> None:
        super().__init__(rouge_keys="rougeL", **kwargs)
        self.tokenize = tokenize

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        super().update(*caption_inputs(type(self).__name__, predictions, references, self.tokenize))

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        scores = super().compute()
        return {"rouge_l": scores["rougeL_fmeasure"], "rouge_l_precision": scores["rougeL_precision"],
                "rouge_l_recall": scores["rougeL_recall"]}
