"""Benchmark metrics (``mllm_kit.metrics``): each equals its official implementation on hand-checked fixtures, the
same on 1 and 2 DDP ranks (gloo, CPU), and bad input raises a DataError that names what is missing."""

from __future__ import annotations

import contextlib
import io
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mllm_kit.errors import ConfigError, DataError
from mllm_kit.metrics import (
    ANLS,
    BLEU4,
    METRICS,
    POPE,
    CIDErD,
    CircularChoiceAccuracy,
    COCOCaptionScores,
    ExactMatch,
    GQAAccuracy,
    LetterChoiceAccuracy,
    LikelihoodChoiceAccuracy,
    MMEScore,
    RougeL,
    ScienceQAAccuracy,
    SEEDAccuracy,
    TextVQAAccuracy,
    VizWizAccuracy,
    VQAv2Accuracy,
    anls_score,
    build_metric,
    cider_d_scores,
    coco_bleu4,
    coco_rouge_l_scores,
    evalai_answer,
    mme_answer,
    normalize_vqa_answer,
    parse_option_letter,
    pope_answer_is_yes,
    ptb_tokenize,
    scienceqa_choice,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_soft_accuracy,
)

# ---- VQAv2 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("two", "2"), ("Two Dogs!", "2 dogs"), ("none", "0"),           # manualMap: number words -> digits
    ("a dog", "dog"), ("The Dog.", "dog"), ("an apple", "apple"),  # articles dropped, periods stripped
    ("dont", "don't"), ("isnt", "isn't"),                          # contractions table
    ("its", "its"), ("it's", "it's"),                              # vqaEval.py has no "its" entry: they stay apart
    ("1,000", "1000"), ("1,000 dogs!", "1000 dogs"),               # digit,digit: every mark deleted, not spaced
    ("yes!", "yes"), ("3.5", "3.5"), ("black-and-white", "black and white"), ("black - white", "black white"),
    (" left\n", "left"),
])
def test_vqa_normalisation_matches_vqaeval(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_soft_accuracy_leave_one_out_values():
    others = ["cat", "dog", "bird", "cow", "fox", "owl", "elk", "bee", "ant", "yak"]
    # 10 answers, m match: mean over the 10 leave-one-out subsets of min(matches/3, 1)
    #   m=0: 0
    #   m=1: 1 subset (the match left out) has 0 matches, 9 have 1 → 9·(1/3)/10 = 0.3
    #   m=2: 2 subsets have 1 match, 8 have 2 → (2/3 + 16/3)/10 = 0.6
    #   m=3: 3 subsets have 2, 7 have 3 → (3·2/3 + 7·1)/10 = 0.9
    #   m=4: every subset has ≥ 3 → 1.0
    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)]:
        answers = ["2"] * m + others[: 10 - m]
        assert vqa_soft_accuracy("two", answers) == pytest.approx(expected, abs=1e-12), m
    # normalisation on both sides (humans disagree): "Two." and "2" match, "a dog" and "dog" match
    assert vqa_soft_accuracy("Two.", ["2", "2", "2", "two", "3"] + others[:5]) == pytest.approx(1.0)
    assert vqa_soft_accuracy("a dog", ["dog", "dog", "the dog"] + others[2:9]) == pytest.approx(0.9)
    assert vqa_soft_accuracy("1,000", ["1000", "1000"] + others[2:10]) == pytest.approx(0.6)
    # 5 answers, 2 match: (2·min(1, 1/3) + 3·min(1, 2/3)) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_soft_accuracy("dog", ["dog", "dog", "cat", "cow", "fox"]) == pytest.approx(8 / 15)
    # vqaEval.py quirk: unanimous answers are compared raw (trimmed only), without normalisation
    assert vqa_soft_accuracy("two", ["2"] * 10) == 0.0 and vqa_soft_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_soft_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_soft_accuracy(" yes\t", ["yes"] * 10) == 1.0


