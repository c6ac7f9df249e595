"""Tiny random backbones and an offline tokenizer, saved as ordinary HF/timm directories.

Tests, ``--smoke`` runs and the quickstart load these through the normal loading code
(``from_pretrained`` on a local dir), so nothing here is a stand-in: only the sizes are small.
Directories are cached under ``$MLLM_KIT_CACHE/tiny`` (default ``~/.cache/mllm_kit``), keyed by their
options, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mllm_kit.errors import ConfigError, did_you_mean

FORMAT_VERSION = 1
IMAGE_TOKEN = "<image>"
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Every built-in chat template's control tokens, so the tiny tokenizer encodes each as one id.
TEMPLATE_TOKENS = (
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD, IMAGE_TOKEN, *TEMPLATE_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small corpus so that BPE merges the words the synthetic task and the templates use.
_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT: You are a helpful assistant.
system user assistant What color is the shape? What shape is it? How many shapes are there?
Is the shape on the left or the right? Is the red shape left of the blue shape? Describe the image.
a red circle. a green square. a blue triangle. a yellow circle. a purple square. an orange triangle.
two blue squares on the left. three red circles on the right. one two three left right yes no
red green blue yellow purple orange circle square triangle circles squares triangles shape shapes
the image shows of and is on in a an the there are what which where how many color colour
"""


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    base = Path(root) if root is not None else Path(os.environ.get("MLLM_KIT_CACHE", Path.home() / ".cache" / "mllm_kit"))
    return base / "tiny"


def _cached(kind: str, options: dict[str, Any], root: str | os.PathLike[str] | None, write: Callable[[Path], None]) -> Path:
    """The directory for ``kind`` + ``options``; ``write`` fills a fresh temp dir that is then renamed into place."""
    import transformers

    key = json.dumps({"kind": kind, "v": FORMAT_VERSION, "tf": transformers.__version__.split(".")[0], **options}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    parent = cache_root(root)
    final = parent / f"{kind}-{digest}"
    if (final / ".complete").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=parent))
    try:
        write(tmp)
        (tmp / ".complete").write_text(key)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first, or a stale incomplete dir exists
            if (final / ".complete").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- tokenizer ----------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int = 384):
    """An in-memory byte-level BPE tokenizer with a ChatML chat template. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_tokenizer(root: str | os.PathLike[str] | None = None, vocab_size: int = 384) -> Path:
    return _cached("tokenizer", {"vocab_size": vocab_size}, root, lambda d: build_tokenizer(vocab_size).save_pretrained(d))


# -- language models ----------------------------------------------------------------------------
LLM_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "phi")


def _llm_config(family: str, vocab_size: int, ids: dict[str, int], hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int):
    from transformers import AutoConfig

    extra: dict[str, Any] = {}
    if family == "mistral":
        extra["sliding_window"] = None
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **ids,
        **extra,
    )


def tiny_llm(
    family: str = "llama",
    root: str | os.PathLike[str] | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A random ``family`` causal LM with the tiny tokenizer, saved with ``save_pretrained``."""
    if family not in LLM_FAMILIES:
        raise ConfigError(f"unknown tiny LLM family {family!r}.{did_you_mean(family, LLM_FAMILIES)} Valid: {LLM_FAMILIES}.")
    options = dict(family=family, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, seed=seed)

    def write(d: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_tokenizer(root))
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        cfg = _llm_config(family, len(tok), ids, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(d)
        tok.save_pretrained(d)

    return _cached("llm", options, root, write)


# -- vision encoders ----------------------------------------------------------------------------
ENCODER_FAMILIES = {"clip": "hf_clip", "siglip": "hf_siglip", "dinov2": "hf_dinov2", "timm_vit": "timm", "convnext": "timm_convnext"}
_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "timm_vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_MEAN_STD["convnext"] = _MEAN_STD["clip"]  # the CLIP-ConvNeXt towers


def tiny_encoder(
    family: str = "clip",
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A random vision tower of ``family`` saved as its library saves it (HF ``save_pretrained`` or timm ``save_for_hf``)."""
    if family not in ENCODER_FAMILIES:
        raise ConfigError(
            f"unknown tiny encoder family {family!r}.{did_you_mean(family, ENCODER_FAMILIES)} Valid: {sorted(ENCODER_FAMILIES)}."
        )
    options = dict(family=family, image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                   num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size, seed=seed)
    mean, std = _MEAN_STD[family]

    def write(d: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if family == "timm_vit":
                import timm
                from timm.models import save_for_hf

                args = dict(img_size=image_size, patch_size=patch_size, embed_dim=hidden_size, depth=num_layers,
                            num_heads=num_heads, mlp_ratio=intermediate_size / hidden_size, num_classes=0)
                model = timm.create_model("vit_base_patch16_224", pretrained=False, **args)
                model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": std, "input_size": (3, image_size, image_size)}
                save_for_hf(model, str(d), model_args=args, safe_serialization=True)
                return
            if family == "convnext":  # four stages (strides 4, 8, 16, 32), widths hidden/4 … hidden, one block each
                import timm
                from timm.models import save_for_hf

                args = dict(dims=(hidden_size // 4, hidden_size // 2, 3 * hidden_size // 4, hidden_size), depths=(1, 1, 1, 1))
                model = timm.create_model("convnext_atto", pretrained=False, num_classes=0, **args)
                model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": std, "input_size": (3, image_size, image_size)}
                save_for_hf(model, str(d), model_args=args, safe_serialization=True)
                return
            model = _hf_vision_model(family, image_size, patch_size, hidden_size, num_layers, num_heads, intermediate_size)
        model.save_pretrained(d)
        (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(mean), "image_std": list(std)}))

    return _cached("encoder", options, root, write)


def _hf_vision_model(family: str, image_size: int, patch_size: int, hidden: int, layers: int, heads: int, inter: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    common = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(intermediate_size=inter, **common))
    if family == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(intermediate_size=inter, **common))
    return Dinov2Model(Dinov2Config(mlp_ratio=inter // hidden, **common))


# -- component specs ----------------------------------------------------------------------------
def tiny_llm_spec(family: str = "llama", root: str | os.PathLike[str] | None = None, **options: Any) -> dict[str, Any]:
    return {"name": "hf_causal_lm", "path": str(tiny_llm(family, root, **options))}


def tiny_encoder_spec(family: str = "clip", root: str | os.PathLike[str] | None = None, **options: Any) -> dict[str, Any]:
    key = "path"
    return {"name": ENCODER_FAMILIES[family], key: str(tiny_encoder(family, root, **options))}
