"""The stage runner: runs a recipe's stages in order inside one run directory (DESIGN.md, "Recipes").

Run directory::

    recipe.yaml               the fully resolved recipe
    state.json                per stage: status and where its final weights are (the only hand-off record)
    data/                     generated synthetic data
    <stage>/checkpoints/      Lightning checkpoints (full state), written atomically; last.ckpt resumes
    <stage>/logs/             metrics.csv and TensorBoard events
    <stage>/final/            the stage's weights: encoder/, llm/ (HF dirs), connector.safetensors, mllm.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from mllm_kit.data.templates import get_template
from mllm_kit.errors import ConfigError
from mllm_kit.io import atomic_write_json, atomic_write_text
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.presets import resolve_spec
from mllm_kit.recipe import Recipe, Stage, accumulation_steps
from mllm_kit.registry import OBJECTIVES, TRANSFORMS
from mllm_kit.training.checkpoint import AtomicCheckpointIO
from mllm_kit.training.data import MLLMDataModule
from mllm_kit.training.module import MLLMModule
from mllm_kit.training.trainable import apply_trainable, format_table

log = get_logger(__name__)
# Lightning's hardware banner and tips are noise next to the stage table; warnings still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.yaml"
LAST_CKPT = "last.ckpt"


@dataclass
class RunState:
    """What the run directory records about each stage; stage hand-off reads only this."""

    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        file = run_dir / STATE_FILE
        stages = json.loads(file.read_text())["stages"] if file.is_file() else {}
        return cls(file, stages)

    def save(self) -> None:
        atomic_write_json(self.path, {"stages": self.stages})

    def done(self, name: str) -> bool:
        return self.stages.get(name, {}).get("status") == "done"

    def final_dir(self, name: str) -> Path:
        return self.path.parent / self.stages[name]["final"]

    def mark(self, name: str, **values: Any) -> None:
        self.stages.setdefault(name, {}).update(values)
        self.save()


def build_recipe_model(recipe: Recipe) -> MLLM:
    """The stage-0 model from the recipe's specs, with every template's control tokens in the tokenizer."""
    if recipe.model.llm is None:
        raise ConfigError("model.llm: the recipe names no LLM; set a preset (e.g. vicuna_7b_v15) or a spec.")
    llm = resolve_spec("llms", recipe.model.llm)
    tokens = {t for s in recipe.stages for t in get_template(s.data.template).special_tokens()}
    if tokens:
        llm = {**llm, "special_tokens": sorted(set(llm.get("special_tokens", [])) | tokens)}
    return MLLM.build(recipe.model.encoder, recipe.model.connector, llm)


def stage_model(recipe: Recipe, stage_index: int, state: RunState) -> MLLM:
    """Stage k+1 starts from stage k's ``final/``; the first stage builds from the recipe."""
    if stage_index == 0:
        return build_recipe_model(recipe)
    previous = recipe.stages[stage_index - 1].name
    if not state.done(previous):
        raise ConfigError(
            f"stage {recipe.stages[stage_index].name!r} starts from stage {previous!r}, which has not finished in this "
            f"run directory; run it first (include it in --stages)."
        )
    return MLLM.from_pretrained(state.final_dir(previous))


def apply_transforms(model: MLLM, stage: Stage) -> None:
    for spec in stage.transforms:
        transform = TRANSFORMS.build(spec)
        log.info("stage %s: transform %s", stage.name, getattr(transform, "build_spec", spec))
        transform(model)


def make_trainer(stage: Stage, stage_dir: Path) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t, o = stage.trainer, stage.optim
    if t.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"stage {stage.name!r}: trainer.strategy={t.strategy!r} needs DeepSpeed: pip install 'mllm-kit[deepspeed]'.")
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="step-{step}", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True, enable_version_counter=False),
    ]
    if t.progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    loggers = [CSVLogger(stage_dir, name="logs", version=""), TensorBoardLogger(stage_dir, name="logs", version="")]
    return L.Trainer(
        max_steps=-1, max_epochs=-1, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, gradient_clip_val=o.grad_clip or None, callbacks=callbacks, logger=loggers,
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
        deterministic=t.deterministic, default_root_dir=stage_dir, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, enable_progress_bar=t.progress,
    )