def test_vqav2_metric_and_bad_input():
    metric = VQAv2Accuracy()
    metric.update(["two", "cat"], [["2"] * 2 + ["3"] * 8, ["dog"] * 10])
    metric.update(["a dog"], [["dog"] * 3 + ["cat"] * 7])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx((0.6 + 0.0 + 0.9) / 3)
    assert out["num_samples"].item() == 3
    with pytest.raises(DataError, match=r"sample 1 .* gold answers \[\]"):
        metric.update(["a", "b"], [["a", "a"], []])
    with pytest.raises(DataError, match="leave-one-out"):
        metric.update(["a"], [["a"]])
    with pytest.raises(DataError, match="2 predictions, 1 answers"):
        metric.update(["a", "b"], [["a", "b"]])


@pytest.mark.parametrize("raw, processed", [
    ("Yes", "yes"), ("Two dogs.", "2 dogs"), ("The cat's toy", "cat 's toy"),   # lower-case, digits, "'s" split off
    ("1,000", "1000"), ("What?", "what"), ("Unanswerable", "unanswerable"),    # "," and "?" deleted first
    ("dont", "don't"), ("a black-and-white dog!", "black and white dog"), (" left\n", "left"), ("", ""),
])
def test_evalai_answer_processor(raw, processed):
    """EvalAIAnswerProcessor()(raw) of LLaVA's llava/eval/m4c_evaluator.py (the expected values were produced by it)."""
    assert evalai_answer(raw) == processed


def test_textvqa_and_vizwiz_accuracy():
    # TextVQA (m4c TextVQAAccuracyEvaluator): EvalAI's processor on both sides, always -- even for unanimous answers
    assert textvqa_accuracy("Yes", ["yes"] * 10) == 1.0 and vqa_soft_accuracy("Yes", ["yes"] * 10) == 0.0
    assert textvqa_accuracy("Dakota.", ["DAKOTA"] * 2 + ["dakota digital"] * 8) == pytest.approx(0.6)
    # VizWiz (its vqaEval.py): the prediction is normalised, the human answers are compared raw
    assert vizwiz_accuracy("Unanswerable", ["unanswerable"] * 10) == 1.0
    assert vizwiz_accuracy("coca cola", ["Coca-Cola"] * 10) == 0.0 and textvqa_accuracy("coca cola", ["Coca-Cola"] * 10) == 1.0
    metric = VizWizAccuracy()
    metric.update(["unanswerable", "2", "red"], [["unanswerable"] * 10, ["2"] * 3 + ["3"] * 7, ["blue"] * 10],
                  ["unanswerable", "number", "other"])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert out["accuracy_unanswerable"].item() == 1.0 and out["accuracy_number"].item() == pytest.approx(0.9)
    assert out["accuracy_other"].item() == 0.0 and "accuracy_yes_no" not in out          # no yes/no question: not reported
    with pytest.raises(DataError, match="category 'colour'"):
        metric.update(["x"], [["x", "x"]], ["colour"])
    text = TextVQAAccuracy()
    text.update(["Yes", "two"], [["yes"] * 10, ["2"] * 10])
    assert text.compute()["accuracy"].item() == 1.0


def test_gqa_accuracy_is_llavas_conversion_and_exact_match():
    metric = GQAAccuracy()
    # convert_gqa_for_eval.py: rstrip('.').lower(); then GQA eval.py's equality -- no other normalisation
    metric.update(["Yes.", "T-shirt", "tshirt", "yes!", "the dog"], ["yes", "t-shirt", "t-shirt", "yes", "dog"])
    assert metric.compute()["accuracy"].item() == pytest.approx(2 / 5)
    assert METRICS["gqa"] is GQAAccuracy


def test_exact_match_gqa_normalisation():
    metric = ExactMatch()
    # "Yes." = "yes"; "T-shirt" = "tshirt" (punctuation deleted); "the dog" ≠ "dog" (articles kept, as lmms-eval)
    metric.update(["Yes.", " T-shirt", "the dog", "left"], ["yes", "tshirt", "dog", ["right", "Left!"]])
    assert metric.compute()["accuracy"].item() == pytest.approx(3 / 4)
    articles = ExactMatch(remove_articles=True)
    articles.update(["the dog"], ["dog"])
    assert articles.compute()["accuracy"].item() == 1.0
    with pytest.raises(DataError, match="sample 0"):
        metric.update(["x"], [[]])


