"""Chat templates + tokenisation: exact label masks, image expansion, prompts and image-safe truncation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.templates import Template, Turn, get_template
from mllm_kit.data.conversation import ConversationEncoder, Encoded, ImageSpan, truncate
from mllm_kit.errors import ConfigError, DataError, RegistryError
from mllm_kit.registry import TEMPLATES
from mllm_kit.tiny import tiny_tokenizer
from real_tokenizers import llava_tokenizer_image_token, supervised_spans, text_of

N = 3  # tokens per image in these tests (small, so spans are easy to cut)

# template → (how a reply is rendered, the stop string supervised after it)
REPLY = {
    "plain": ("{}", "</s>"),
    "vicuna_v1": (" {}", "</s>"),
    "llama3": ("{}", "<|eot_id|>"),
    "chatml": ("{}", "<|im_end|>"),
    "phi3": ("{}", "<|end|>"),
    "hf": ("{}", "<|im_end|>"),  # the tiny tokenizer's chat template is ChatML
}
ASSISTANT_HEADER = {
    "vicuna_v1": "ASSISTANT:",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
    "phi3": "<|assistant|>\n",
    "hf": "<|im_start|>assistant\n",
}
FORMAT_TEMPLATES = ("vicuna_v1", "llama3", "chatml", "phi3")
MULTI_TURN = tuple(t for t in REPLY if t != "plain")
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

SINGLE = [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "a red circle.")]
MULTI = [
    Turn("user", "<image>\nWhat color?"),
    Turn("assistant", "red circle"),
    Turn("user", "and <image> <image>?"),
    Turn("assistant", "two\n squares é"),
    Turn("user", "How many?"),
    Turn("assistant", "three"),
]
# Exactly what the model reads for MULTI (with one id per image), per template.
GOLDEN_MULTI = {
    "vicuna_v1": f"<s>{VICUNA_SYS} USER: <image>\nWhat color? ASSISTANT: red circle</s>USER: and <image> <image>? ASSISTANT: "
    "two\n squares é</s>USER: How many? ASSISTANT: three</s>",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nred circle<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nand <image> <image>?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\ntwo\n squares é<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nthree<|eot_id|>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat color?<|im_end|>\n<|im_start|>assistant\nred circle<|im_end|>\n"
    "<|im_start|>user\nand <image> <image>?<|im_end|>\n<|im_start|>assistant\ntwo\n squares é<|im_end|>\n"
    "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nthree<|im_end|>\n",
    "phi3": "<s><|user|>\n<image>\nWhat color?<|end|>\n<|assistant|>\nred circle<|end|>\n"
    "<|user|>\nand <image> <image>?<|end|>\n<|assistant|>\ntwo\n squares é<|end|>\n"
    "<|user|>\nHow many?<|end|>\n<|assistant|>\nthree<|end|>\n",
    "hf": "<|im_start|>user\n<image>\nWhat color?<|im_end|>\n<|im_start|>assistant\nred circle<|im_end|>\n"
    "<|im_start|>user\nand <image> <image>?<|im_end|>\n<|im_start|>assistant\ntwo\n squares é<|im_end|>\n"
    "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nthree<|im_end|>\n",
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer())


@pytest.fixture(scope="module")
def image_id(tok):
    return tok.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def encoders(tok, image_id):
    """template name → (encoder with N tokens per image, encoder with 1 token per image)."""
    return {
        name: (
            ConversationEncoder(tok, get_template(name), image_id, N),
            ConversationEncoder(tok, get_template(name), image_id, 1),
        )
        for name in REPLY
    }


# -- helpers ----------------------------------------------------------------------------------------
def check_labels(tok, name: str, turns, enc: Encoded, exact: bool = True) -> None:
    """The supervised tokens read back, in context, as each reply followed by its stop string. With ``exact=False``
    a token that straddles a reply's start (the documented rule: it joins the reply) may carry header text."""
    fmt, stop = REPLY[name]
    replies = [fmt.format(t.content) + stop for t in turns if t.role == "assistant"]
    runs = supervised_spans(enc)
    got = [text_of(tok, enc.input_ids, a, b) for a, b in runs]
    assert len(got) == len(replies), f"{name}: supervised runs {got} != replies {replies}"
    for (a, _), text, reply in zip(runs, got, replies, strict=True):
        assert text.endswith(reply), f"{name}: supervised {text!r} != {reply!r}"
        extra = text[: len(text) - len(reply)]
        assert extra == "" or (not exact and text_of(tok, enc.input_ids, a, a + 1).startswith(extra)), (
            f"{name}: supervised {text!r} has {extra!r} before the reply"
        )