@dataclass
class PreparedStage:
    """Everything one stage's ``trainer.fit`` needs (tests use this to look inside a stage)."""

    stage: Stage
    model: MLLM
    module: MLLMModule
    data: MLLMDataModule
    trainer: L.Trainer
    ckpt_path: str | None
    final_dir: Path


def prepare_stage(recipe: Recipe, index: int, run_dir: Path, state: RunState, resume: bool = False) -> PreparedStage:
    stage = recipe.stages[index]
    where = f"stages[{index}]"
    stage_dir = run_dir / stage.name
    L.seed_everything(stage.trainer.seed, workers=True, verbose=False)
    model = stage_model(recipe, index, state)
    apply_transforms(model, stage)
    counts = apply_trainable(model, stage.trainable, where=f"{where}.trainable")
    log.info("%s", format_table(counts, f"stage {stage.name!r}: parameters"))
    if stage.trainer.activation_checkpointing:
        model.llm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    trainer = make_trainer(stage, stage_dir)
    accumulate = accumulation_steps(stage.optim, trainer.world_size, f"{where}.optim")
    data = MLLMDataModule(model, stage.data, run_dir / "data", stage.optim.micro_batch_size, accumulate, stage.trainer.seed)
    per_epoch = data.steps_per_epoch(trainer.world_size)
    if per_epoch == 0:
        raise ConfigError(f"{where}.data: {len(data.dataset)} samples are fewer than one global batch of {stage.optim.global_batch_size}.")
    total_steps = stage.optim.max_steps or math.ceil(stage.optim.epochs * per_epoch)
    trainer.fit_loop.epoch_loop.max_steps = total_steps
    trainer.fit_loop.max_epochs = math.ceil(total_steps / per_epoch)
    trainer.accumulate_grad_batches = accumulate
    objective = OBJECTIVES.build(stage.objective if isinstance(stage.objective, dict) else {"name": stage.objective})
    module = MLLMModule(model, stage, objective, total_steps, accumulate)

    ckpt = stage_dir / "checkpoints" / LAST_CKPT
    ckpt_path = str(ckpt) if resume and ckpt.is_file() else None
    log.info("stage %s: %d steps (%d per epoch), global batch %d = %d × %d ranks × %d accumulation%s", stage.name, total_steps,
             per_epoch, stage.optim.global_batch_size, stage.optim.micro_batch_size, trainer.world_size, accumulate,
             f", resuming from {ckpt}" if ckpt_path else "")
    return PreparedStage(stage, model, module, data, trainer, ckpt_path, stage_dir / "final")


def run_stage(recipe: Recipe, index: int, run_dir: Path, state: RunState, resume: bool) -> Path:
    prepared = prepare_stage(recipe, index, run_dir, state, resume)
    name = prepared.stage.name
    if prepared.trainer.is_global_zero:
        state.mark(name, status="running")
    prepared.model.train()
    prepared.trainer.fit(prepared.module, datamodule=prepared.data, ckpt_path=prepared.ckpt_path)
    if prepared.trainer.is_global_zero:
        prepared.model.save_pretrained(prepared.final_dir)
        state.mark(name, status="done", final=str(prepared.final_dir.relative_to(run_dir)), steps=prepared.module.total_steps)
    # Other ranks read the hand-off record only after rank 0 has written it.
    prepared.trainer.strategy.barrier("stage-final")
    state.stages = RunState.load(run_dir).stages
    return prepared.final_dir


def is_launching_process() -> bool:
    """True in the process a user started (global rank 0). Lightning's DDP launcher re-runs the command for the
    other ranks with LOCAL_RANK/NODE_RANK set; torchrun and SLURM set RANK/SLURM_PROCID."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return os.environ[key] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def fit(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, stages: list[str] | None = None) -> RunState:
    """Run ``stages`` (default: all) of ``recipe`` in ``run_dir``; with ``resume``, finished stages are skipped
    and an unfinished one continues from its last checkpoint."""
    run_dir = Path(run_dir)
    state = RunState.load(run_dir)
    selected = [recipe.stage(name).name for name in stages] if stages else [s.name for s in recipe.stages]
    if is_launching_process():
        if state.stages and not resume and not stages:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    else:  # another rank of this run: it follows rank 0's record of what has finished
        resume = True
    for index, stage in enumerate(recipe.stages):
        if stage.name not in selected:
            continue
        if resume and state.done(stage.name):
            log.info("stage %s: already finished, skipping", stage.name)
            continue
        run_stage(recipe, index, run_dir, state, resume)
    return state
