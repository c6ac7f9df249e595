"""mllm-kit's metrics against the official scorers' own code, on random inputs: VQAv2 soft accuracy against
GT-Vision-Lab/VQA's ``vqaEval.py`` (``VQAEval.evaluate``), and MMBench's letter matching (``parse_option_letter``,
``LetterChoiceAccuracy``) against VLMEvalKit's ``can_infer`` at commit c6bdffd3. The official file is read from a
local checkout (nothing is downloaded) and run unchanged but for what Python 3 needs: ``vqaEval.py`` is Python 2 (its
``print`` statements are dropped), and ``matching_util.py``'s package import (``from ..smp import *``, used only for
a logger under ``VERBOSE``) is left out.

    git clone https://github.com/GT-Vision-Lab/VQA /tmp/VQA          # checked at a013f00
    python benchmarks/metric_parity.py vqav2 --official /tmp/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py
    git clone https://github.com/open-compass/VLMEvalKit /tmp/VLMEvalKit
    git -C /tmp/VLMEvalKit show c6bdffd3:vlmeval/utils/matching_util.py > /tmp/matching_util.py
    python benchmarks/metric_parity.py mc_letter --official /tmp/matching_util.py

Each prints how many inputs it compared and how many differed (with the first few), and exits 1 if any did. Seconds
on a CPU. One difference is known and left out of the random answers unless ``--api-marker``: VLMEvalKit's
``can_infer_option`` skips the letter rules for an answer containing "Failed to obtain answer via API" (the string its
API-model wrappers return on a failed request), and ``parse_option_letter`` does not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
import sys
from pathlib import Path

# Answers that exercise vqaEval.py's normalisation: number words, articles, punctuation touching spaces or not, the
# digit-comma-digit and period rules, contractions (and the missing "its" entry), case, surrounding whitespace.
VQA_GROUPS = [
    ["two", "2", "Two", "2.", "two!", " 2 ", "2\n", "a two"],
    ["dog", "a dog", "the dog", "Dog", "dog.", "dogs", "(dog)", "dog ,", "an dog"],
    ["yes", "Yes", "yes.", "YES", "yes!", " yes", "yes\t"],
    ["no", "No", "no.", "none", "0", "zero", "nope"],
    ["3,000", "3000", "3, 000", "3.000", "3.5", "3. 5", "three thousand"],
    ["it's", "its", "it s", "dont", "don't", "whats", "what's", "wont", "won't", "somebody'd"],
    ["t-shirt", "tshirt", "t shirt", "t - shirt", "T-Shirt", "shirt"],
    ["left", "left side", "the left", "on the left", "left.", "left/right", "left / right"],
    ["mr. smith", "mr smith", "Mr. Smith", "e.g.", "eg", "1.", "1", "...", "one"],
    ["red and white", "red, white", "red white", "red & white", "red;white", "red; white", "[red]", "{red}"],
]

# Answers that exercise VLMEvalKit's can_infer: bare and decorated letters, several letters, "A" as an article, the
# refusals and "Z", option texts (contained, cased, overlapping).
MC_WORDS = ["cat", "dog", "black cat", "red", "a red car", "blue", "Paris", "the sea", "none of these", "A", "apple", "left"]
MC_PIECES = ["{L}", "({L})", "{L}.", "{L}:", "[{L}]", "{{{L}}}", "*{L}*", "#{L}", "{L};", "{L}!", "Answer: {L}",
             "The answer is {L}", "option {L}", "{L} and {M}", "{L}{M}", "{l}", "Z", "z", "A {T}", "a {T}", "{T}", "{TU}",
             "I think it is {T}.", "{L}. {T}", "Cannot determine the answer", "I can't process this file.",
             "Sorry, I can't help with images of people yet.", "I'm sorry, but without the image provided",
             "", "maybe", "{L}, {M} or {N}"]
# can_infer_option skips the letter rules for an answer holding this marker (VLMEvalKit's API wrappers return it when
# a request fails; a local model never does) and goes to option-text matching; parse_option_letter has no such case.
API_FAILURE = "Failed to obtain answer via API"


def load_vqa_eval(path: Path):
    """vqaEval.py's ``VQAEval`` class, its Python 2 ``print`` statements dropped (the rest runs as written)."""
    source = re.sub(r"^(\s*)print .*$", r"\1pass", path.read_text(), flags=re.MULTILINE)
    namespace: dict = {"__name__": "vqaEval"}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - the official scorer, read from the user's checkout
    return namespace["VQAEval"]


