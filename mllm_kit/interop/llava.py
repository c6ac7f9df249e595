"""Import a transformers ``LlavaForConditionalGeneration`` as an mllm-kit model with the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM

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


def from_hf_llava(llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> MLLM:
    """Write the vision tower and the language model under ``directory`` as ordinary HF checkpoints, load them
    through mllm-kit's normal loading code, and copy the projector into an ``mlp`` connector (depth 2).

    ``vision_feature_select_strategy`` maps per tower type (see ``_TOWERS``), so ``tokens_per_image()`` equals
    the number of features transformers writes per image (e.g. SigLIP 4×4 patches: 15 for ``default``, 16 for
    ``full``). Raises ConfigError, naming the LLaVA config field, for what mllm-kit cannot reproduce.
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
    projector = llava.model.multi_modal_projector
    model = MLLM.build(
        {"name": encoder, "path": str(directory / "vision"), "select_layer": cfg.vision_feature_layer, **select},
        {"name": "mlp", "depth": 2, "act": cfg.projector_hidden_act, "bias": projector.linear_1.bias is not None},
        {"name": "hf_causal_lm", "path": str(directory / "llm")},
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
