"""Distillation teachers (docs/distillation.md): where a stage's teacher comes from, loading it frozen, and the
checks that run before anything trains.

A teacher is loaded once per run and shared by the stages that name it; it is frozen (``requires_grad=False``), in
eval mode and in its own dtype, and it is not a submodule of the LightningModule — so it is never in the
optimiser, in a checkpoint, or wrapped by DDP (every rank holds its own replica, under FSDP/DeepSpeed too). A
checkpoint records which teacher it was trained with (:func:`describe`); resuming with another one is an error.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm_kit.config.recipe import ModelSpec, Recipe, TeacherSpec
from mllm_kit.errors import ConfigError
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.saving import MLLM_CONFIG
from mllm_kit.pretrained import resolve_dtype
from mllm_kit.training.state import STATE_FILE, RunState

log = get_logger(__name__)


@dataclass
class Teacher:
    """A loaded teacher and what a checkpoint records about it."""

    model: MLLM
    spec: TeacherSpec
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {**self.spec.describe(), "fingerprint": self.fingerprint}


def check_source(spec: TeacherSpec, where: str, state: RunState, earlier: list[str]) -> None:
    """The teacher exists and is finished — before anything trains. ``earlier``: stages of this recipe that will
    have finished before the stage starts (done, or run first)."""
    if spec.form == "run":
        if not (Path(spec.run) / STATE_FILE).is_file():
            raise ConfigError(f"{where}.run: {spec.run!r} is not a run directory (made by `mllm-kit fit`); give the run whose "
                              f"stage {spec.stage!r} trained the teacher.")
        other = RunState.load(Path(spec.run))
        if not other.done(spec.stage):
            status = other.stages.get(spec.stage, {}).get("status", "not run")
            raise ConfigError(f"{where}.stage: stage {spec.stage!r} of run {spec.run!r} has not finished ({status}; finished: "
                              f"{sorted(n for n in other.stages if other.done(n)) or 'none'}); finish it first or name a finished stage.")
    elif spec.form == "stage":
        if spec.stage not in earlier and not state.done(spec.stage):
            raise ConfigError(f"{where}.stage: the teacher stage {spec.stage!r} has not finished in this run directory and is not "
                              f"selected to run before this stage; include it in --stages.")
    elif spec.form == "hf_llava":
        if not (Path(spec.hf_llava) / "config.json").is_file():
            raise ConfigError(f"{where}.hf_llava: {spec.hf_llava!r} is not a transformers LLaVA directory (no config.json).")
    elif spec.weights is not None and not Path(spec.weights).exists():
        raise ConfigError(f"{where}.weights: {spec.weights!r} does not exist (a .safetensors file or a saved mllm-kit model directory).")


def final_dir(spec: TeacherSpec, state: RunState) -> Path | None:
    """The saved model a run- or stage-teacher loads from."""
    if spec.form == "run":
        return RunState.load(Path(spec.run)).final_dir(spec.stage)
    if spec.form == "stage":
        return state.final_dir(spec.stage)
    return None


def build_teacher(spec: TeacherSpec, state: RunState, where: str) -> MLLM:
    """The teacher's model with its weights, before freezing."""
    saved = final_dir(spec, state)
    if saved is not None:
        return MLLM.from_pretrained(saved)
    if spec.form == "hf_llava":
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from mllm_kit.interop.llava import from_hf_llava

        llava = LlavaForConditionalGeneration.from_pretrained(spec.hf_llava)
        with tempfile.TemporaryDirectory(prefix="mllm-kit-teacher-") as tmp:
            return from_hf_llava(llava, AutoTokenizer.from_pretrained(spec.hf_llava), tmp)
    model_spec = ModelSpec(**spec.model)
    if spec.weights is not None and Path(spec.weights).is_dir() and (Path(spec.weights) / MLLM_CONFIG).is_file():
        return MLLM.from_pretrained(spec.weights)
    model = MLLM.build(model_spec)
    if spec.weights is None:
        log.warning("%s: a model teacher without weights is randomly initialised (only --smoke does that on purpose)", where)
        return model
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, spec.weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{where}.weights: {spec.weights} does not fit teacher.model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}.")
    return model


def freeze(model: MLLM, precision: str) -> MLLM:
    model.requires_grad_(False)
    model.eval()
    return model.to(resolve_dtype(precision))


def fingerprint(model: MLLM) -> str:
    """A short digest of the teacher's weights (names, shapes and per-tensor sums)."""
    params = dict(model.state_dict())
    sums = torch.stack([t.detach().double().sum() for t in params.values()]).tolist() if params else []
    text = json.dumps([[n, list(t.shape), round(v, 6)] for (n, t), v in zip(params.items(), sums)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def check_vocabulary(student: MLLM, teacher: MLLM, spec: TeacherSpec, where: str) -> None:
    """Logit terms compare distributions over the same token ids: ``vocab: same`` needs equal vocabularies,
    ``shared_prefix`` equal ids over the smaller one (LLaVA-MoD's truncation)."""
    mine, theirs = _by_id(student), _by_id(teacher)
    if spec.vocab == "same":
        if mine != theirs:
            diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise ConfigError(f"{where}.vocab: student and teacher vocabularies differ ({len(mine)} vs {len(theirs)} tokens; first "
                              f"difference at id {diff}: {mine[diff] if diff < len(mine) else None!r} vs "
                              f"{theirs[diff] if diff < len(theirs) else None!r}). Distillation compares logits token by token: use a "
                              f"teacher with the student's tokenizer, or vocab: shared_prefix when one vocabulary extends the other.")
        return
    shared = min(len(mine), len(theirs))
    diff = next((i for i in range(shared) if mine[i] != theirs[i]), None)
    if diff is not None:
        raise ConfigError(f"{where}.vocab: shared_prefix needs the first {shared} token ids to match, but id {diff} is "
                          f"{mine[diff]!r} for the student and {theirs[diff]!r} for the teacher.")


def _by_id(model: MLLM) -> list[str | None]:
    vocab = model.tokenizer.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        out[i] = token
    return out


class Teachers:
    """The run's teachers, loaded on first use and released after the last stage that reads each."""

    def __init__(self, recipe: Recipe, state: RunState, todo: list[int]) -> None:
        self.recipe, self.state = recipe, state
        self.last_use: dict[str, int] = {}
        for i in todo:
            if recipe.stages[i].teacher is not None:
                self.last_use[_key(recipe.stages[i].teacher)] = i
        self.loaded: dict[str, Teacher] = {}

    def get(self, index: int) -> Teacher | None:
        spec = self.recipe.stages[index].teacher
        if spec is None:
            return None
        key = _key(spec)
        if key not in self.loaded:
            where = f"stages[{index}] ({self.recipe.stages[index].name!r}).teacher"
            model = freeze(build_teacher(spec, self.state, where), spec.precision)
            self.loaded[key] = Teacher(model, spec, fingerprint(model))
            log.info("%s: loaded the %s teacher (%s, %.1fM parameters)", where, spec.form, spec.precision,
                     sum(p.numel() for p in model.parameters()) / 1e6)
        return self.loaded[key]

    def release_after(self, index: int) -> None:
        for key in [k for k, last in self.last_use.items() if last <= index]:
            self.loaded.pop(key, None)


def _key(spec: TeacherSpec) -> str:
    return json.dumps(spec.describe(), sort_keys=True, default=str)