def vqav2(official: Path, questions: int, seed: int) -> list[str]:
    from mllm_kit.metrics.vqa import VQAv2Accuracy, vqa_soft_accuracy

    class Raw(load_vqa_eval(official)):
        """Records each question's unrounded accuracy (the official class stores it ×100, rounded to 2 decimals)."""

        def setEvalQA(self, quesId, acc):
            self.raw[quesId] = acc

    class Data:  # the two attributes VQAEval reads of its VQA objects
        def __init__(self, qa: dict) -> None:
            self.qa = qa

        def getQuesIds(self) -> list:
            return list(self.qa)

    rng = random.Random(seed)
    pool = [a for group in VQA_GROUPS for a in group]
    gts, res, cases = {}, {}, {}
    for q in range(questions):
        group = rng.choice(VQA_GROUPS)
        n = rng.randint(2, 12)
        if rng.random() < 0.2:  # unanimous: vqaEval.py compares the raw trimmed strings
            answers = [rng.choice(group)] * n
        else:
            answers = [rng.choice(group) if rng.random() < 0.85 else rng.choice(pool) for _ in range(n)]
        prediction = rng.choice(group) if rng.random() < 0.9 else rng.choice(pool)
        # answer_id keeps equal answers distinct, as in VQAv2's annotations (evaluate() leaves one dict out by !=)
        gts[q] = {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)], "question_type": "t",
                  "answer_type": "a"}
        res[q] = {"answer": prediction}
        cases[q] = (prediction, answers)
    scorer = Raw(Data(gts), Data(res), n=2)
    scorer.raw = {}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
        scorer.evaluate()
    differ = [f"question {q}: prediction {p!r}, answers {a!r}: official {scorer.raw[q]!r}, mllm-kit {vqa_soft_accuracy(p, a)!r}"
              for q, (p, a) in cases.items() if abs(scorer.raw[q] - vqa_soft_accuracy(p, a)) > 1e-12]
    metric = VQAv2Accuracy()
    metric.update([p for p, _ in cases.values()], [a for _, a in cases.values()])
    overall = round(100 * float(metric.compute()["accuracy"]), 2)
    if overall != scorer.accuracy["overall"]:
        differ.append(f"overall: official {scorer.accuracy['overall']}, mllm-kit VQAv2Accuracy {overall}")
    print(f"vqav2: {questions} questions (2-12 answers each), official overall {scorer.accuracy['overall']}, "
          f"mllm-kit {overall}; {len(differ)} differ")
    return differ


def load_can_infer(path: Path):
    """matching_util.py's ``can_infer``, without its package import (``from ..smp import *``): the names it uses from
    there (``get_logger``) are only reached with ``VERBOSE`` set, which this script clears."""
    source = re.sub(r"^from \.\.smp import \*$", "", path.read_text(), flags=re.MULTILINE)
    namespace: dict = {"__name__": "matching_util"}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - the official matcher, read from the user's checkout
    return namespace["can_infer"]


def mc_letter(official: Path, answers: int, seed: int, api_marker: bool = False) -> list[str]:
    import os

    from mllm_kit.metrics.choice import LetterChoiceAccuracy, parse_option_letter

    os.environ.pop("VERBOSE", None)
    can_infer = load_can_infer(official)
    rng = random.Random(seed)
    pieces = [*MC_PIECES, API_FAILURE] if api_marker else MC_PIECES
    differ, rows = [], []
    for k in range(answers):
        count = rng.randint(2, 6)
        options = rng.sample(MC_WORDS, count)
        letters = "ABCDEF"[:count]
        parts = []
        for _ in range(rng.randint(1, 2)):
            text = rng.choice(options)
            parts.append(rng.choice(pieces).format(L=rng.choice(letters), M=rng.choice(letters), N=rng.choice("ABCDEFZ"),
                                                      l=rng.choice(letters).lower(), T=text, TU=text.upper()))
        answer = " ".join(parts)
        found = can_infer(answer, dict(zip(letters, options)))  # it lower-cases the dict's texts in place: a fresh one
        expected = found if found in tuple(letters) else None  # False (no match) and "Z" (a refusal) score no option
        ours = parse_option_letter(answer, options=options)
        if ours != expected:
            differ.append(f"answer {k}: {answer!r}, options {options!r}: official {found!r}, mllm-kit {ours!r}")
        rows.append((answer, rng.choice(letters), options, expected))
    metric = LetterChoiceAccuracy()
    metric.update([a for a, *_ in rows], [g for _, g, *_ in rows], options=[o for *_, o, _ in rows])
    accuracy = float(metric.compute()["accuracy"])
    official_accuracy = sum(e == g for _, g, _, e in rows) / len(rows)
    if abs(accuracy - official_accuracy) > 1e-12:
        differ.append(f"accuracy: official {official_accuracy}, mllm-kit LetterChoiceAccuracy {accuracy}")
    print(f"mc_letter: {answers} answers (2-6 options each), accuracy against a random gold letter: official "
          f"{official_accuracy:.4f}, mllm-kit {accuracy:.4f}; {len(differ)} differ")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metric", choices=["vqav2", "mc_letter"])
    parser.add_argument("--official", type=Path, required=True,
                        help="vqaEval.py (vqav2) or VLMEvalKit's vlmeval/utils/matching_util.py at c6bdffd3 (mc_letter)")
    parser.add_argument("--count", type=int, default=None, help="questions (default 3,000) or answers (default 20,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-marker", action="store_true",
                        help=f"mc_letter: also put VLMEvalKit's {API_FAILURE!r} in answers (a known difference)")
    args = parser.parse_args()
    if not args.official.is_file():
        raise SystemExit(f"--official {args.official}: no such file; the docstring says where to get it.")
    if args.metric == "vqav2":
        differ = vqav2(args.official, args.count or 3000, args.seed)
    else:
        differ = mc_letter(args.official, args.count or 20000, args.seed, args.api_marker)
    for line in differ[:20]:
        print("  " + line)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
