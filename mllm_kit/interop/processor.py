"""The processor of an exported LLaVA-HF checkpoint: mllm-kit's chat template as Jinja, its image transform as a
transformers image processor, and a tokenizer set up so that ``LlavaProcessor`` produces exactly mllm-kit's ids.

mllm-kit tokenises a prompt in chunks split at ``<image>`` (LLaVA's ``tokenizer_image_token``); ``LlavaProcessor``
tokenises the whole string, with ``<image>`` expanded to N image tokens. For byte-level BPE tokenizers the two agree.
A SentencePiece tokenizer gives a chunk of its own the ``▁`` dummy prefix but not the same text after a special token;
for those the template writes ``▁`` after each ``<image>`` that is followed by text not starting with a space, which
makes transformers' ids equal mllm-kit's (and LLaVA's). :func:`check_processor` verifies ids and pixels on probes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
from PIL import Image

from mllm_kit.data.templates import EOS, IMAGE_PLACEHOLDER, FormatTemplate, HFChatTemplate, PlainTemplate, Template, Turn
from mllm_kit.data.transforms import ImageTransform
from mllm_kit.errors import ConfigError

SPIECE = "\u2581"
PROBE_TEXTS = ("\nWhat color is the shape?", "Describe the image.", "2 shapes")
PROBES: tuple[tuple[Turn, ...], ...] = (
    (Turn("user", "<image>\nWhat color is the shape?"),),
    (Turn("user", "<image>\nWhat shape is it?"), Turn("assistant", "a red circle."), Turn("user", "How many shapes are there?")),
    (Turn("system", "Answer in one word."), Turn("user", "Describe the image.\n<image>")),
)


def _lit(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


# -- tokenizer --------------------------------------------------------------------------------------------------
def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def adds_bos(tok: Any) -> bool:
    """Whether ``tok(text)`` prepends BOS by itself (and nothing else)."""
    plain = _encode(tok, "a b")
    return tok.bos_token_id is not None and list(tok("a b")["input_ids"]) == [tok.bos_token_id, *plain]


def adds_special(tok: Any) -> bool:
    return list(tok("a b")["input_ids"]) != _encode(tok, "a b")


def needs_spiece(tok: Any, image_token: str) -> bool:
    """Whether text right after a special token tokenises without the ``▁`` a chunk of its own gets (SentencePiece),
    so that writing ``▁`` there restores mllm-kit's chunked ids."""
    def after(prefix: str, text: str) -> list[int]:
        return _encode(tok, image_token + prefix + text)[1:]

    if all(after("", t) == _encode(tok, t) for t in PROBE_TEXTS):
        return False
    return all(after(SPIECE, t) == _encode(tok, t) for t in PROBE_TEXTS)


