"""Import a transformers ``LlavaForConditionalGeneration`` as an mllm-kit model with the same weights."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM

_ENCODERS = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
_SELECT = {"default": "patch", "full": "cls_patch"}


def from_hf_llava(llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> MLLM:
    """Write the vision tower and the language model under ``directory`` as ordinary HF checkpoints, load them
    through mllm-kit's normal loading code, and copy the projector into an ``mlp`` connector (depth 2)."""
    cfg = llava.config
    directory = Path(directory)
    encoder = _ENCODERS.get(cfg.vision_config.model_type)
    if encoder is None or cfg.projector_hidden_act != "gelu" or not isinstance(cfg.vision_feature_layer, int):
        raise ConfigError(
            f"from_hf_llava supports CLIP/SigLIP towers, a GELU projector and one feature layer; got "
            f"{cfg.vision_config.model_type}, {cfg.projector_hidden_act}, layer {cfg.vision_feature_layer}."
        )
    llava.model.vision_tower.save_pretrained(directory / "vision")
    lm = AutoModelForCausalLM.from_config(cfg.text_config)
    state = {f"model.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    lm.load_state_dict(state)
    lm.save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    model = MLLM.build(
        {"name": encoder, "path": str(directory / "vision"), "select_layer": cfg.vision_feature_layer,
         "select_feature": _SELECT[cfg.vision_feature_select_strategy]},
        {"name": "mlp", "depth": 2, "act": "gelu"},
        {"name": "hf_causal_lm", "path": str(directory / "llm")},
    )
    projector = llava.model.multi_modal_projector
    model.connector.mlp[0].load_state_dict(projector.linear_1.state_dict())
    model.connector.mlp[2].load_state_dict(projector.linear_2.state_dict())
    return model