# ---- ANLS -----------------------------------------------------------------------------------------------------------


def test_anls_matches_the_docvqa_script():
    assert anls_score("hallo", ["hello"]) == pytest.approx(1 - 1 / 5)            # one substitution in 5
    assert anls_score(" Hello  World ", ["hello world"]) == 1.0                   # lower-cased, whitespace collapsed
    assert anls_score("ab", ["ax"]) == 0.5                                        # NL = 0.5 is kept (not < τ)
    assert anls_score("abc", ["abx"]) == pytest.approx(2 / 3)
    assert anls_score("abcd", ["wxyz", "abcx", "ab"]) == pytest.approx(0.75)       # best gold answer
    assert anls_score("abc", ["xyz"]) == 0.0
    assert anls_score("", [""]) == 1.0
    # sic: the denominator uses the raw lengths: "  hallo  " has 9 characters, distance 1 → 1 - 1/9
    assert anls_score("  hallo  ", ["hello"]) == pytest.approx(1 - 1 / 9)
    metric = ANLS()
    metric.update(["hallo", "abc"], [["hello"], "xyz"])
    assert metric.compute()["anls"].item() == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="threshold"):
        ANLS(threshold=2)
    with pytest.raises(DataError, match="sample 0"):
        metric.update(["x"], [[]])


# ---- Multiple choice ------------------------------------------------------------------------------------------------


def test_likelihood_choice_accuracy():
    metric = LikelihoodChoiceAccuracy()
    metric.update(torch.tensor([[-1.0, -0.5, -3.0], [-2.0, -2.0, -9.0]]), torch.tensor([1, 1]))  # tie → first (0)
    metric.update([[-5.0, -1.0], [0.1, 0.2, 0.3, 0.0, -1.0]], [1, 2])                          # ragged option counts
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(3 / 4) and out["num_samples"].item() == 4
    with pytest.raises(DataError, match=r"sample 0 .* index 3 and 3 option scores"):
        metric.update(torch.zeros(1, 3), [3])
    with pytest.raises(DataError, match="index -1"):
        metric.update([[0.0, 1.0]], [-1])


@pytest.mark.parametrize("text, options, letter", [
    ("B", None, "B"), ("(B)", None, "B"), ("B. cat", None, "B"), ("The answer is B", None, "B"),
    ("[C]", None, "C"), ("Answer: D.", None, "D"), ("b", None, None),             # letters are upper-case only
    ("B or C", None, None),                                                        # ambiguous
    ("A cat", None, "A"),                                                          # MMBench quirk: "A" the article
    ("I think it is a cat.", ["dog", "cat", "bird"], "B"),                         # option text matched
    ("a cat or a dog", ["dog", "cat", "bird"], None),
    ("Cannot determine the answer, maybe B", None, None),                          # refusal
    ("Z", None, None), ("E", None, None),                                          # not among A-D
])
def test_parse_option_letter_follows_mmbench(text, options, letter):
    assert parse_option_letter(text, "ABCD", options) == letter


def test_letter_choice_accuracy():
    metric = LetterChoiceAccuracy()
    metric.update(["B", "The answer is (C).", "dog", "A"], ["B", 2, "A", 1], [None, None, ["dog", "cat"], None])
    assert metric.compute()["accuracy"].item() == pytest.approx(3 / 4)
    with pytest.raises(DataError, match=r"sample 0 .* 'E', which is not one of its 4 options A, B, C, D"):
        metric.update(["A"], ["E"])
    with pytest.raises(DataError, match="not one of its 2 options"):
        metric.update(["A"], [2], [["x", "y"]])
    with pytest.raises(ConfigError, match="num_options"):
        LetterChoiceAccuracy(num_options=0)


