"""Conversation templates: render turns into text segments marked supervised or not.

A template never tokenizes. :mod:`mllm_kit.data.conversation` joins the segments into one string, tokenises
it whole (split only at ``<image>``) and labels the tokens whose characters lie in supervised segments, so the
ids are the tokenizer's own tokenisation of the rendered text (no dummy prefix or merge differs at segment
boundaries) and label masks never depend on string-split token counting (the source of LLaVA's "tokenization
mismatch", specs/anchors.md §9.1). Supervised segments are exactly the assistant replies plus the template's stop
token (EOS, ``<|im_end|>``, ``<|eot_id|>``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from mllm_kit.errors import DataError
from mllm_kit.registry import TEMPLATES, register_template

Role = Literal["system", "user", "assistant"]
EOS = "{eos}"  # stands for the tokenizer's EOS string in a template's stop field
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    """A run of rendered text (may contain ``<image>`` placeholders); tokens over ``supervised`` ones carry labels."""

    text: str
    supervised: bool = False


class Template:
    """Base class. ``render`` gives the training segments; ``render_prompt`` the inference prompt."""

    name: str = ""
    add_bos: bool = False

    def render(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        raise NotImplementedError

    def render_prompt(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        """Segments for turns ending with a user turn, followed by the assistant header."""
        raise NotImplementedError

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [tokenizer.eos_token]

    def special_tokens(self) -> list[str]:
        """Control tokens this template needs in the tokenizer as single ids."""
        return []


@dataclass(frozen=True)
class FormatTemplate(Template):
    """A template described by format strings; ``{content}`` is replaced by the turn's text.

    Per exchange: ``user`` (unsupervised) + ``assistant_header`` (unsupervised) + ``reply`` + ``stop``
    (supervised) + ``after_reply`` (unsupervised). ``system`` is rendered once, after ``prefix``.
    """

    name: str
    system: str = "{content}"
    user: str = "{content}"
    assistant_header: str = ""
    reply: str = "{content}"
    stop: str = EOS
    after_reply: str = ""
    prefix: str = ""
    default_system: str | None = None
    add_bos: bool = False
    controls: tuple[str, ...] = ()

    def _stop(self, tokenizer: PreTrainedTokenizerBase) -> str:
        return tokenizer.eos_token if self.stop == EOS else self.stop

    def _head(self, turns: Sequence[Turn]) -> tuple[str, Sequence[Turn]]:
        system = self.default_system
        if turns and turns[0].role == "system":
            system, turns = turns[0].content, turns[1:]
        head = self.prefix + (self.system.format(content=system) if system else "")
        return head, turns

    def render(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        text, turns = self._head(turns)
        segments: list[Segment] = []
        for turn in turns:
            if turn.role == "user":
                text += self.user.format(content=turn.content) + self.assistant_header
            else:
                segments.append(Segment(text))
                segments.append(Segment(self.reply.format(content=turn.content) + self._stop(tokenizer), supervised=True))
                text = self.after_reply
        if text:
            segments.append(Segment(text))
        return segments

    def render_prompt(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        if not turns or turns[-1].role != "user":
            raise DataError(f"template {self.name!r}: a prompt must end with a user turn.")
        # Earlier replies are context here, not targets.
        return [Segment(s.text) for s in self.render(turns, tokenizer)]

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return list(dict.fromkeys([self._stop(tokenizer), tokenizer.eos_token]))

    def special_tokens(self) -> list[str]:
        return list(self.controls)


@dataclass(frozen=True)
class PlainTemplate(Template):
    """LLaVA's ``plain`` alignment template: the image, then the caption (+ EOS) as the only target.

    The human text other than ``<image>`` is dropped, as in LLaVA's ``preprocess_plain``
    (specs/components.md §1.3).
    """

    name: str = "plain"
    add_bos: bool = True

    def render(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        turns = [t for t in turns if t.role != "system"]
        if len(turns) != 2 or turns[0].role != "user":
            raise DataError("template 'plain' takes exactly one human turn (the image) and one gpt turn (the caption).")
        images = IMAGE_PLACEHOLDER * turns[0].content.count(IMAGE_PLACEHOLDER)
        return [Segment(images), Segment(turns[1].content + tokenizer.eos_token, supervised=True)]

    def render_prompt(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        user = [t for t in turns if t.role == "user"]
        return [Segment(IMAGE_PLACEHOLDER * sum(t.content.count(IMAGE_PLACEHOLDER) for t in user))]


class HFChatTemplate(Template):
    """The tokenizer's own Jinja chat template (``tokenizer.apply_chat_template``).

    Each assistant reply is located by rendering the conversation up to the reply with
    ``add_generation_prompt=True`` and up to its end without it; the template must be prefix-stable.
    A special token right after the reply (``<|im_end|>``, ``<|eot_id|>``, ...) is supervised as its stop;
    if there is none, EOS is appended. With a stop, the rendered text is exactly ``apply_chat_template``'s, so the
    training ids equal ``apply_chat_template(..., tokenize=True)`` (up to the ``▁`` a SentencePiece tokenizer puts
    after an ``<image>``, see :mod:`mllm_kit.data.conversation`).
    """

    name = "hf"

    def _render(self, tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], generation: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'hf' needs a tokenizer with a chat_template; pick a named template instead.")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def render(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        specials = sorted({*tokenizer.all_special_tokens, *_added_special(tokenizer)}, key=len, reverse=True)
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt = self._render(tokenizer, turns[:i], generation=True)
            full = self._render(tokenizer, turns[: i + 1], generation=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the tokenizer's chat template is not prefix-stable across turns; use a named template.")
            piece = full[len(prompt) :]
            # The reply is the occurrence of its text that a special token follows (a template may put text such
            # as a space before it that the reply also starts with), else the first one.
            starts, k = [], piece.find(turn.content)
            while k >= 0:
                starts.append(k)
                k = piece.find(turn.content, k + 1)
            if not starts:
                raise DataError("the tokenizer's chat template rewrites assistant replies; use a named template.")
            start = next((k for k in starts if any(piece.startswith(s, k + len(turn.content)) for s in specials)), starts[0])
            end = start + len(turn.content)
            stop = next((s for s in specials if piece.startswith(s, end)), None)
            segments.append(Segment(prompt[len(done) :] + piece[:start]))
            if stop is None:
                segments.append(Segment(turn.content + tokenizer.eos_token, supervised=True))
                segments.append(Segment(piece[end:]))
            else:
                segments.append(Segment(turn.content + stop, supervised=True))
                segments.append(Segment(piece[end + len(stop) :]))
            done = full
        return [s for s in segments if s.text or s.supervised]

    def render_prompt(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        return [Segment(self._render(tokenizer, turns, generation=True))]

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [tokenizer.eos_token, *_added_special(tokenizer)]


def _added_special(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content != IMAGE_PLACEHOLDER]


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

BUILTIN_TEMPLATES: dict[str, Template] = {
    "plain": PlainTemplate(),
    # LLaVA-1.5 "v1": "SYS USER: q ASSISTANT: a</s>USER: ..." (sep " ", sep2 "</s>").
    "vicuna_v1": FormatTemplate(
        name="vicuna_v1", system="{content} ", user="USER: {content} ", assistant_header="ASSISTANT:",
        reply=" {content}", default_system=VICUNA_SYSTEM, add_bos=True,
    ),
    "llama3": FormatTemplate(
        name="llama3", prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n", stop="<|eot_id|>",
        controls=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": FormatTemplate(
        name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n", stop="<|im_end|>", after_reply="\n",
        default_system="You are a helpful assistant.", controls=("<|im_start|>", "<|im_end|>"),
    ),
    "phi3": FormatTemplate(
        name="phi3", system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
        assistant_header="<|assistant|>\n", stop="<|end|>", after_reply="\n", add_bos=True,
        controls=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "hf": HFChatTemplate(),
}
for _name, _template in BUILTIN_TEMPLATES.items():
    register_template(_name)(_template)


def get_template(name: str | Template) -> Template:
    """A registered template by exact name (or a Template instance, returned as is)."""
    if isinstance(name, Template):
        return name
    template = TEMPLATES.get(name)
    return template() if isinstance(template, type) else template