def check_images(enc: Encoded, image_id: int, n_images: int, per_image: int) -> None:
    assert len(enc.image_spans) == n_images
    covered: set[int] = set()
    previous_end = 0
    for span in enc.image_spans:
        assert span.length == per_image
        assert span.start >= previous_end, "spans must be in order and disjoint"
        previous_end = span.end
        assert enc.input_ids[span.start : span.end] == [image_id] * per_image
        assert enc.labels[span.start : span.end] == [IGNORE_INDEX] * per_image
        covered.update(range(span.start, span.end))
    outside = [i for i, t in enumerate(enc.input_ids) if t == image_id and i not in covered]
    assert not outside, f"image-token ids outside any span at {outside}"
    assert enc.input_ids.count(image_id) == n_images * per_image


def collapse(enc: Encoded) -> list[int]:
    """The ids with each image span shortened to its first id."""
    drop = {i for s in enc.image_spans for i in range(s.start + 1, s.end)}
    return [t for i, t in enumerate(enc.input_ids) if i not in drop]


def n_placeholders(turns) -> int:
    return sum(t.content.count("<image>") for t in turns if t.role == "user")


# -- registry --------------------------------------------------------------------------------------
def test_every_registered_template_is_covered_here():
    assert set(TEMPLATES.names()) == set(REPLY), "a new template needs its reply format and stop string in REPLY"


def test_unknown_template_suggests_closest():
    with pytest.raises(RegistryError) as info:
        get_template("chatmll")
    msg = str(info.value)
    assert "unknown template 'chatmll'" in msg and "Did you mean 'chatml'?" in msg
    assert f"Valid templates: {', '.join(TEMPLATES.names())}." in msg


def test_get_template_returns_instances_unchanged():
    t = get_template("chatml")
    assert isinstance(t, Template) and get_template(t) is t and t.name == "chatml"


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("plain", ["</s>"]),
        ("vicuna_v1", ["</s>"]),
        ("llama3", ["<|eot_id|>", "</s>"]),
        ("chatml", ["<|im_end|>", "</s>"]),
        ("phi3", ["<|end|>", "</s>"]),
    ],
)
def test_stop_token_ids(tok, encoders, name, stops):
    assert encoders[name][0].stop_token_ids() == [tok.convert_tokens_to_ids(s) for s in stops]


def test_hf_stop_token_ids_include_eos_and_im_end(tok, encoders):
    ids = encoders["hf"][0].stop_token_ids()
    assert ids[0] == tok.eos_token_id and tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_tokens_to_ids("<image>") not in ids


def test_tokens_per_image_must_be_positive(tok, image_id):
    with pytest.raises(ConfigError, match="tokens_per_image must be positive, got 0"):
        ConversationEncoder(tok, get_template("chatml"), image_id, 0)


# -- labels and images on fixed conversations --------------------------------------------------------
@pytest.mark.parametrize("name", list(REPLY))
def test_single_turn_labels_and_image(tok, encoders, image_id, name):
    enc = encoders[name][0].encode(SINGLE)
    check_labels(tok, name, SINGLE, enc)
    check_images(enc, image_id, 1, N)