def test_circular_choice_accuracy_needs_every_shift():
    metric = CircularChoiceAccuracy()
    # question 7: all four shifts right; question "q2": one of four wrong → circular 1/2, vanilla 7/8
    metric.update(["A", "B", "(C)", "D is right"], ["A", "B", "C", "D"], [7, "q2", 7, "q2"])
    metric.update(["C", "A", "B", "C"], ["C", "A", "B", "D"], ["q2", 7, 7, "q2"])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(0.5)
    assert out["vanilla_accuracy"].item() == pytest.approx(7 / 8)
    assert out["num_groups"].item() == 2 and out["num_samples"].item() == 8
    with pytest.raises(DataError, match="1 predictions, 1 targets, 2 groups"):
        metric.update(["A"], ["A"], [1, 2])


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B. A cat", 1), ("The answer is C.", 2), ("The answer is C", None),   # sic: the regex needs a character after
    ("b", None), ("(B)", None), ("B.", None), ("E", None), ("", None),             # 3 choices: E is no answer
    ("The answer is A. The answer is B.", None),                                    # two matches: FAILED
])
def test_scienceqa_choice_follows_llava(text, index):
    assert scienceqa_choice(text, 3) == index


def test_scienceqa_and_seed_accuracy():
    sqa = ScienceQAAccuracy()
    sqa.update(["B", "A. dog", "The answer is B.", "C"], [1, 0, 0, 2], [2, 2, 3, 3])
    assert sqa.compute()["accuracy"].item() == pytest.approx(3 / 4)
    with pytest.raises(DataError, match="gold option 3 but 2 choices"):
        sqa.update(["A"], [3], [2])
    seed = SEEDAccuracy()
    # convert_seed_for_submission.py: the text must *be* the letter
    seed.update(["B", "B.", "b", "C"], ["B", "B", "B", "C"], ["image", "image", "video", "video"])
    out = seed.compute()
    assert out["accuracy"].item() == 0.5 and out["accuracy_image"].item() == 0.5 and out["accuracy_video"].item() == 0.5


@pytest.mark.parametrize("text, label", [("Yes", "yes"), ("No.", "no"), ("yes, it is", "yes"), ("Not sure", "no"),
                                         ("y", "other"), ("Maybe", "other"), ("", "other"), ("I think yes", "other")])
def test_mme_answer_parsing(text, label):
    assert mme_answer(text) == label


def test_mme_score_acc_plus_acc_per_subtask():
    metric = MMEScore()
    # existence: image a both right, image b one right → acc 3/4, acc+ 1/2 → 125; OCR: one image, both right → 200;
    # code_reasoning: one image, none right → 0.  Perception = 325, cognition = 0.
    metric.update(["Yes", "No", "Yes"], ["Yes", "No", "Yes"], ["existence"] * 3, ["a", "a", "b"])
    metric.update(["Yes", "yes", "no", "no", "yes"], ["No", "Yes", "No", "Yes", "No"],
                  ["existence", "OCR", "OCR", "code_reasoning", "code_reasoning"], ["b", "c", "c", "d", "d"])
    out = metric.compute()
    assert out["existence"].item() == pytest.approx(125.0) and out["ocr"].item() == 200.0 and out["code_reasoning"].item() == 0
    assert out["perception"].item() == pytest.approx(325.0) and out["cognition"].item() == 0.0
    odd = MMEScore()
    odd.update(["Yes"], ["Yes"], ["existence"], ["a"])
    with pytest.raises(DataError, match="two questions as a pair"):
        odd.compute()
    with pytest.raises(DataError, match="subtask 'colour'"):
        odd.update(["Yes"], ["Yes"], ["colour"], ["a"])


# ---- POPE -----------------------------------------------------------------------------------------------------------