def _content_macro(spiece: bool, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """``content(c)``: a message's content as text — a string as is, a list of ``{type: image}`` / ``{type: text}`` items
    as ``<image>`` and the texts joined by newlines (``[image, text]`` → ``"<image>\\nText"``, LLaVA's convention) — with
    each ``<image>`` written as the processor's ``image_token``."""
    body = "{{- part -}}"
    if spiece:
        body = ("{%- if not loop.first and part and not part.startswith(' ') -%}{{- " + _lit(SPIECE) + " -}}{%- endif -%}"
                "{{- part -}}")
    img = _lit(IMAGE_PLACEHOLDER)
    return (
        "{%- macro content(c) -%}"
        "{%- if c is string -%}{%- set ns = namespace(text=c) -%}"
        "{%- else -%}{%- set ns = namespace(text='', first=true) -%}"
        "{%- for item in c -%}"
        "{%- if item['type'] == 'image' -%}{%- set piece = " + img + " -%}"
        "{%- elif item['type'] == 'text' -%}{%- set piece = item['text'] -%}{%- else -%}{%- set piece = none -%}{%- endif -%}"
        "{%- if piece is not none -%}{%- set ns.text = ns.text + ('' if ns.first else '\\n') + piece -%}{%- set ns.first = false -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- for part in ns.text.split(" + img + ") -%}{%- if not loop.first -%}{{- " + _lit(image_token) + " -}}{%- endif -%}"
        + body + "{%- endfor -%}"
        "{%- endmacro -%}"
    )


def _lines(jinja: str) -> str:
    """One tag per line (every tag here strips the whitespace around it, so the newlines render nothing)."""
    return jinja.replace("-%}{", "-%}\n{").replace("-}}{", "-}}\n{")


def _split(fmt: str) -> tuple[str, str]:
    before, _, after = fmt.format(content="\x00").partition("\x00")
    return before, after


def chat_template(template: Template, tok: Any, system_prompt: str | None = None, bos: bool = False, spiece: bool = False,
                  image_token: str = IMAGE_PLACEHOLDER) -> str:
    """mllm-kit's ``template`` (with ``system_prompt``, which replaces the template's default system prompt as
    ``data.system_prompt`` does) as a Jinja chat template: with ``add_generation_prompt`` it renders exactly the text
    of ``template.render_prompt``; a conversation ending in a reply renders the training text. ``bos``: start with the
    BOS token's text (when the template has one and the tokenizer does not add it itself); ``spiece``: write ``▁`` after
    each image that text follows (see the module docstring); ``image_token``: what each ``<image>`` is written as."""
    head = _lines(_content_macro(spiece, image_token))
    start = _lit(tok.bos_token) if bos and tok.bos_token else "''"
    generation = "(add_generation_prompt is defined and add_generation_prompt)"
    if isinstance(template, FormatTemplate):
        system = system_prompt if system_prompt is not None else template.default_system
        stop = tok.eos_token if template.stop == EOS else template.stop
        (sa, sb), (ua, ub), (ra, rb) = _split(template.system), _split(template.user), _split(template.reply)
        return head + _lines(
            "{%- set state = namespace(system=" + (_lit(system) if system is not None else "none") + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set state.system = content(messages[0]['content']) -%}{%- set state.start = 1 -%}{%- endif -%}"
            "{{- " + start + " + " + _lit(template.prefix) + " -}}"
            "{%- if state.system -%}{{- " + _lit(sa) + " + state.system + " + _lit(sb) + " -}}{%- endif -%}"
            "{%- for message in messages[state.start:] -%}"
            "{%- if message['role'] == 'user' -%}{{- " + _lit(ua) + " + content(message['content']) + " + _lit(ub) + " -}}"
            "{%- if not loop.last or " + generation + " -%}{{- " + _lit(template.assistant_header) + " -}}{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- " + _lit(ra) + " + content(message['content']) + " + _lit(rb + stop + template.after_reply) + " -}}"
            "{%- endif -%}{%- endfor -%}"
        )
    if isinstance(template, PlainTemplate):  # the image(s), then the caption: LLaVA's alignment format
        img = _lit(image_token)
        return head + _lines(
            "{{- " + start + " -}}{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{- " + img + " * (content(message['content']).count(" + img + ")) -}}"
            "{%- elif message['role'] == 'assistant' -%}{{- content(message['content']) + " + _lit(tok.eos_token) + " -}}"
            "{%- endif -%}{%- endfor -%}"
        )
    if isinstance(template, HFChatTemplate):  # the tokenizer's own template, fed string contents as mllm-kit feeds it
        if not getattr(tok, "chat_template", None) or not isinstance(tok.chat_template, str):
            raise ConfigError("template 'hf' needs the tokenizer's chat_template (a single Jinja string); export with a named template.")
        insert = ("{%- if " + _lit(system_prompt) + " is not none and (not msgs.rows or msgs.rows[0]['role'] != 'system') -%}"
                  "{%- set msgs.rows = [{'role': 'system', 'content': " + _lit(system_prompt) + "}] + msgs.rows -%}{%- endif -%}"
                  if system_prompt is not None else "")
        return head + _lines(
            "{%- set msgs = namespace(rows=[]) -%}"
            "{%- for m in messages -%}{%- set msgs.rows = msgs.rows + [{'role': m['role'], 'content': content(m['content'])}] -%}"
            "{%- endfor -%}" + insert + "{%- set messages = msgs.rows -%}") + "\n" + tok.chat_template
    raise ConfigError(f"template {getattr(template, 'name', template)!r} ({type(template).__name__}) has no Jinja form; "
                      f"export with a FormatTemplate (vicuna_v1, chatml, llama3, phi3), plain or hf.")


