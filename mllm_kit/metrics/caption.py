"""Captioning: coco-caption's scores (:class:`COCOCaptionScores`: its PTB tokenisation, "Bleu_4", "ROUGE_L" and
"CIDEr"), and the single metrics BLEU-4 and ROUGE-L (torchmetrics' own implementations) and CIDEr-D.

The single metrics take tokenised captions (tokens separated by spaces), as coco-caption scores them after its Java
``PTBTokenizer``. For raw captions pass ``tokenize=True``: :func:`ptb_tokenize` is a pure-python stand-in for that
tokenizer (see its docstring). :class:`COCOCaptionScores` takes raw captions and tokenises them all at once with
:func:`coco_tokenize` (the Java tokenizer when it is installed).
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore, ROUGEScore

from mllm_kit.errors import ConfigError, DataError
from mllm_kit.log import get_logger
from mllm_kit.metrics.base import add_text_state, answer_lists, append_texts, cat_state, check_lengths, read_texts
from mllm_kit.metrics.normalize import ptb_tokenize

log = get_logger(__name__)
TOKENIZERS = ("auto", "java", "python")


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
    log_docs = float(np.log(float(len(refs)))) if refs else 0.0  # np.log as CiderScorer: its last bit can differ from math.log

    def vector(counts: Counter) -> tuple[dict, list[float], int]:
        vec = {g: float(tf) * (log_docs - float(np.log(max(1.0, df[g])))) for g, tf in counts.items()}
        norms = [0.0] * n
        for g, w in vec.items():
            norms[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norms], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norm, length = vector(cand)
        score = np.zeros(n)
        for ref in rs:  # CiderScorer.compute_cider's order of operations, so the floats come out identical
            vec_r, norm_r, length_r = vector(ref)
            val = np.zeros(n)
            for g, w in vec.items():
                val[len(g) - 1] += min(w, vec_r.get(g, 0.0)) * vec_r.get(g, 0.0)
            for k in range(n):
                if norm[k] != 0 and norm_r[k] != 0:
                    val[k] /= norm[k] * norm_r[k]
                val[k] *= math.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))
            score += val
        scores.append(float(np.mean(score)) / len(rs) * 10.0)
    return scores


class _CaptionCorpus(Metric):
    """Candidates and their references kept as ``"cat"``-reduced text states: corpus scores (CIDEr's document
    frequencies, corpus BLEU) need every caption of the evaluated set, on every rank."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_text_state(self, "candidates")
        add_text_state(self, "references")
        self.add_state("reference_counts", default=[], dist_reduce_fx="cat")

    def _append(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        append_texts(self, "candidates", candidates)
        append_texts(self, "references", [r for rs in references for r in rs])
        self.reference_counts.append(torch.tensor([len(rs) for rs in references], dtype=torch.float32, device=self.device))

    def _corpus(self) -> tuple[list[str], list[list[str]]]:
        cands, flat = read_texts(self, "candidates"), read_texts(self, "references")
        ends = cat_state(self.reference_counts).to(torch.int64).cumsum(0).tolist()
        return cands, [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]


class CIDErD(_CaptionCorpus):
    """CIDEr-D, equal to pycocoevalcap's ``Cider`` scorer (coco-caption's "CIDEr", which is CIDEr-D: clipped
    candidate counts and the Gaussian length penalty, n = 4, σ = 6, ×10) and vrama91/cider's ``CiderD`` in corpus
    mode. Document frequencies come from the references of the whole evaluated corpus, so candidates and references
    are kept as states (``"cat"``-reduced across ranks) and scored in ``compute()``.

    ``update(predictions, references)``: one candidate caption and its reference captions per image, tokenised and
    space-separated (``tokenize=True`` applies :func:`ptb_tokenize` first). ``compute()`` → ``{"cider", "num_samples"}``.
    """

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(n, int) or n < 1 or sigma <= 0:
            raise ConfigError(f"CIDErD needs an n-gram order n >= 1 and sigma > 0 (CIDEr-D uses 4 and 6.0); got n={n!r}, "
                              f"sigma={sigma!r}.")
        self.n, self.sigma, self.tokenize = n, sigma, tokenize

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        self._append(*caption_inputs(type(self).__name__, predictions, references, self.tokenize))

    def compute(self) -> dict[str, torch.Tensor]:
        scores = cider_d_scores(*self._corpus(), self.n, self.sigma)
        return {"cider": torch.tensor(float(np.mean(scores)) if scores else 0.0, dtype=torch.float64),
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


# ---- coco-caption (pycocoevalcap) ----------------------------------------------------------------------------------

_warned_python_tokenizer = False


def coco_tokenize(texts: Sequence[str], tokenizer: str = "auto") -> list[str]:
    """coco-caption's tokenisation of raw captions: Stanford PTBTokenizer (``-preserveLines -lowerCase``) and its
    punctuation filter. ``"java"``: pycocoevalcap's own ``PTBTokenizer`` wrapper (needs ``java`` on the PATH and
    pycocoevalcap, from the ``dev`` extra); ``"python"``: the stand-in :func:`ptb_tokenize`; ``"auto"``: Java when both
    are there, else the stand-in with a warning (it equals PTB on ordinary captions, not on every rare case)."""
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"caption tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}.")
    if tokenizer == "auto":
        tokenizer = "java" if _java_tokenizer_available() else "python"
        global _warned_python_tokenizer
        if tokenizer == "python" and not _warned_python_tokenizer:
            _warned_python_tokenizer = True
            log.warning("coco-caption's Java PTBTokenizer is not available (needs `java` on the PATH and pycocoevalcap); "
                        "captions are tokenised by mllm-kit's pure-python stand-in, so scores may differ slightly from "
                        "coco-caption's on rare tokens (docs/evaluation.md#captions).")
    if tokenizer == "python" or not texts:
        return [ptb_tokenize(t) for t in texts]
    if not _java_tokenizer_available():
        raise ConfigError("caption tokenizer 'java' needs `java` on the PATH and pycocoevalcap (pip install 'mllm-kit[dev]').")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({k: [{"caption": t}] for k, t in enumerate(texts)})
    if len(out) != len(texts):
        raise DataError(f"coco-caption's PTBTokenizer returned {len(out)} lines for {len(texts)} captions.")
    return [out[k][0] for k in range(len(texts))]


def _java_tokenizer_available() -> bool:
    import importlib.util

    return shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None


def coco_bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap's corpus "Bleu_4" (``BleuScorer.compute_score(option="closest")``, same operations in the same
    order) on tokenised captions: clipped n-gram matches and guesses summed over the corpus, the 1e-15 / 1e-9
    smoothing constants, and the brevity penalty from, per candidate, the closest reference length (the shorter on
    a tie)."""
    small, tiny, n = 1e-9, 1e-15, 4
    correct, guess, testlen, reflen = [0] * n, [0] * n, 0, 0
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        counts = Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))
        max_ref: dict[tuple, int] = {}
        for ref in refs:
            ref_words = ref.split()
            ref_counts = Counter(tuple(ref_words[i:i + k]) for k in range(1, n + 1) for i in range(len(ref_words) - k + 1))
            for gram, count in ref_counts.items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        testlen += len(words)
        reflen += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
    bleu = 1.0
    for k in range(n):
        bleu *= float(correct[k] + tiny) / (guess[k] + small)
    bleu4 = bleu ** (1.0 / n)
    ratio = (testlen + tiny) / (reflen + small)
    return bleu4 * math.exp(1 - 1 / ratio) if ratio < 1 else bleu4


def coco_rouge_l_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> list[float]:
    """pycocoevalcap's per-image "ROUGE_L" (``Rouge.calc_score``) on tokenised captions: the LCS over tokens split on
    single spaces, the best precision and the best recall over the references taken separately, then
    F = (1 + β²)·P·R / (R + β²·P) with β = 1.2 (0 when P or R is 0). Sic: an empty caption is one empty token."""
    scores = []
    for candidate, refs in zip(candidates, references):
        tokens = candidate.split(" ")
        lcs = [_lcs(ref.split(" "), tokens) for ref in refs]
        prec = max(x / float(len(tokens)) for x in lcs)
        rec = max(x / float(len(ref.split(" "))) for x, ref in zip(lcs, refs))
        scores.append(((1 + beta ** 2) * prec * rec) / float(rec + beta ** 2 * prec) if prec != 0 and rec != 0 else 0.0)
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


class COCOCaptionScores(_CaptionCorpus):
    """coco-caption's caption scores as pycocoevalcap computes them (the COCO caption evaluation server, and
    lmms-eval's ``coco_cap`` tasks): raw captions tokenised by :func:`coco_tokenize`, then "Bleu_4"
    (:func:`coco_bleu4`), "ROUGE_L" (:func:`coco_rouge_l_scores`, averaged) and "CIDEr" (:func:`cider_d_scores`).

    ``update(predictions, references)``: one raw candidate and its raw reference captions per image.
    ``tokenizer``: ``auto`` | ``java`` | ``python`` (:func:`coco_tokenize`). ``compute()`` → ``{"bleu4", "rouge_l",
    "cider", "num_samples"}``; everything is tokenised at once there (one Java start).
    """

    def __init__(self, tokenizer: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"COCOCaptionScores tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}.")
        self.tokenizer = tokenizer

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        self._append(*caption_inputs(type(self).__name__, predictions, references, tokenize=False))

    def compute(self) -> dict[str, torch.Tensor]:
        cands, refs = self._corpus()
        tokens = coco_tokenize([*cands, *(r for rs in refs for r in rs)], self.tokenizer)
        cands, flat = tokens[: len(cands)], tokens[len(cands):]
        ends = np.cumsum([len(rs) for rs in refs]).tolist()
        refs = [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(float(value), dtype=torch.float64)

        if not cands:
            return {"bleu4": scalar(0), "rouge_l": scalar(0), "cider": scalar(0), "num_samples": scalar(0)}
        return {"bleu4": scalar(coco_bleu4(cands, refs)), "rouge_l": scalar(np.mean(coco_rouge_l_scores(cands, refs))),
                "cider": scalar(np.mean(cider_d_scores(cands, refs))), "num_samples": scalar(len(cands))}
