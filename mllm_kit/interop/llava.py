"""transformers' LLaVA ↔ mllm-kit: :func:`from_hf_llava` builds an mllm-kit model from a ``LlavaForConditionalGeneration``
with the same weights; :func:`to_hf_llava` writes an mllm-kit model as one (weights, config, processor) that
``transformers`` loads without custom code. :func:`llava_blockers` says what of a model LLaVA-HF cannot express."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from mllm_kit.errors import ConfigError
from mllm_kit.files import atomic_dir
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM

if TYPE_CHECKING:
    from mllm_kit.data.templates import Template

log = get_logger(__name__)

EXPORT_INFO = "mllm_kit_export.json"  # what the export was made from: template, system prompt, image mode
BUNDLE_HINT = "export it as an mllm-kit bundle instead (`mllm-kit export --run RUN --to bundle OUT`; Python: mllm_kit.interop.bundle.save_bundle), which holds any architecture"

# transformers' LlavaModel.get_image_features reads hidden_states[vision_feature_layer] ([n_img, P + N, C]);
# ``default`` drops token 0 whatever it is (``[:, 1:]``), ``full`` keeps every token. Token 0 is CLIP's CLS,
# but SigLIP has no CLS, so there ``default`` drops the first patch. Encoder options reproducing each:
_TOWERS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "clip_vision_model": ("hf_clip", {
        "default": {"select_feature": "patch"},                 # N = rows·cols
        "full": {"select_feature": "cls_patch"},                # N = 1 + rows·cols
    }),
    "siglip_vision_model": ("hf_siglip", {
        "default": {"select_feature": "patch", "drop_first_patch": True},  # N = rows·cols − 1
        "full": {"select_feature": "patch"},                    # N = rows·cols
    }),
}
# Encoder options an export reproduces (the rest of an hf_clip / hf_siglip spec is checked one by one below).
_ENCODER_OPTIONS = {"name", "path", "config", "select_layer", "select_feature", "drop_first_patch", "image_size", "image_mode",
                    "mean", "std", "frozen", "dtype", "attn_implementation", "load_weights", "grayscale"}
_LLM_OPTIONS = {"name", "path", "config", "tokenizer", "dtype", "attn_implementation", "image_token", "special_tokens",
                "trust_remote_code", "family", "load_weights"}
_CONNECTOR_NAMES = {"qformer": "a Q-Former", "resampler": "a Perceiver resampler", "deepstack": "DeepStack (LLM-layer injections)",
                    "deepstack_vit": "DeepStack-V (encoder-layer injections)", "moe_mlp": "an MoE connector",
                    "anyres": "LLaVA-NeXT AnyRes (a token count per image size)", "matryoshka": "Matryoshka token scales",
                    "c_abstractor": "a C-Abstractor", "dense": "a Dense Connector (several layers' features)",
                    "identity": "an identity connector"}
_TRANSFORM_NAMES = {"upcycle_moe": "MoE FFN layers in the LLM (upcycle_moe)", "add_lora_moe": "LoRA experts with a router (add_lora_moe)"}


def from_hf_llava(llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                  encoder_options: Mapping[str, Any] | None = None) -> MLLM:
    """Write the vision tower and the language model under ``directory`` as ordinary HF checkpoints, load them
    through mllm-kit's normal loading code, and copy the projector into an ``mlp`` connector (depth 2).

    ``vision_feature_select_strategy`` maps per tower type (see ``_TOWERS``), so ``tokens_per_image()`` equals
    the number of features transformers writes per image (e.g. SigLIP 4×4 patches: 15 for ``default``, 16 for
    ``full``). ``encoder_options`` adds encoder options (the image processor's ``mean``/``std``/``image_mode``).
    Raises ConfigError, naming the LLaVA config field, for what mllm-kit cannot reproduce.
    """
    cfg = llava.config
    directory = Path(directory)
    encoder, select = _encoder_options(cfg)
    llava.model.vision_tower.save_pretrained(directory / "vision")
    lm = AutoModelForCausalLM.from_config(cfg.text_config)
    state = {f"model.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    lm.load_state_dict(state)
    lm.save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    llm: dict[str, Any] = {"name": "hf_causal_lm", "path": str(directory / "llm")}
    image_token = tokenizer.convert_ids_to_tokens(int(cfg.image_token_id))
    if isinstance(image_token, str) and image_token != "<image>":  # a checkpoint with its own image token
        llm["image_token"] = image_token
    projector = llava.model.multi_modal_projector
    model = MLLM.build(
        {"name": encoder, "path": str(directory / "vision"), "select_layer": cfg.vision_feature_layer, **select,
         **dict(encoder_options or {})},
        {"name": "mlp", "depth": 2, "act": cfg.projector_hidden_act, "bias": projector.linear_1.bias is not None},
        llm,
    )
    model.connector.mlp[0].load_state_dict(projector.linear_1.state_dict())
    model.connector.mlp[2].load_state_dict(projector.linear_2.state_dict())
    return model


def _encoder_options(cfg: Any) -> tuple[str, dict[str, Any]]:
    """The mllm-kit encoder name and feature options for a ``LlavaConfig``; ConfigError if unsupported."""
    tower = cfg.vision_config.model_type
    if tower not in _TOWERS:
        raise ConfigError(f"from_hf_llava: LLaVA vision_config.model_type {tower!r} is unsupported "
                          f"(supported: {', '.join(_TOWERS)}).")
    name, strategies = _TOWERS[tower]
    strategy = cfg.vision_feature_select_strategy
    if strategy not in strategies:
        raise ConfigError(f"from_hf_llava: LLaVA vision_feature_select_strategy {strategy!r} is unsupported "
                          f"(supported: {', '.join(strategies)}).")
    layer = cfg.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"from_hf_llava: LLaVA vision_feature_layer {layer!r} is unsupported: transformers "
                          f"concatenates several layers' features along channels; only one layer (an int) imports.")
    n = cfg.vision_config.num_hidden_layers + 1
    if not -n <= layer < n:
        raise ConfigError(f"from_hf_llava: LLaVA vision_feature_layer {layer} is out of range for the vision "
                          f"tower's {n - 1} layers (hidden_states indices {-n}..{n - 1}).")
    return name, strategies[strategy]


# -- export ------------------------------------------------------------------------------------------------------
def _strategy(encoder: Any) -> str:
    """The ``vision_feature_select_strategy`` whose features equal the encoder's (the inverse of ``_TOWERS``)."""
    from mllm_kit.encoders.hf import CLIPEncoder

    if isinstance(encoder, CLIPEncoder):
        return "full" if encoder.select_feature == "cls_patch" else "default"
    return "default" if encoder.drop_first_patch else "full"


def llava_blockers(model: MLLM) -> list[str]:
    """What of ``model`` transformers' ``LlavaForConditionalGeneration`` cannot express, one phrase each (empty: the
    model exports). LoRA adapters are not blockers: the export folds them into the weights."""
    from transformers.activations import ACT2FN

    from mllm_kit.connectors.mlp import LinearConnector, MLPConnector
    from mllm_kit.encoders.hf import CLIPEncoder, SigLIPEncoder
    from mllm_kit.llm.hf import HFCausalLM

    out: list[str] = []
    enc, conn, llm = model.encoder, model.connector, model.llm
    enc_spec = dict(getattr(enc, "build_spec", {}) or {})
    enc_name = enc_spec.get("name") or enc_spec.get("_target_") or type(enc).__name__
    if type(enc) not in (CLIPEncoder, SigLIPEncoder):
        what = "an encoder mixture" if enc_name == "mixture" else f"encoder {enc_name!r} ({type(enc).__name__})"
        out.append(f"{what}: LLaVA-HF's vision tower is a transformers CLIP or SigLIP vision model (hf_clip / hf_siglip)")
    else:
        if enc.image_size != enc.native_image_size:
            out.append(f"encoder image_size {enc.image_size} differs from the tower's native {enc.native_image_size}: mllm-kit "
                       f"interpolates the position embeddings at every forward, LLaVA-HF's vision tower does not")
        if enc.image_transform.grayscale:
            out.append("encoder grayscale: no transformers image processor turns images to luminance")
        extra = sorted(set(enc_spec) - _ENCODER_OPTIONS)
        if extra:
            out.append(f"encoder option(s) {extra}: transformers' LLaVA has no such feature option")
    conn_spec = dict(getattr(conn, "build_spec", {}) or {})
    conn_name = conn_spec.get("name") or conn_spec.get("_target_") or type(conn).__name__
    if type(conn) not in (MLPConnector, LinearConnector):
        desc = _CONNECTOR_NAMES.get(conn_name, f"connector {conn_name!r}")
        out.append(f"{desc} ({type(conn).__name__}): LLaVA-HF's projector is a 1- or 2-layer MLP (Linear → act → Linear)")
    else:
        if conn.depth not in (1, 2):
            out.append(f"connector mlp depth {conn.depth}: LLaVA-HF's projector has two Linear layers (depth 1 or 2 exports)")
        if conn_spec.get("expand"):
            out.append(f"connector mlp expand {conn_spec['expand']}: a widening layer before the MLP has no place in LLaVA-HF's projector")
        if conn.depth == 2 and conn.act not in ACT2FN:
            out.append(f"connector activation {conn.act!r}: not one of transformers' ACT2FN")
    llm_spec = dict(getattr(llm, "build_spec", {}) or {})
    if type(llm) is not HFCausalLM:
        out.append(f"LLM {llm_spec.get('name') or type(llm).__name__!r}: LLaVA-HF's language model is a transformers causal LM (hf_causal_lm)")
    else:
        if llm_spec.get("trust_remote_code"):
            out.append("LLM trust_remote_code: LLaVA-HF builds its language model from transformers' own classes (no remote code)")
        if getattr(llm.model.get_output_embeddings(), "bias", None) is not None:
            out.append("LLM head bias: LLaVA-HF's lm_head is a Linear without bias")
        if getattr(llm.model.config.get_text_config(), "final_logit_softcapping", None):
            out.append("LLM final_logit_softcapping: LLaVA-HF's forward applies no logit soft-capping")
        extra = sorted(set(llm_spec) - _LLM_OPTIONS)
        if extra:
            out.append(f"LLM option(s) {extra}: not expressible in a LLaVA-HF config")
    for spec in model.transforms:
        name = spec.get("name")
        if name != "add_lora":
            out.append(_TRANSFORM_NAMES.get(name, f"transform {name!r}") + ": LLaVA-HF layers are plain transformers layers")
    if model.efficiency is not None:
        method = dict(getattr(model.efficiency, "build_spec", {}) or {}).get("name") or type(model.efficiency).__name__
        out.append(f"model.efficiency {method!r} (visual-token dropping inside the LLM): LLaVA-HF runs every token through "
                   f"every layer; export with --without-efficiency to write the same weights without dropping")
    return out


def check_exportable(model: MLLM) -> None:
    """ConfigError naming everything LLaVA-HF cannot express, with the way out (a bundle)."""
    blockers = llava_blockers(model)
    if blockers:
        raise ConfigError("this model cannot be written as a transformers LlavaForConditionalGeneration — "
                          + "; ".join(blockers) + f". Keep the architecture and {BUNDLE_HINT}.")


def merged_state_dict(model: MLLM) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (without aliases of the parts' tensors) with every LoRA adapter folded into its base weight
    (W₀ + (α/r)·BA, peft's own ``get_delta_weight``) and the adapter entries dropped, computed without changing ``model``."""
    state = _without_aliases(model.state_dict())
    if not any(t.get("name") == "add_lora" for t in model.transforms):
        return state
    from peft.tuners.lora import LoraLayer

    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = {k: v for k, v in state.items() if not any(k.startswith(name + ".") for name in lora)}
    with torch.no_grad():
        for name, layer in lora.items():
            base = layer.get_base_layer()
            weight = base.weight.detach().clone()
            if not layer.merged:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        weight += layer.get_delta_weight(adapter).to(weight.dtype)
            out[f"{name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                out[f"{name}.bias"] = base.bias.detach()
    return out


_PARTS = ("encoder.model.", "llm.model.", "connector.mlp.")


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the entries that repeat a part's tensor under another module path (``llm.decoder_layers`` is a
    handle on the LLM's blocks)."""
    def same(v: torch.Tensor) -> tuple:
        return v.data_ptr(), tuple(v.shape), v.dtype

    canonical = {same(v) for k, v in state.items() if k.startswith(_PARTS)}
    return {k: v for k, v in state.items() if k.startswith(_PARTS) or same(v) not in canonical}


def _llava_state(model: MLLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mllm-kit parameter names → ``LlavaForConditionalGeneration``'s."""
    lm = model.llm.model
    prefix = lm.base_model_prefix + "."
    head = next(name for name, m in lm.named_modules() if m is lm.get_output_embeddings()) + "."
    out: dict[str, torch.Tensor] = {}
    if model.connector.depth == 1:  # LLaVA-HF's second Linear becomes the identity, its activation "linear"
        d = model.llm.hidden_size
        weight = state["connector.mlp.0.weight"]
        out["model.multi_modal_projector.linear_2.weight"] = torch.eye(d, dtype=weight.dtype, device=weight.device)
        if "connector.mlp.0.bias" in state:
            out["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d, dtype=weight.dtype, device=weight.device)
    projector = {"0": "linear_1", "2": "linear_2"}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part == "encoder" and rest.startswith("model."):
            out["model.vision_tower." + rest.removeprefix("model.")] = value
        elif part == "llm" and rest.startswith("model."):
            rest = rest.removeprefix("model.")
            if rest.startswith(prefix):
                out["model.language_model." + rest.removeprefix(prefix)] = value
            elif rest.startswith(head):
                out["lm_head." + rest.removeprefix(head)] = value
            else:
                raise ConfigError(f"to_hf_llava: LLM parameter {key!r} has no place in LLaVA-HF (neither the base model nor the head).")
        elif part == "connector" and rest.split(".")[1] in projector:
            _, index, leaf = rest.split(".")
            out[f"model.multi_modal_projector.{projector[index]}.{leaf}"] = value
        else:
            raise ConfigError(f"to_hf_llava: parameter {key!r} has no place in LLaVA-HF; {BUNDLE_HINT}.")
    return out


def _llava_config(model: MLLM, dtype: torch.dtype) -> Any:
    import copy

    from transformers import LlavaConfig

    enc, conn = model.encoder, model.connector
    text = copy.deepcopy(model.llm.model.config)
    vision = copy.deepcopy(enc.model.config)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=int(model.image_token_id),
        image_seq_length=int(model.tokens_per_image()), projector_hidden_act=conn.act if conn.depth == 2 else "linear",
        vision_feature_select_strategy=_strategy(enc), vision_feature_layer=int(enc.select_layer),
        multimodal_projector_bias=getattr(conn.mlp[0], "base_layer", conn.mlp[0]).bias is not None,  # a LoRA-wrapped one too
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    config.dtype = dtype
    return config


def to_hf_llava(model: MLLM, out_dir: str | Path, template: str | Template = "chatml", image_mode: str | None = None,
                system_prompt: str | None = None, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a transformers LLaVA checkpoint in ``out_dir``: ``LlavaForConditionalGeneration`` weights and
    config, and a ``LlavaProcessor`` (tokenizer with mllm-kit's chat ``template`` — and ``system_prompt`` — as its Jinja
    chat template; an image processor reproducing ``model.make_image_transform(image_mode)``; ``<image>`` expanded to
    ``model.tokens_per_image()`` ids). ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)`` load it without custom code.

    LoRA adapters are folded into the weights (``model`` is not changed). ``dtype`` casts the saved weights (default:
    the model's). An architecture LLaVA-HF cannot express is a ConfigError naming it (:func:`llava_blockers`).
    ``out_dir`` is written atomically; an existing one is refused unless ``overwrite``.
    """
    from mllm_kit.data.templates import get_template
    from mllm_kit.interop.processor import build_processor, check_processor
    from mllm_kit.pretrained import resolve_dtype

    out = Path(out_dir)
    refuse_existing(out, overwrite)
    check_exportable(model)
    chat = get_template(template)
    dtype = resolve_dtype(dtype) if dtype is not None else next(model.llm.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _llava_state(model, merged_state_dict(model)).items()}
    config = _llava_config(model, dtype)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    missing, unexpected = llava.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"to_hf_llava: the weights do not fit LlavaForConditionalGeneration: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}; {BUNDLE_HINT}.")
    if config.tie_word_embeddings:
        llava.tie_weights()
    processor, stop_ids = build_processor(model, chat, system_prompt, image_mode)
    gen = llava.generation_config
    gen.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    gen.pad_token_id = model.tokenizer.pad_token_id
    gen.bos_token_id = model.tokenizer.bos_token_id
    for problem in check_processor(model, processor, chat, system_prompt, image_mode):
        log.warning("to_hf_llava: the exported processor does not reproduce mllm-kit exactly: %s", problem)
    with atomic_dir(out) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {"format": 1, "template": chat.name, "system_prompt": system_prompt, "image_mode": image_mode,
                "tokens_per_image": model.tokens_per_image(), "stop_token_ids": stop_ids}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: LlavaForConditionalGeneration (%s), %d image tokens per image, template %s",
             out, str(dtype).removeprefix("torch."), model.tokens_per_image(), chat.name)
    return out


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output directory or pass --overwrite (overwrite=True) "
                          f"to replace it (the new one is written completely before the old one is removed).")
