"""What a stage starts from and does to its model before training: the starting model, transforms, world size."""

from __future__ import annotations

import lightning as L

from mllm_kit.config.recipe import Recipe, Stage, TrainerSpec
from mllm_kit.data.templates import get_template
from mllm_kit.errors import ConfigError
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.registry import TRANSFORMS
from mllm_kit.training.state import RunState

log = get_logger(__name__)


def build_recipe_model(recipe: Recipe) -> MLLM:
    """The stage-0 model from the recipe's resolved specs, with every template's control tokens in the tokenizer."""
    llm = recipe.model.llm
    tokens = {t for s in recipe.stages for t in get_template(s.data.template).special_tokens()}
    if tokens:
        llm = {**llm, "special_tokens": sorted(set(llm.get("special_tokens", [])) | tokens)}
    return MLLM.build(recipe.model.encoder, recipe.model.connector, llm)


def stage_model(recipe: Recipe, stage_index: int, state: RunState) -> MLLM:
    """Stage k+1 starts from stage k's ``final/``; the first stage builds from the recipe. The stage's seed is set
    first, so fresh weights (a connector trained from scratch) are a function of the recipe."""
    L.seed_everything(recipe.stages[stage_index].trainer.seed, workers=True, verbose=False)
    if stage_index == 0:
        return build_recipe_model(recipe)
    previous = recipe.stages[stage_index - 1].name
    if not state.done(previous):
        raise ConfigError(
            f"stage {recipe.stages[stage_index].name!r} starts from stage {previous!r}, which has not finished in this "
            f"run directory; run it first (include it in --stages)."
        )
    return MLLM.from_pretrained(state.final_dir(previous))


def apply_transforms(model: MLLM, stage: Stage, quiet: bool = False) -> None:
    for spec in stage.transforms:
        if not quiet:
            log.info("stage %s: transform %s", stage.name, spec)
        TRANSFORMS.build(spec)(model)


def world_size(trainer: TrainerSpec) -> int:
    """Processes the trainer settings ask for (devices × nodes), known before a Trainer exists."""
    devices = trainer.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:  # "auto" or -1: every visible accelerator (one process on CPU)
        import torch

        count = torch.cuda.device_count() if trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    return count * trainer.num_nodes