def test_pope_parsing_and_scores():
    # official rule: first sentence, commas removed, split on " ": "no"/"No"/"not" as a word → no, else yes
    assert pope_answer_is_yes("Yes, there is a dog.") and pope_answer_is_yes("Nope") and pope_answer_is_yes("")
    assert not pope_answer_is_yes("No, there is none.") and not pope_answer_is_yes("There is not a dog")
    assert pope_answer_is_yes("Yes. No dog here") and pope_answer_is_yes("NO")   # only the first sentence; case matters
    metric = POPE()
    predictions = ["Yes, there is a dog.", "No.", "There is no cat", "Yes", "yes", "I do not see one"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    metric.update(predictions, labels)
    # TP = 2 (0, 4), FN = 1 (2), FP = 1 (3), TN = 2 (1, 5)
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(4 / 6)
    assert out["precision"].item() == pytest.approx(2 / 3) and out["recall"].item() == pytest.approx(2 / 3)
    assert out["f1"].item() == pytest.approx(2 / 3) and out["yes_ratio"].item() == pytest.approx(3 / 6)
    with pytest.raises(DataError, match="label 'maybe'"):
        metric.update(["yes"], ["maybe"])


def test_pope_per_category_means_as_llava_reports():
    """llava/eval/eval_pope.py scores each category on its own; LLaVA-1.5's POPE is the mean of the three F1s."""
    metric = POPE(["adversarial", "random"])
    # adversarial: TP 1, FP 1 → P 1/2, R 1, F1 2/3; random: TP 1, FN 1, TN 1 → P 1, R 1/2, F1 2/3, acc 2/3
    metric.update(["yes", "yes", "yes", "no", "no"], ["yes", "no", "yes", "yes", "no"],
                  ["adversarial", "adversarial", "random", "random", "random"])
    out = metric.compute()
    assert out["f1_adversarial"].item() == pytest.approx(2 / 3) and out["f1_random"].item() == pytest.approx(2 / 3)
    assert out["accuracy"].item() == pytest.approx((1 / 2 + 2 / 3) / 2) and out["num_samples"].item() == 5
    pooled = POPE()
    pooled.update(["yes", "yes", "yes", "no", "no"], ["yes", "no", "yes", "yes", "no"])
    assert pooled.compute()["accuracy"].item() == pytest.approx(3 / 5)
    with pytest.raises(DataError, match="pass each question's category"):
        metric.update(["yes"], ["yes"])


# ---- Captions -------------------------------------------------------------------------------------------------------


# Captions and what Stanford's PTBTokenizer + coco-caption's filter make of them (pycocoevalcap's PTBTokenizer, Java).
PTB_CASES = [
    ("A cat, on the mat.", "a cat on the mat"), ("The dog's ball", "the dog 's ball"),
    ("Don't (really) go -- now...", "do n't -lrb- really -rrb- go now"),   # sic: "-LRB-" is filtered, "-lrb-" is not
    ('A 3.5 m "tall" man; big!', "a 3.5 m tall man big"), ("Mr. Smith can't cannot gonna", "mr. smith ca n't can not gon na"),
    ("A black-and-white photo of U.S. soldiers.", "a black-and-white photo of u.s. soldiers"),
    ("two dogs [playing] {in} the park", "two dogs -lsb- playing -rsb- -lcb- in -rcb- the park"),
    ("1,000 people at 5:30 p.m.", "1,000 people at 5:30 p.m."), ("It's a man's hat & a woman's bag", "it 's a man 's hat & a woman 's bag"),
    ("A   dog\twith tabs", "a dog with tabs"), ("", ""), ("cats' toys", "cats toys"),
    ("I'm sure they'll go; we'd've seen.", "i 'm sure they 'll go we 'd 've seen"),
    ("e-mail me @ home #1 $5 50%", "e-mail me @ home # 1 $ 5 50 %"), ("An elephant... walking!?", "an elephant walking !?"),
    ("o'clock at St. Mary's", "o'clock at st. mary 's"), ("wasn't won't shan't", "was n't wo n't sha n't"),
    ('"Hello," he said.', "hello he said"), ("3.14 and .5 and 5.", "3.14 and .5 and 5"), ("Wow!! Really?! Yes?", "wow !! really ?! yes"),
    ("AT&T store", "at&t store"), ("Dr. Who vs. Mr. Bean", "dr. who vs. mr. bean"), ("a 2-year-old child", "a 2-year-old child"),
    ("A sign reading \"No Parking\".", "a sign reading no parking"), ("x -- y - z", "x y z"),
]


@pytest.mark.parametrize("caption, tokens", PTB_CASES)
def test_ptb_tokenize_stand_in_equals_ptb(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def test_ptb_cases_are_what_the_java_tokenizer_writes():
    """The expectations above are pycocoevalcap's PTBTokenizer's (Java) output, re-checked wherever Java runs."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("java is not installed: coco-caption's PTBTokenizer cannot run")
    from mllm_kit.metrics import coco_tokenize

    assert coco_tokenize([c for c, _ in PTB_CASES], "java") == [t for _, t in PTB_CASES]


def test_cider_d_hand_computed():
    # Two images, so idf = log(2) − log(df) = log 2 for every n-gram that appears in one image's references.
    # Image 1: "a b" vs ref "a b": 1-grams cos = 1, 2-grams cos = 1, 3/4-grams 0 → 10·(1+1)/4 = 5.
    # Image 2: "c" vs ref "d": nothing shared → 0.  Mean: 2.5.
    metric = CIDErD()
    metric.update(["a b", "c"], [["a b"], ["d"]])
    assert metric.compute()["cider"].item() == pytest.approx(2.5, abs=1e-12)
    # Clipping and the length penalty: "a a" vs ref "a": tf(a) = 2 → weight 2·log2, clipped to log2 in the numerator:
    # cos₁ = log2·log2 / (2·log2 · log2) = 0.5; the ref has no bigram, so cos₂ = 0; δ = 1 bigram → exp(−1/72).
    # → 10·0.5·exp(−1/72)/4 = 1.25·exp(−1/72) for image 1, 0 for image 2 ("c" vs "d").
    clipped = CIDErD()
    clipped.update(["a a", "c"], [["a"], ["d"]])
    assert clipped.compute()["cider"].item() == pytest.approx(0.625 * math.exp(-1 / 72), abs=1e-12)
    # "a b" vs "a b c": cos₁ = 2/√6, cos₂ = 1/√2, δ = 1 − 2 bigrams → 10·(2/√6 + 1/√2)·exp(−1/72)/4, halved (2 images).
    longer = CIDErD()
    longer.update(["a b", "c"], [["a b c"], ["d"]])
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 / 2
    assert longer.compute()["cider"].item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(DataError, match=r"sample 1 .* reference captions \[\]"):
        metric.update(["a", "b"], [["a"], []])
    tokenized = CIDErD(tokenize=True)
    tokenized.update(["A b.", "C!"], [["a, b"], ["D."]])
    assert tokenized.compute()["cider"].item() == pytest.approx(2.5, abs=1e-12)


CAPTIONS = [
    ("a cat sits on a mat", ["a cat sits on the red mat", "a cat is sitting on a mat", "the cat lies on a mat near the door"]),
    ("a dog is running in the park", ["a dog runs in the park", "a brown dog is running through a park"]),
    ("two people riding bikes on a street", ["two people ride bikes down a street", "people riding bicycles on a city street"]),
    ("a plate of food with broccoli", ["a plate with meat and broccoli", "a white plate of food with green broccoli"]),
    ("a man holding an umbrella in the rain", ["a man with an umbrella walks in the rain", "a person holding a black umbrella"]),
    ("a bus parked on the side of the road", ["a red bus parked by the road", "a double decker bus on the side of a road"]),
]


def test_cider_d_equals_pycocoevalcap():
    from pycocoevalcap.cider import cider_scorer  # the dev extra installs it: CI always compares

    scorer = cider_scorer.CiderScorer(n=4, sigma=6.0)
    for candidate, refs in CAPTIONS:
        scorer += (candidate, refs)
    expected, _ = scorer.compute_score()
    metric = CIDErD()
    metric.update([c for c, _ in CAPTIONS[:4]], [r for _, r in CAPTIONS[:4]])
    metric.update([c for c, _ in CAPTIONS[4:]], [r for _, r in CAPTIONS[4:]])
    assert metric.compute()["cider"].item() == pytest.approx(float(expected), abs=1e-6)


def test_bleu4_equals_pycocoevalcap_and_rouge_l():
    from pycocoevalcap.bleu import bleu

    gts, res = {i: refs for i, (_, refs) in enumerate(CAPTIONS)}, {i: [c] for i, (c, _) in enumerate(CAPTIONS)}
    with contextlib.redirect_stdout(io.StringIO()):
        expected, _ = bleu.Bleu(4).compute_score(gts, res)
    metric = BLEU4()
    metric.update([c for c, _ in CAPTIONS], [r for _, r in CAPTIONS])
    assert metric.compute()["bleu4"].item() == pytest.approx(expected[3], abs=1e-6)
    rouge = RougeL()
    rouge.update(["a cat on a mat", "a dog"], [["a cat on a mat"], ["a dog runs", "the dog"]])
    # LCS F1, best reference: 1.0; "a dog" vs "a dog runs": P = 1, R = 2/3 → F = 0.8 (vs "the dog": 0.5)
    assert rouge.compute()["rouge_l"].item() == pytest.approx((1.0 + 0.8) / 2, abs=1e-6)
    with pytest.raises(DataError, match="reference caption"):
        metric.update(["a"], [[]])


def test_coco_caption_scores_equal_pycocoevalcap_bit_for_bit():
    """Bleu_4, ROUGE_L and CIDEr of pycocoevalcap on tokenised captions (empty candidate included): identical floats."""
    import numpy as np
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rows = [*CAPTIONS, ("", ["a plate with meat", "food"]), ("a bus", ["a red bus parked by the road"])]
    gts, res = {i: refs for i, (_, refs) in enumerate(rows)}, {i: [c] for i, (c, _) in enumerate(rows)}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    cands, refs = [c for c, _ in rows], [r for _, r in rows]
    assert coco_bleu4(cands, refs) == bleu[3]
    assert float(np.mean(coco_rouge_l_scores(cands, refs))) == Rouge().compute_score(gts, res)[0]
    assert float(np.mean(cider_d_scores(cands, refs))) == Cider().compute_score(gts, res)[0]
    metric = COCOCaptionScores(tokenizer="python")
    metric.update(cands[:3], refs[:3])
    metric.update(cands[3:], refs[3:])
    out = metric.compute()
    assert out["bleu4"].item() == bleu[3] and out["num_samples"].item() == len(rows)
    with pytest.raises(ConfigError, match="tokenizer 'ptb'"):
        COCOCaptionScores(tokenizer="ptb")


# ---- Names ----------------------------------------------------------------------------------------------------------


def test_metric_names():
    assert isinstance(build_metric("vqav2"), VQAv2Accuracy) and METRICS["pope"] is POPE
    assert isinstance(build_metric("anls", threshold=0.4), ANLS)
    with pytest.raises(ConfigError, match="Did you mean 'vqav2'"):
        build_metric("vqa_v2")
    with pytest.raises(ConfigError, match="does not take"):
        build_metric("pope", bogus=1)


# ---- One rank = two ranks -------------------------------------------------------------------------------------------

VQA_ROWS = [("two", ["2"] * 3 + ["3"] * 7), ("a dog", ["dog"] * 2 + ["cat"] * 8), ("yes", ["yes"] * 10),
            ("red", ["blue"] * 10), ("1,000", ["1000"] * 4 + ["100"] * 6), ("its", ["it's"] * 5 + ["its"] * 5)]
CHOICE_ROWS = [("B", "B", 1), ("(C)", "C", 1), ("A", "A", 1), ("D", "D", 1), ("A", "B", 2), ("B", "B", 2), ("C", "C", 2),
               ("D", "D", 2)]
POPE_ROWS = [("Yes, there is.", "yes"), ("No.", "no"), ("no", "yes"), ("Yes", "no"), ("not sure", "no"), ("yes", "yes")]


def _feed(metrics: dict, rank: int, world: int) -> None:
    """Rank ``rank`` of ``world`` takes every ``world``-th row (so each circular group spans ranks)."""
    def part(rows):
        return rows[rank::world]
    vqa = part(VQA_ROWS)
    metrics["vqav2"].update([p for p, _ in vqa], [a for _, a in vqa])
    metrics["gqa"].update([p for p, _ in vqa], [a[0] for _, a in vqa])
    metrics["anls"].update([p for p, _ in vqa], [a for _, a in vqa])
    choice = part(CHOICE_ROWS)
    metrics["mc_letter"].update([p for p, _, _ in choice], [g for _, g, _ in choice])
    metrics["mmbench"].update([p for p, _, _ in choice], [g for _, g, _ in choice], [q for _, _, q in choice])
    scores = part([[0.1, 0.9], [0.5, 0.2, 0.3], [0.0, 1.0], [2.0, 1.0, 0.0, -1.0]])
    metrics["mc_likelihood"].update(scores, part([1, 0, 0, 3]))
    pope = part(POPE_ROWS)
    metrics["pope"].update([p for p, _ in pope], [g for _, g in pope])
    metrics["pope_categories"].update([p for p, _ in pope], [g for _, g in pope], part(["random", "popular"] * 3))
    metrics["textvqa"].update([p for p, _ in vqa], [a for _, a in vqa])
    metrics["vizwiz"].update([p for p, _ in vqa], [a for _, a in vqa], part(["number", "other", "yes/no"] * 2))
    mme = part(MME_ROWS)  # each image's two questions land on different ranks
    metrics["mme"].update(*[[row[k] for row in mme] for k in range(4)])
    seed = part([("A", "A", "image"), ("B", "C", "video"), ("C.", "C", "image"), ("D", "D", "video")])
    metrics["seed"].update(*[[row[k] for row in seed] for k in range(3)])
    sqa = part([("A", 0, 2), ("The answer is B.", 1, 3), ("C", 1, 3), ("B. x", 1, 2)])
    metrics["scienceqa"].update(*[[row[k] for row in sqa] for k in range(3)])
    captions = part(CAPTIONS)
    for name in ("cider_d", "bleu4", "rouge_l", "coco_caption"):
        metrics[name].update([c for c, _ in captions], [r for _, r in captions])
    if rank == 0:  # a rank that saw nothing still syncs its (empty) list states
        metrics["cider_rank0"].update([c for c, _ in CAPTIONS], [r for _, r in CAPTIONS])
        metrics["mmbench_rank0"].update([p for p, _, _ in CHOICE_ROWS], [g for _, g, _ in CHOICE_ROWS],
                                        [q for _, _, q in CHOICE_ROWS])


MME_ROWS = [("Yes", "Yes", "existence", "a"), ("Yes", "No", "existence", "a"), ("No", "No", "OCR", "b"), ("no", "Yes", "OCR", "b"),
            ("yes", "Yes", "count", "c"), ("No", "No", "count", "c")]


def _all_metrics() -> dict:
    names = ["vqav2", "gqa", "anls", "mc_letter", "mmbench", "mc_likelihood", "pope", "cider_d", "bleu4", "rouge_l", "textvqa",
             "vizwiz", "mme", "seed", "scienceqa"]
    return {**{n: build_metric(n) for n in names}, "cider_rank0": CIDErD(), "mmbench_rank0": CircularChoiceAccuracy(),
            "pope_categories": POPE(["popular", "random"]), "coco_caption": COCOCaptionScores(tokenizer="python")}


def _results(metrics: dict) -> dict:
    return {name: {k: float(v) for k, v in m.compute().items()} for name, m in metrics.items()}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = _all_metrics()
        _feed(metrics, rank, world)
        torch.save(_results(metrics), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    single = _all_metrics()
    _feed(single, 0, 1)
    expected = _results(single)
    assert expected["mmbench"]["accuracy"] == 0.5 and expected["cider_d"]["cider"] > 0
    assert expected["mme"]["perception"] == pytest.approx(50 + 50 + 200) and expected["coco_caption"]["cider"] > 0
    out = str(tmp_path / "results")
    # fork, not spawn: a spawned child re-imports mllm_kit (and with it transformers), 10-20 s each on 2 busy cores
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for name, values in expected.items():
            assert got[name] == pytest.approx(values, abs=1e-6), (rank, name)
