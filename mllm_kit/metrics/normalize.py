"""Answer normalisation and string helpers of the official benchmark scripts, shared by the metrics.

* VQAv2: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA (``processPunctuation`` then
  ``processDigitArticle``), including its quirks, which are kept on purpose (see :func:`vqa_punctuation`).
* EvalAI's answer processor (:func:`evalai_answer`): ``EvalAIAnswerProcessor`` in LLaVA's ``llava/eval/m4c_evaluator.py``
  (from facebookresearch/mmf), which LLaVA applies to every VQAv2 and VizWiz prediction before submission and
  TextVQA's evaluator applies to both sides.
* GQA: lmms-eval's ``gqa`` task (``exact_match`` with ``ignore_case`` and ``ignore_punctuation``).
* ANLS: the DocVQA evaluation script of the Robust Reading Competition (lower-case, whitespace collapsed).
* Captions: a pure-python stand-in for coco-caption's Java ``PTBTokenizer`` (:func:`ptb_tokenize`).
"""

from __future__ import annotations

import re
import string

# ---- VQAv2 (vqaEval.py) ------------------------------------------------------------------------------------------

# vqaEval.py's ``contractions`` table (120 entries, verbatim, its oddities included: "somebody'd" -> "somebodyd",
# capitalised keys that can never match after lower-casing). There is no "its" entry: "its" stays "its".
_CONTRACTION_PAIRS = """
aint ain't arent aren't cant can't couldve could've couldnt couldn't couldn'tve couldn't've couldnt've couldn't've
didnt didn't doesnt doesn't dont don't hadnt hadn't hadnt've hadn't've hadn'tve hadn't've hasnt hasn't
havent haven't hed he'd hed've he'd've he'dve he'd've hes he's howd how'd howll how'll hows how's Id've I'd've
I'dve I'd've Im I'm Ive I've isnt isn't itd it'd itd've it'd've it'dve it'd've itll it'll let's let's
maam ma'am mightnt mightn't mightnt've mightn't've mightn'tve mightn't've mightve might've mustnt mustn't
mustve must've neednt needn't notve not've oclock o'clock oughtnt oughtn't ow's'at 'ow's'at 'ows'at 'ow's'at
'ow'sat 'ow's'at shant shan't shed've she'd've she'dve she'd've she's she's shouldve should've shouldnt shouldn't
shouldnt've shouldn't've shouldn'tve shouldn't've somebody'd somebodyd somebodyd've somebody'd've somebody'dve somebody'd've
somebodyll somebody'll somebodys somebody's someoned someone'd someoned've someone'd've someone'dve someone'd've
someonell someone'll someones someone's somethingd something'd somethingd've something'd've something'dve something'd've
somethingll something'll thats that's thered there'd thered've there'd've there'dve there'd've therere there're
theres there's theyd they'd theyd've they'd've they'dve they'd've theyll they'll theyre they're theyve they've
twas 'twas wasnt wasn't wed've we'd've we'dve we'd've weve we've werent weren't whatll what'll whatre what're
whats what's whatve what've whens when's whered where'd wheres where's whereve where've whod who'd whod've who'd've
who'dve who'd've wholl who'll whos who's whove who've whyll why'll whyre why're whys why's wont won't
wouldve would've wouldnt wouldn't wouldnt've wouldn't've wouldn'tve wouldn't've yall y'all yall'll y'all'll
y'allll y'all'll yall'd've y'all'd've y'alld've y'all'd've y'all'dve y'all'd've youd you'd youd've you'd've
you'dve you'd've youll you'll youre you're youve you've
""".split()  # noqa: SIM905 - as words the table reads like vqaEval.py's
VQA_CONTRACTIONS: dict[str, str] = dict(zip(_CONTRACTION_PAIRS[::2], _CONTRACTION_PAIRS[1::2]))
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # vqaEval.py's ``manualMap``
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# vqaEval.py's ``periodStrip``, sic: ``(?!<=\d)`` is a negative *lookahead* (not a lookbehind), so it never fires and
# the rule is "remove a period unless a digit follows" ("3.5" keeps its period, "2." and "u.s." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAIAnswerProcessor.COMMA_STRIP: "1,,2" counts too
# vqaEval.py calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, so at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def vqa_clean(text: str) -> str:
    """What vqaEval.py does to every answer first: newlines and tabs to spaces, then ``strip()``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_punctuation(text: str, comma: re.Pattern = _COMMA_STRIP) -> str:
    """vqaEval.py's ``processPunctuation``: each mark is deleted when it touches a space anywhere in the text, or when
    the text has a digit-comma-digit (``comma``; "1,000" -> "1000", which then drops every other mark too), else
    replaced by a space; then periods not followed by a digit are removed."""
    delete_all = comma.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def vqa_digits_articles(text: str) -> str:
    """vqaEval.py's ``processDigitArticle``: lower-case, number words to digits, articles dropped, contractions fixed."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The full VQAv2 normalisation of one answer (``"Two dogs!"`` -> ``"2 dogs"``, ``"1,000"`` -> ``"1000"``)."""
    return vqa_digits_articles(vqa_punctuation(vqa_clean(text)))


