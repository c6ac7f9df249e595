"""``--smoke``: the same recipe with every component shrunk, synthetic data and a few steps per stage.

The encoder and LLM become tiny random models of the same families (:mod:`mllm_kit.tiny`); every connector in the
spec, nested ones included, takes its class's ``smoke_options`` and then the recipe's ``smoke.connector``; datasets
become the synthetic ones (evaluation only where the recipe evaluates; preference objectives read
``synthetic:preference``). A distillation teacher becomes a random tiny model of its families with a larger LLM
than the student's and the same tokenizer (a teacher trained by an earlier stage of the recipe stays so, shrunk
like every stage model). Input and output are resolved recipes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mllm_kit.config.recipe import ModelSpec, Recipe, SmokeSpec, TeacherSpec
from mllm_kit.config.validate import to_dict
from mllm_kit.config.resolve import component_class, resolve_component
from mllm_kit.registry import CONNECTORS, OBJECTIVES
from mllm_kit.tiny import ENCODER_FAMILIES, LLM_FAMILIES, tiny_encoder_spec, tiny_llm_spec

_ENCODER_FAMILY = {registered: family for family, registered in ENCODER_FAMILIES.items()}
# Options that describe *which* pretrained weights to load; everything else (layer choice, ...) is kept.
_ENCODER_SOURCE_KEYS = {"path", "config", "image_size", "weights", "model_name", "model_kwargs", "dtype", "attn_implementation", "mean", "std"}
_LLM_SOURCE_KEYS = {"path", "config", "tokenizer", "dtype", "attn_implementation", "trust_remote_code"}


def tiny_encoder_like(spec: dict[str, Any]) -> dict[str, Any]:
    """The tiny random encoder of ``spec``'s family (a mixture: each member's); layer choices are kept."""
    if spec.get("name") == "mixture":
        out = {**spec, "members": {name: tiny_encoder_like(m) for name, m in spec["members"].items()}}
        if spec.get("resample"):  # keep the grids' ratios (SVA windows) at a tiny scale: the smallest side becomes 2
            smallest = min(min(g) for g in spec["resample"].values())
            out["resample"] = {name: [max(1, round(2 * v / smallest)) for v in g] for name, g in spec["resample"].items()}
        return out
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


def tiny_llm_like(spec: dict[str, Any], num_layers: int = 2, **options: Any) -> dict[str, Any]:
    return {**{k: v for k, v in spec.items() if k not in _LLM_SOURCE_KEYS},
            **tiny_llm_spec(llm_family(spec), num_layers=num_layers, **options)}


def tiny_connector_like(spec: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``spec`` with its class's ``smoke_options`` (and nested connectors shrunk the same way), then ``overrides``."""
    cls, _ = component_class(CONNECTORS, spec, "model.connector")
    out = dict(spec)
    for key, value in getattr(cls, "smoke_options", {}).items():
        if callable(value):  # shrinks what the spec set (e.g. LLM layer indices for a 2-layer LLM)
            out[key] = value(out.get(key))
        elif out.get(key, 0) is not None:  # null means "derived" (e.g. the LLM width): keep deriving it
            out[key] = value
    for key in getattr(cls, "nested_specs", {}):
        if isinstance(out.get(key), dict):
            out[key] = tiny_connector_like(out[key])
    return {**out, **(overrides or {})}


def tiny_model_like(model: ModelSpec, smoke: SmokeSpec, teacher: bool = False) -> ModelSpec:
    """The tiny model of ``model``'s families; a teacher's LLM is larger than the student's (same tokenizer)."""
    llm = (tiny_llm_like(model.llm, smoke.llm_layers + 2, hidden_size=96, intermediate_size=192) if teacher
           else tiny_llm_like(model.llm, smoke.llm_layers))
    return ModelSpec(
        encoder=tiny_encoder_like(model.encoder),
        connector=resolve_component("connectors", tiny_connector_like(model.connector, smoke.connector), "smoke.connector"),
        llm=llm,
        efficiency=model.efficiency,
    )


def _tiny_teacher(teacher: TeacherSpec | None, student: ModelSpec, smoke: SmokeSpec) -> TeacherSpec | None:
    """Stage teachers stay (their stage runs in the smoke recipe too); any other becomes a random tiny teacher of its
    families (the student's for a run or LLaVA-HF directory, which the smoke run cannot assume exists)."""
    if teacher is None or teacher.form == "stage":
        return teacher
    model = ModelSpec(**teacher.model) if teacher.form == "model" else student
    return dataclasses.replace(teacher, run=None, stage=None, hf_llava=None, weights=None, precision="float32",
                               model=to_dict(tiny_model_like(model, smoke, teacher=True)))


def _deep_enough(smoke: SmokeSpec, recipe: Recipe) -> SmokeSpec:
    """A tiny LLM with a layer past the deepest one an efficiency method names (FastV's K, PDrop's boundaries)."""
    deepest = 0
    for spec in [recipe.model.efficiency, *(s.efficiency for s in recipe.stages)]:
        if isinstance(spec, dict):
            named = [spec.get("layer") or 0, *(spec.get("layers") or [])]
            deepest = max(deepest, *(int(v) for v in named))
    return dataclasses.replace(smoke, llm_layers=max(smoke.llm_layers, deepest + 1))


def smoke_recipe(recipe: Recipe) -> Recipe:
    smoke = _deep_enough(recipe.smoke, recipe)
    model = tiny_model_like(recipe.model, smoke)
    stages = []
    for stage in recipe.stages:
        split = "synthetic:align" if stage.data.template == "plain" else "synthetic:sft"
        if OBJECTIVES.build(stage.objective).preference:
            split = "synthetic:preference"
        data = dataclasses.replace(stage.data, train=split, eval="synthetic:eval" if stage.data.eval else None, image_root=None,
                                   synthetic=smoke.synthetic, max_length=min(stage.data.max_length, 512), num_workers=0)
        optim = dataclasses.replace(stage.optim, global_batch_size=smoke.global_batch_size, micro_batch_size=smoke.micro_batch_size,
                                    max_steps=smoke.steps)
        trainer = dataclasses.replace(stage.trainer, precision="32-true", accelerator="cpu", devices=1, num_nodes=1, strategy="auto",
                                      checkpoint_every_n_steps=max(1, smoke.steps), log_every_n_steps=1,
                                      val_every_n_steps=None if stage.trainer.val_every_n_steps is None else smoke.steps)
        own = stage.model
        if stage.pre_align is not None:  # the tiny mixture's member, with its own (shrunk) projector
            connector = resolve_component("connectors", tiny_connector_like(own.connector, smoke.connector), "smoke.connector")
            own = ModelSpec(model.encoder["members"][stage.pre_align], connector, model.llm)
        elif own is not None:  # a fresh start: the student again, or a teacher of its own families (larger)
            own = model if own.llm == recipe.model.llm else tiny_model_like(own, smoke, teacher=True)
        stages.append(dataclasses.replace(stage, data=data, optim=optim, trainer=trainer, model=own,
                                          teacher=_tiny_teacher(stage.teacher, recipe.model, smoke)))
    eval_spec = dataclasses.replace(recipe.eval, max_samples=smoke.synthetic.num_eval)
    return dataclasses.replace(recipe, model=model, stages=stages, eval=eval_spec)