@pytest.mark.parametrize("name", MULTI_TURN)
def test_multi_turn_labels_images_and_layout(tok, encoders, image_id, name):
    enc_n, enc_1 = encoders[name]
    enc = enc_n.encode(MULTI)
    check_labels(tok, name, MULTI, enc)
    check_images(enc, image_id, 3, N)
    one = enc_1.encode(MULTI)
    assert collapse(enc) == one.input_ids, "image spans must sit exactly where the placeholders are"
    assert tok.decode(one.input_ids) == GOLDEN_MULTI[name]
    # The ids are the whole-string tokenisation of the rendered text (<s> and <image> are single added tokens here).
    assert one.input_ids == tok.encode(GOLDEN_MULTI[name], add_special_tokens=False)
    bos = GOLDEN_MULTI[name].startswith("<s>")
    assert enc.input_ids == llava_tokenizer_image_token(tok, GOLDEN_MULTI[name].removeprefix("<s>"), image_id, N, bos)


def test_hf_golden_is_the_tokenizers_own_rendering(tok):
    messages = [{"role": t.role, "content": t.content} for t in MULTI]
    assert tok.apply_chat_template(messages, tokenize=False) == GOLDEN_MULTI["hf"]


def test_plain_keeps_only_images_and_caption(tok, encoders, image_id):
    turns = [Turn("user", "<image>\nDescribe <image> this."), Turn("assistant", "a red circle.")]
    enc = encoders["plain"][0].encode(turns)
    caption = tok.encode("a red circle.", add_special_tokens=False)
    assert enc.input_ids == [tok.bos_token_id, *[image_id] * (2 * N), *caption, tok.eos_token_id]
    assert enc.labels[: 1 + 2 * N] == [IGNORE_INDEX] * (1 + 2 * N)
    check_labels(tok, "plain", turns, enc)
    check_images(enc, image_id, 2, N)


def test_plain_ignores_system_turn(tok, encoders):
    turns = [Turn("system", "be brief"), *SINGLE]
    assert encoders["plain"][0].encode(turns).input_ids == encoders["plain"][0].encode(SINGLE).input_ids


@pytest.mark.parametrize("turns", [MULTI, MULTI[:4], [Turn("user", "<image>")]])
def test_plain_rejects_anything_but_one_exchange(encoders, turns):
    with pytest.raises(DataError, match="template 'plain' takes exactly one human turn"):
        encoders["plain"][0].encode(turns)


@pytest.mark.parametrize("name", MULTI_TURN)
def test_system_turn_is_rendered_unsupervised(tok, encoders, name):
    turns = [Turn("system", "Be terse."), *SINGLE]
    enc = encoders[name][1].encode(turns)
    text = tok.decode(enc.input_ids)
    assert "Be terse." in text
    assert "You are a helpful assistant." not in text and VICUNA_SYS not in text, "an explicit system turn replaces the default"
    check_labels(tok, name, turns, enc)


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml"])
def test_default_system_prompt(tok, encoders, name):
    text = tok.decode(encoders[name][1].encode(SINGLE).input_ids)
    assert (VICUNA_SYS if name == "vicuna_v1" else "You are a helpful assistant.") in text


def test_hf_template_needs_a_chat_template(image_id):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    tok.chat_template = None
    enc = ConversationEncoder(tok, get_template("hf"), image_id, N)
    with pytest.raises(DataError, match="template 'hf' needs a tokenizer with a chat_template"):
        enc.encode(SINGLE)


# -- prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ASSISTANT_HEADER))
@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single", "multi"])
def test_prompt_ends_with_assistant_header_and_prefixes_training(tok, encoders, image_id, name, turns):
    enc_n, enc_1 = encoders[name]
    prompt_turns = turns[:-1]
    prompt = enc_n.encode_prompt(prompt_turns)
    assert tok.decode(enc_1.encode_prompt(prompt_turns).input_ids).endswith(ASSISTANT_HEADER[name])
    full = enc_n.encode(turns)
    assert full.input_ids[: len(prompt)] == prompt.input_ids, "the prompt must be a prefix of the training sequence"
    assert len(full) > len(prompt)
    check_images(prompt, image_id, n_placeholders(prompt_turns), N)
    assert prompt.image_spans == full.image_spans[: len(prompt.image_spans)]


