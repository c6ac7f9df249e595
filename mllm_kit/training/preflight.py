"""Checks of every stage of a run before the first one trains.

Names were checked when the recipe loaded; what remains needs the machine or the model: data files and image roots
exist, the global batch divides over the configured devices, and each stage's ``trainable`` paths match modules of
the model that stage will train — found by replaying the stages' transforms on a weightless copy (meta tensors) of
the starting model, so a typo in the last stage fails in seconds, not after the earlier stages have trained.
"""

from __future__ import annotations

import copy

import torch

from mllm_kit.config.recipe import Recipe
from mllm_kit.errors import MllmKitError
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.training.data import check_source
from mllm_kit.training.stage import apply_transforms, world_size
from mllm_kit.training.trainable import apply_trainable

log = get_logger(__name__)


def check_static(recipe: Recipe, indices: list[int]) -> None:
    """Data sources and batch arithmetic of the stages ``indices``."""
    for i in indices:
        stage, where = recipe.stages[i], f"stages[{i}] ({recipe.stages[i].name!r})"
        check_source(stage.data, "train", f"{where}.data")
        if stage.data.eval is not None:
            check_source(stage.data, "eval", f"{where}.data")
        stage.optim.accumulation(world_size(stage.trainer), f"{where}.optim")


def skeleton(model: MLLM) -> MLLM:
    """A copy of ``model`` whose parameters and buffers are meta tensors: its structure without its memory."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def check_run(recipe: Recipe, indices: list[int], model: MLLM) -> bool:
    """Each stage's transforms and ``trainable`` paths, in order, on a skeleton of the first stage's starting model.
    Returns whether every stage could be checked (a transform that cannot run on meta tensors stops the walk)."""
    shadow = skeleton(model)
    for i in indices:
        stage = recipe.stages[i]
        try:
            apply_transforms(shadow, stage, quiet=True)
        except MllmKitError:
            raise
        except Exception as err:  # a transform that cannot run on meta tensors: the stage checks itself when it starts
            log.info("stage %s: its transforms cannot run before training (%s: %s); it and later stages are checked when they start",
                     stage.name, type(err).__name__, err)
            return False
        apply_trainable(shadow, stage.trainable, where=f"stages[{i}] ({stage.name!r}).trainable")
    return True
