"""Checks of every stage of a run before the first one trains.

Names were checked when the recipe loaded; what remains needs the machine or the model: data files and image roots
exist, the global batch divides over the configured devices, and each stage's ``trainable`` paths match modules of
the model that stage will train — found by replaying the stages' transforms on a weightless copy (meta tensors) of
the starting model, so a typo in the last stage fails in seconds, not after the earlier stages have trained. A
stage's teacher is checked the same way: its source exists and is finished, its vocabulary matches the student's,
and the objective's terms fit both models (e.g. a visual KL needs equal image-token counts) — against the skeleton
of a teacher stage this run trains first, or the loaded teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mllm_kit.config.recipe import Recipe, Stage
from mllm_kit.data.dataset import View
from mllm_kit.errors import ConfigError, MllmKitError
from mllm_kit.evaluation.callback import bench_stage_names, read_benches
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.objectives.base import Objective
from mllm_kit.registry import OBJECTIVES
from mllm_kit.training.data import check_source, teacher_view
from mllm_kit.training.stage import apply_transforms, build_recipe_model, run_final_dir, run_source, start_of, world_size
from mllm_kit.training.state import RunState
from mllm_kit.training.teacher import Teachers, check_vocabulary
from mllm_kit.training.teacher import check_source as check_teacher_source
from mllm_kit.training.trainable import apply_trainable

log = get_logger(__name__)


def check_static(recipe: Recipe, indices: list[int], state: RunState | None = None) -> None:
    """Data sources, batch arithmetic and teacher sources of the stages ``indices``."""
    state = state or RunState(Path("."))
    for k, i in enumerate(indices):
        stage, where = recipe.stages[i], f"stages[{i}] ({recipe.stages[i].name!r})"
        check_source(stage.data, "train", f"{where}.data")
        if stage.data.eval is not None:
            check_source(stage.data, "eval", f"{where}.data")
        stage.optim.accumulation(world_size(stage.trainer), f"{where}.optim")
        if run_source(recipe, i) is not None:
            run_final_dir(recipe, i)  # init_from another run: still finished, its final/ still there
        if stage.teacher is not None:
            check_teacher_source(stage.teacher, f"{where}.teacher", state, [recipe.stages[j].name for j in indices[:k]])
        if stage.name in bench_stage_names(recipe):
            read_benches(recipe, stage, None)  # eval.benches files: parsed and checked now, not after hours of training
        for member, name in stage.init_members.items():
            if not state.done(name) and name not in [recipe.stages[j].name for j in indices[:k]]:
                raise ConfigError(f"{where}.init_members.{member}: stage {name!r} has not finished in this run directory and "
                                  f"does not run before this stage; include it in --stages.")


def skeleton(model: MLLM) -> MLLM:
    """A copy of ``model`` whose parameters and buffers are meta tensors: its structure without its memory."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def check_run(recipe: Recipe, indices: list[int], model: MLLM, teachers: Teachers | None = None) -> bool:
    """Each stage's transforms, ``trainable`` paths and teacher, in order, on a skeleton of the first stage's starting
    model (a stage that builds a fresh model gets its own). Returns whether every stage could be checked (a transform
    that cannot run on meta tensors stops the walk)."""
    shadow = skeleton(model)
    finals: dict[str, MLLM] = {}
    for i in indices:
        stage = recipe.stages[i]
        source = start_of(recipe, i)
        if i != indices[0]:
            if source is None:
                shadow = skeleton(build_recipe_model(recipe, stage.model))
            elif source in finals:
                shadow = skeleton(finals[source])
            else:
                log.info("stage %s: starts from %s, which this run does not train; it is checked when it starts", stage.name, source)
                return False
        try:
            apply_transforms(shadow, stage, quiet=True, where=f"stages[{i}]")
        except MllmKitError:
            raise
        except Exception as err:  # a transform that cannot run on meta tensors: the stage checks itself when it starts
            log.info("stage %s: its transforms cannot run before training (%s: %s); it and later stages are checked when they start",
                     stage.name, type(err).__name__, err)
            return False
        where = f"stages[{i}] ({stage.name!r})"
        apply_trainable(shadow, stage.trainable, where=f"{where}.trainable", precision=stage.trainer.precision)
        teacher = None  # a teacher stage this run trains first: its skeleton; any other: loaded once (and kept for the stage)
        if stage.teacher is not None and stage.teacher.form == "stage" and stage.teacher.stage in finals:
            teacher = finals[stage.teacher.stage]
        elif stage.teacher is not None and teachers is not None:
            teacher = teachers.get(i).model
        if teacher is not None or stage.teacher is None:
            bind(shadow, teacher, stage, OBJECTIVES.build(stage.objective), where)
        finals[stage.name] = skeleton(shadow)
    return True


def bind(student: MLLM, teacher: MLLM | None, stage: Stage, objective: Objective, where: str) -> View | None:
    """Check a stage's student, teacher and objective together and bind the objective → the teacher's own view of the
    data (``None``: it reads the student's)."""
    view = None
    if stage.teacher is not None and not objective.needs_teacher:
        raise ConfigError(f"{where}.teacher: the stage's objective {stage.objective.get('name')!r} reads no teacher; use a "
                          f"distillation objective (kd, mimic, dpo, kto_pair) or remove the teacher.")
    if teacher is not None:
        check_vocabulary(student, teacher, stage.teacher, f"{where}.teacher")
        view = teacher_view(student, teacher, stage.data, stage.teacher.template)
    objective.bind(student, teacher, f"{where}.objective", separate_view=view is not None)
    return view
