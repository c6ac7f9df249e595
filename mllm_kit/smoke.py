"""``--smoke``: the same recipe with tiny models of the same families, synthetic data and a few steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mllm_kit.presets import resolve_spec
from mllm_kit.recipe import ModelSpec, Recipe
from mllm_kit.tiny import ENCODER_FAMILIES, LLM_FAMILIES, tiny_encoder_spec, tiny_llm_spec

_ENCODER_FAMILY = {registered: family for family, registered in ENCODER_FAMILIES.items()}
# Options that describe *which* pretrained weights to load; everything else (layer choice, ...) is kept.
_ENCODER_SOURCE_KEYS = {"path", "config", "image_size", "weights", "model_name", "model_kwargs", "dtype", "attn_implementation", "mean", "std"}
_LLM_SOURCE_KEYS = {"path", "config", "tokenizer", "dtype", "attn_implementation", "trust_remote_code"}


def tiny_encoder_like(spec: dict[str, Any]) -> dict[str, Any]:
    family = _ENCODER_FAMILY.get(spec.get("name"), "clip")
    return {**{k: v for k, v in spec.items() if k not in _ENCODER_SOURCE_KEYS}, **tiny_encoder_spec(family)}


def llm_family(spec: dict[str, Any]) -> str:
    """The architecture family of an LLM spec: its ``family`` option, or the model_type of a local config."""
    family = spec.get("family")
    if family is None and spec.get("path") and (Path(spec["path"]) / "config.json").is_file():
        family = json.loads((Path(spec["path"]) / "config.json").read_text()).get("model_type")
    if family is None and isinstance(spec.get("config"), dict):
        family = spec["config"].get("model_type")
    return family if family in LLM_FAMILIES else "llama"


def tiny_llm_like(spec: dict[str, Any], num_layers: int = 2) -> dict[str, Any]:
    return {**{k: v for k, v in spec.items() if k not in _LLM_SOURCE_KEYS}, **tiny_llm_spec(llm_family(spec), num_layers=num_layers)}


def smoke_recipe(recipe: Recipe) -> Recipe:
    smoke = recipe.smoke
    model = ModelSpec(
        encoder=tiny_encoder_like(resolve_spec("encoders", recipe.model.encoder)),
        connector={**resolve_spec("connectors", recipe.model.connector), **smoke.connector} if smoke.connector else recipe.model.connector,
        llm=tiny_llm_like(resolve_spec("llms", recipe.model.llm), smoke.llm_layers),
    )
    stages = []
    for stage in recipe.stages:
        split = "synthetic:align" if stage.data.template == "plain" else "synthetic:sft"
        data = dataclasses.replace(stage.data, train=split, eval="synthetic:eval", image_root=None, synthetic=smoke.synthetic,
                                   max_length=min(stage.data.max_length, 512), num_workers=0)
        optim = dataclasses.replace(stage.optim, global_batch_size=smoke.global_batch_size, micro_batch_size=smoke.micro_batch_size,
                                    max_steps=smoke.steps)
        trainer = dataclasses.replace(stage.trainer, precision="32-true", accelerator="cpu", devices=1, num_nodes=1, strategy="auto",
                                      checkpoint_every_n_steps=max(1, smoke.steps), log_every_n_steps=1)
        stages.append(dataclasses.replace(stage, data=data, optim=optim, trainer=trainer))
    eval_spec = dataclasses.replace(recipe.eval, data="synthetic:eval")
    return dataclasses.replace(recipe, model=model, stages=stages, eval=eval_spec)