def evalai_answer(text: str) -> str:
    """``EvalAIAnswerProcessor()(text)`` (LLaVA ``llava/eval/m4c_evaluator.py``; the same class is lmms-eval's
    ``_task_utils/vqa_eval_metric.py``): lower-case, delete "," and "?", split the clitic "'s" off ("dog's" ->
    "dog 's"), trim; then vqaEval.py's punctuation, number-word, article and contraction rules (its tables are
    vqaEval.py's, verbatim). ``"Yes"`` -> ``"yes"``, ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat's toy"`` ->
    ``"cat 's toy"``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text, _EVALAI_COMMA_STRIP))


# ---- GQA (lmms-eval exact_match, ignore_case + ignore_punctuation) ------------------------------------------------

_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_gqa_answer(text: str, remove_articles: bool = False) -> str:
    """Lower-case and delete every ``string.punctuation`` character (lmms-eval's ``gqa``), whitespace trimmed;
    ``remove_articles`` also drops a/an/the words (neither lmms-eval nor LLaVA's GQA conversion does)."""
    out = text.strip().lower().translate(_ASCII_PUNCTUATION).strip()
    return " ".join(w for w in out.split() if w not in VQA_ARTICLES) if remove_articles else out


# ---- ANLS (DocVQA) -----------------------------------------------------------------------------------------------

def normalize_anls_answer(text: str) -> str:
    """DocVQA's preprocessing of both answers: ``" ".join(text.strip().lower().split())``."""
    return " ".join(text.strip().lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insertion, deletion and substitution costs (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ---- Captions (coco-caption PTBTokenizer stand-in) ---------------------------------------------------------------

# coco-caption's ``ptbtokenizer.py`` drops these tokens after Stanford's PTBTokenizer (``-preserveLines -lowerCase``).
# Sic: the bracket names are upper-case here, but ``-lowerCase`` makes PTB write "-lrb-", so brackets are never dropped.
PTB_PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                              "...", ";"})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Stanford PTBLexer splits these words in two ("cannot" -> "can not", "gonna" -> "gon na").
_PTB_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                    "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_PTB_TOKEN = re.compile(r"""
    (?:[a-z]\.){2,}                                            # acronyms keep their periods: u.s., p.m., e.g.
  | (?:mrs|mr|ms|dr|prof|st|jr|sr|etc|vs|inc|ltd|mt)\.(?!\w)   # PTB's common abbreviations: mr., st., etc.
  | \d+(?:[.,:]\d+)+ | \.\d+                                   # 3.5, 1,000, 5:30, .5
  | [^\W_]+(?:[-/&'][^\W_]+)*                                   # words; t-shirt, b/c, at&t, don't stay whole here
  | \.\.\. | -- | [!?]+ | ``? | ''? | \S                          # "!?" is one token, which the wrapper keeps
""", re.VERBOSE)
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'s|'re|'ve|'ll|'d|'m)$")


def ptb_tokenize(text: str) -> str:
    """Stanford PTBTokenizer (``-preserveLines -lowerCase``) followed by coco-caption's punctuation filter, in pure
    python; returns the kept tokens joined by single spaces. Captions only: ``coco_caption`` uses the real tokenizer
    when Java and pycocoevalcap are installed (:func:`mllm_kit.metrics.caption.coco_tokenize`).

    Lower-cases; splits off punctuation ("mat." -> "mat"), clitics ("dog's" -> "dog 's", "don't" -> "do n't"),
    currency/percent/hash signs ("$5" -> "$ 5") and "cannot"/"gonna"-style words; keeps numbers with separators
    ("1,000", "5:30", "3.5"), acronyms and common abbreviations with their period ("u.s.", "mr."), hyphenated words,
    and writes brackets as PTB does after lower-casing ("-lrb-"), which the wrapper's upper-case filter then keeps.
    Equal to the Java tokenizer on the caption cases of ``tests/test_metrics.py``; rarer PTB rules (its full
    abbreviation list, URLs, emoticons) are not reproduced."""
    out = []
    for token in _PTB_TOKEN.findall(text.replace("\n", " ").lower()):
        token = _PTB_BRACKETS.get(token, token)
        if token == '"':
            continue  # PTB writes `` or '', both dropped
        clitics = []
        while (clitic := _CLITIC.search(token)) is not None:  # "we'd've" -> we 'd 've
            clitics.insert(0, clitic.group(1))
            token = token[: clitic.start()]
        out += [*_PTB_SPLIT_WORDS.get(token, (token,)), *clitics]
    return " ".join(t for t in out if t and t not in PTB_PUNCTUATIONS)