# -- image processor --------------------------------------------------------------------------------------------
def image_processor(transform: ImageTransform) -> Any:
    """A transformers ``LlavaImageProcessor`` (PIL backend) reproducing ``transform``: ``resize`` (stretch to
    size×size), ``center_crop`` (short side to size, centre crop) or ``pad`` (pad to square with ``int(mean·255)``,
    then resize), bicubic, mean/std. Pixel-identical with the PIL backend (``AutoProcessor.from_pretrained(dir,
    backend="pil")``); transformers' default torchvision backend resizes with its own antialiasing (a few levels of
    255 apart)."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if not isinstance(transform, ImageTransform):
        raise ConfigError(f"image transform {type(transform).__name__} has no transformers image processor equivalent.")
    if transform.grayscale:
        raise ConfigError("encoder grayscale: no transformers image processor turns images to luminance.")
    s = transform.size
    square = {"height": s, "width": s}
    modes = {"resize": dict(size=square, do_center_crop=False, do_pad=False),
             "center_crop": dict(size={"shortest_edge": s}, do_center_crop=True, do_pad=False),
             "pad": dict(size=square, do_center_crop=False, do_pad=True)}
    return LlavaImageProcessorPil(do_resize=True, resample=PILImageResampling.BICUBIC, crop_size=square, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=list(transform.mean),
                                  image_std=list(transform.std), do_convert_rgb=True, **modes[transform.mode])


# -- the processor ----------------------------------------------------------------------------------------------
def prepare_tokenizer(tokenizer: Any, template: Template, system_prompt: str | None = None, image_token: str = IMAGE_PLACEHOLDER) -> Any:
    """A copy of ``tokenizer`` whose ``chat_template`` renders ``template`` and whose plain calls add exactly what
    mllm-kit adds: nothing, or the BOS id where the template has one (a SentencePiece tokenizer adds it itself, since
    BOS as text would cost the next word its ``▁``)."""
    tok = copy.deepcopy(tokenizer)
    spiece = needs_spiece(tok, image_token)
    wants_bos = template.add_bos and tok.bos_token_id is not None
    if adds_special(tok) and not (wants_bos and adds_bos(tok)):  # mllm-kit's ids hold only what the template renders
        _set_flags(tok, add_bos_token=False, add_eos_token=False)
    if wants_bos and spiece and not adds_bos(tok):
        _set_flags(tok, add_bos_token=True)
        if not adds_bos(tok):
            _set_flags(tok, add_bos_token=False)
    bos = wants_bos and not adds_bos(tok)
    tok.chat_template = chat_template(template, tok, system_prompt, bos=bos, spiece=spiece, image_token=image_token)
    return tok


def build_processor(model: Any, template: Template, system_prompt: str | None = None, image_mode: str | None = None) -> tuple[Any, list[int]]:
    """``(LlavaProcessor, stop token ids)`` for ``model`` (a copy of its tokenizer; ``model`` is not changed)."""
    from transformers import LlavaProcessor

    from mllm_kit.data.conversation import ConversationEncoder
    from mllm_kit.encoders.hf import CLIPEncoder

    image_token = model.llm.image_token
    tok = prepare_tokenizer(model.tokenizer, template, system_prompt, image_token)
    encoder = model.encoder
    processor = LlavaProcessor(
        image_processor=image_processor(model.make_image_transform(image_mode)), tokenizer=tok, patch_size=encoder.patch_size,
        vision_feature_select_strategy=_strategy(encoder), chat_template=tok.chat_template, image_token=image_token,
        num_additional_image_tokens=1 if isinstance(encoder, CLIPEncoder) else 0,
    )
    stops = ConversationEncoder(tok, template, model.image_token_id, model.tokens_per_image()).stop_token_ids()
    return processor, stops or [tok.eos_token_id]


def _set_flags(tok: Any, **flags: bool) -> None:
    """Set a tokenizer's ``add_bos_token`` / ``add_eos_token`` where it has them (transformers rebuilds its post-processor)."""
    for flag, value in flags.items():
        if hasattr(tok, flag):
            try:
                setattr(tok, flag, value)
            except (AttributeError, ValueError):
                pass


def _strategy(encoder: Any) -> str:
    from mllm_kit.interop.llava import _strategy as strategy

    return strategy(encoder)


def messages(turns: tuple[Turn, ...] | list[Turn]) -> list[dict[str, Any]]:
    """Turns as chat messages with string contents (``<image>`` inline), as the exported template accepts them."""
    return [{"role": t.role, "content": t.content} for t in turns]


def probe_image(width: int = 45, height: int = 30, seed: int = 0) -> Image.Image:
    """A deterministic non-square noise image (every resize mode changes it)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def check_processor(model: Any, processor: Any, template: Template, system_prompt: str | None = None,
                    image_mode: str | None = None) -> list[str]:
    """Differences between ``processor`` and mllm-kit on probe conversations and a probe image (empty: none): the
    prompt ids (chat template + tokenisation + ``<image>`` expansion) and the pixel values."""
    import torch

    from mllm_kit.data.conversation import ConversationEncoder

    problems = []
    if processor.image_token_id != model.image_token_id:
        problems.append(f"the processor's image token id {processor.image_token_id} is not the model's {model.image_token_id}")
    encoder = ConversationEncoder(model.tokenizer, template, model.image_token_id, model.tokens_per_image(), system_prompt=system_prompt)
    image = probe_image()
    probes = PROBES[:1] if isinstance(template, PlainTemplate) else PROBES
    for turns in probes:
        ours = encoder.encode_prompt(list(turns)).input_ids
        text = processor.apply_chat_template(messages(turns), add_generation_prompt=True, tokenize=False)
        n = text.count(processor.image_token)
        theirs = processor(text=text, images=[image] * n if n else None)["input_ids"][0]
        if list(theirs) != ours:
            problems.append(f"prompt ids differ for {[t.content for t in turns]}: mllm-kit {ours[:8]}… ({len(ours)}), "
                            f"processor {list(theirs)[:8]}… ({len(theirs)})")
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours_pixels = model.make_image_transform(image_mode)(image)
    if pixels.shape != ours_pixels.shape or not torch.allclose(pixels, ours_pixels, atol=1e-5, rtol=0):
        diff = (pixels - ours_pixels).abs().max().item() if pixels.shape == ours_pixels.shape else "shape"
        problems.append(f"pixel values differ from the model's image transform (max |Δ| {diff})")
    return problems