@pytest.mark.parametrize("name", list(ASSISTANT_HEADER))
def test_single_turn_prompt_has_no_supervised_tokens(encoders, name):
    assert encoders[name][0].encode_prompt(SINGLE[:1]).num_supervised == 0


@pytest.mark.parametrize("name", [*FORMAT_TEMPLATES, "hf"])
def test_multi_turn_prompt_has_no_supervised_tokens(encoders, name):
    prompt = encoders[name][0].encode_prompt(MULTI[:-1])
    assert prompt.num_supervised == 0
    assert set(prompt.labels) == {IGNORE_INDEX}


def test_plain_prompt_is_bos_and_images(tok, encoders, image_id):
    prompt = encoders["plain"][0].encode_prompt(SINGLE[:1])
    assert prompt.input_ids == [tok.bos_token_id, *[image_id] * N]
    assert prompt.num_supervised == 0
    assert encoders["plain"][0].encode(SINGLE).input_ids[: len(prompt)] == prompt.input_ids


@pytest.mark.parametrize("name", FORMAT_TEMPLATES)
def test_prompt_must_end_with_user_turn(encoders, name):
    with pytest.raises(DataError, match="a prompt must end with a user turn"):
        encoders[name][0].encode_prompt(SINGLE)


# -- property tests ------------------------------------------------------------------------------------
ALPHABET = "ab xy\n\t?.é漢😀"
replies = st.text(alphabet=ALPHABET, min_size=1, max_size=12)
fragments = st.text(alphabet=ALPHABET, max_size=6)
PROPERTY = settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def conversations(draw, max_exchanges: int = 4):
    turns: list[Turn] = []
    if draw(st.booleans()):
        turns.append(Turn("system", draw(replies)))
    for _ in range(draw(st.integers(1, max_exchanges))):
        pieces = draw(st.lists(fragments, min_size=1, max_size=4))  # k pieces → k-1 images
        turns.append(Turn("user", "<image>".join(pieces)))
        turns.append(Turn("assistant", draw(replies)))
    return turns


@pytest.mark.parametrize("name", list(REPLY))
@PROPERTY
@given(data=st.data())
def test_property_labels_are_exactly_replies_plus_stop(tok, encoders, image_id, name, data):
    turns = data.draw(conversations(max_exchanges=1 if name == "plain" else 4))
    enc_n, enc_1 = encoders[name]
    enc = enc_n.encode(turns)
    check_labels(tok, name, turns, enc, exact=False)
    check_images(enc, image_id, n_placeholders(turns), N)
    assert collapse(enc) == enc_1.encode(turns).input_ids
    assert len(enc.input_ids) == len(enc.labels)


@pytest.mark.parametrize("name", list(ASSISTANT_HEADER))
@PROPERTY
@given(data=st.data())
def test_property_prompt_is_prefix_of_training(encoders, name, data):
    turns = data.draw(conversations())
    enc_n = encoders[name][0]
    prompt = enc_n.encode_prompt(turns[:-1])
    full = enc_n.encode(turns)
    n = len(prompt)
    if full.input_ids[:n] != prompt.input_ids:
        # Whole-string tokenisation: only a token straddling the header and a reply that starts with whitespace
        # (documented: it is labelled with the reply) can break the prefix, and only at the prompt's last token.
        assert turns[-1].content[:1].isspace()
        assert full.input_ids[: n - 1] == prompt.input_ids[:-1] and full.labels[n - 1] != IGNORE_INDEX
    else:
        assert full.labels[n] != IGNORE_INDEX, "the first token after the prompt must be the supervised reply"


# -- truncation ----------------------------------------------------------------------------------------
IMG = 4


