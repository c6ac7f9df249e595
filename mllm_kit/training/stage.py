"""What a stage starts from and does to its model before training: the starting model, transforms, world size."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from mllm_kit.config.recipe import ModelSpec, Recipe, Stage, TrainerSpec
from mllm_kit.config.runs import check_run_ref, split_run_ref
from mllm_kit.data.templates import get_template
from mllm_kit.errors import ConfigError
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.registry import TRANSFORMS
from mllm_kit.training.state import RunState

log = get_logger(__name__)


def template_tokens(recipe: Recipe) -> set[str]:
    """The control tokens of every template the recipe's stages (and their teachers) use."""
    templates = [s.data.template for s in recipe.stages] + [s.teacher.template for s in recipe.stages if s.teacher and s.teacher.template]
    return {t for name in templates for t in get_template(name).special_tokens()}


def build_recipe_model(recipe: Recipe, spec: ModelSpec | None = None) -> MLLM:
    """A fresh model from resolved specs (default: the recipe's ``model``), with every template's control tokens in
    the tokenizer (so that a teacher and a student built by one recipe share their token ids)."""
    spec = spec or recipe.model
    llm = spec.llm
    tokens = template_tokens(recipe)
    if tokens:
        llm = {**llm, "special_tokens": sorted(set(llm.get("special_tokens", [])) | tokens)}
    return MLLM.build(spec.encoder, spec.connector, llm)


def start_of(recipe: Recipe, stage_index: int) -> str | None:
    """The stage whose ``final/`` a stage starts from, or ``None`` when it builds a fresh model."""
    stage = recipe.stages[stage_index]
    if stage.model is not None or (stage_index == 0 and stage.init_from is None):
        return None
    return stage.init_from or recipe.stages[stage_index - 1].name


def run_source(recipe: Recipe, stage_index: int) -> tuple[Path, str] | None:
    """``(run directory, stage)`` when the stage starts from another run (``init_from: RUN:STAGE``), else ``None``."""
    stage = recipe.stages[stage_index]
    if stage.model is not None or stage.init_from is None or stage.init_from in [s.name for s in recipe.stages[:stage_index]]:
        return None
    run, name = split_run_ref(stage.init_from)
    if name is None:  # recipes record RUN:STAGE once checked; a bare RUN here comes from a hand-built Recipe
        name = check_run_ref(stage.init_from, f"stage {stage.name!r}.init_from", []).rpartition(":")[2]
    return Path(run), name


def run_final_dir(recipe: Recipe, stage_index: int) -> Path:
    """The ``final/`` of the other run's stage a stage starts from, checked again (the run may have changed)."""
    run, name = run_source(recipe, stage_index)
    check_run_ref(f"{run}:{name}", f"stage {recipe.stages[stage_index].name!r}.init_from", [])
    return RunState.load(run).final_dir(name)


def stage_model(recipe: Recipe, stage_index: int, state: RunState) -> MLLM:
    """Stage k+1 starts from stage k's ``final/`` (or ``init_from``'s: an earlier stage, or a stage of another run
    directory); the first stage, and a stage that names ``model``, build fresh. The stage's seed is set first, so fresh
    weights (a connector trained from scratch) are a function of the recipe."""
    stage = recipe.stages[stage_index]
    L.seed_everything(stage.trainer.seed, workers=True, verbose=False)
    source = start_of(recipe, stage_index)
    external = run_source(recipe, stage_index) is not None
    for name in [None if external else source, *stage.init_members.values()]:
        if name is not None and not state.done(name):
            raise ConfigError(
                f"stage {stage.name!r} starts from stage {name!r}, which has not finished in this "
                f"run directory; run it first (include it in --stages)."
            )
    if external:
        model = MLLM.from_pretrained(run_final_dir(recipe, stage_index))
        _add_template_tokens(model, template_tokens(recipe), stage.name)
    else:
        model = build_recipe_model(recipe, stage.model) if source is None else MLLM.from_pretrained(state.final_dir(source))
    for member, name in stage.init_members.items():  # a pre-aligned member's trained weights (Eagle, specs §5.1)
        trained = MLLM.from_pretrained(state.final_dir(name)).encoder
        model.encoder.members[member].load_state_dict(trained.state_dict())
        log.info("stage %s: encoder member %s from stage %s", stage.name, member, name)
    return model


def _add_template_tokens(model: MLLM, tokens: set[str], stage: str) -> None:
    """A model from another run gets this recipe's template control tokens, as a fresh build would (new embedding rows)."""
    missing = sorted(t for t in tokens if t not in model.tokenizer.get_vocab())
    ensure = getattr(model.llm, "_ensure_tokens", None)
    if missing and ensure is not None:
        log.info("stage %s: adding the recipe's template tokens %s to the tokenizer of the run it starts from", stage, missing)
        ensure(missing)


def apply_transforms(model: MLLM, stage: Stage, quiet: bool = False, where: str = "stage") -> None:
    """The stage's transforms, in order, then its visual-token efficiency method (checked against the result)."""
    for spec in stage.transforms:
        if not quiet:
            log.info("stage %s: transform %s", stage.name, spec)
        TRANSFORMS.build(spec)(model)
    if stage.efficiency is not None and not quiet:
        log.info("stage %s: visual-token efficiency %s", stage.name, stage.efficiency)
    model.set_efficiency(stage.efficiency, f"{where}.efficiency")


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