@st.composite
def encodings(draw):
    ids: list[int] = []
    labels: list[int] = []
    spans: list[ImageSpan] = []
    for kind in draw(st.lists(st.sampled_from(["text", "reply", "image"]), min_size=1, max_size=12)):
        if kind == "image":
            spans.append(ImageSpan(len(ids), N))
            ids += [IMG] * N
            labels += [IGNORE_INDEX] * N
        else:
            piece = draw(st.lists(st.integers(20, 300), min_size=1, max_size=5))
            ids += piece
            labels += piece if kind == "reply" else [IGNORE_INDEX] * len(piece)
    return Encoded(ids, labels, spans)


def best_cut(enc: Encoded, max_length: int) -> int:
    """The longest prefix ≤ max_length that does not end inside an image span (independent reference)."""
    cut = min(max_length, len(enc))
    while any(s.start < cut < s.end for s in enc.image_spans):
        cut -= 1
    return cut


def check_trimmed(original: Encoded, out: Encoded, max_length: int) -> None:
    assert len(out) <= max_length
    assert out.input_ids == original.input_ids[: len(out)] and out.labels == original.labels[: len(out)]
    assert out.image_spans == original.image_spans[: len(out.image_spans)]
    for span in out.image_spans:
        assert span.end <= len(out) and out.input_ids[span.start : span.end] == [IMG] * N, "a kept image span is cut"
    assert out.input_ids.count(IMG) == len(out.image_spans) * N
    assert out.num_supervised > 0


@PROPERTY
@given(enc=encodings(), data=st.data())
def test_property_trim_never_cuts_inside_an_image(enc, data):
    max_length = data.draw(st.integers(0, len(enc) + 2))
    out = truncate(enc, max_length, "trim")
    if len(enc) <= max_length:
        assert out is enc
        return
    cut = best_cut(enc, max_length)
    assert cut > max_length - N, "trim must lose less than one image span beyond max_length"
    if all(label == IGNORE_INDEX for label in enc.labels[:cut]):
        assert out is None, "a sample with nothing supervised left must be dropped"
        return
    assert out is not None and len(out) == cut
    check_trimmed(enc, out, max_length)


@PROPERTY
@given(enc=encodings(), data=st.data())
def test_property_drop_is_none_iff_too_long(enc, data):
    max_length = data.draw(st.integers(0, len(enc) + 2))
    out = truncate(enc, max_length, "drop")
    assert (out is None) == (len(enc) > max_length)
    if out is not None:
        assert out is enc


@PROPERTY
@given(turns=conversations(), data=st.data())
def test_property_trim_real_conversations(tok, encoders, turns, data):
    enc = encoders["chatml"][0].encode(turns)
    max_length = data.draw(st.integers(1, len(enc) + 2))
    out = truncate(enc, max_length, "trim")
    if out is None:
        cut = best_cut(enc, max_length)
        assert all(label == IGNORE_INDEX for label in enc.labels[:cut])
    elif out is not enc:
        check_trimmed_real(enc, out, max_length, tok.convert_tokens_to_ids("<image>"))


def check_trimmed_real(original: Encoded, out: Encoded, max_length: int, image_id: int) -> None:
    assert len(out) <= max_length
    assert out.input_ids == original.input_ids[: len(out)]
    for span in out.image_spans:
        assert span.end <= len(out) and out.input_ids[span.start : span.end] == [image_id] * N
    assert out.input_ids.count(image_id) == len(out.image_spans) * N
    assert out.num_supervised > 0


def test_trim_moves_cut_to_span_start():
    enc = Encoded([7, 8, IMG, IMG, IMG, 9], [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9], [ImageSpan(2, 3)])
    out = truncate(enc, 4, "trim")
    assert out.input_ids == [7, 8] and out.labels == [7, IGNORE_INDEX] and out.image_spans == []


def test_trim_without_supervised_tokens_left_is_none():
    enc = Encoded([7, IMG, IMG, IMG, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9], [ImageSpan(1, 3)])
    assert truncate(enc, 4, "trim") is None
    assert truncate(enc, 5, "trim") is enc


def test_unknown_truncation_policy():
    enc = Encoded([1], [1], [])
    with pytest.raises(ConfigError, match=r"truncation must be one of \('trim', 'drop'\), got 'cut'"):
        truncate(enc, 10, "cut")
