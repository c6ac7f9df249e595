"""The stage runner: runs a recipe's stages in order inside one run directory (DESIGN.md, "Recipes").

Before the first stage trains, :func:`mllm_kit.training.preflight.check_run` checks every selected stage (data files,
batch arithmetic, trainable paths against the model each stage will have). Stage k+1 starts from stage k's
``final/``; the hand-off is recorded in ``state.json`` only (:mod:`mllm_kit.training.state`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

from mllm_kit.config.recipe import SHARDED_STRATEGIES, Recipe, Stage
from mllm_kit.errors import ConfigError
from mllm_kit.evaluation.callback import bench_callback
from mllm_kit.log import get_logger
from mllm_kit.model import MLLM
from mllm_kit.registry import OBJECTIVES
from mllm_kit.training.checkpoint import AtomicCheckpointIO
from mllm_kit.training.data import MLLMDataModule
from mllm_kit.training.evaluate import EvalResult
from mllm_kit.training.module import MLLMModule
from mllm_kit.training.perf import PerfMonitor
from mllm_kit.training.preflight import bind, check_run, check_static
from mllm_kit.training.stage import apply_transforms, stage_model, world_size
from mllm_kit.training.state import LAST_CKPT, RunState, write_recipe
from mllm_kit.training.strategies import build_strategy, consolidate
from mllm_kit.training.teacher import Teachers
from mllm_kit.training.trainable import apply_trainable, format_table

log = get_logger(__name__)
# Lightning's hardware banner and tips are noise next to the stage table; warnings still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class StepBudgetProgressBar(RichProgressBar):
    """Lightning's rich bar, counted against the stage's step budget: the trainer runs ``max_epochs=-1`` (a stage is
    ``max_steps`` long), for which Lightning's own description reads "Epoch 0/-2" and its last epochs' totals count
    the remaining optimiser steps as micro-batches ("12/8" under 2× accumulation)."""

    def __init__(self, stage: str, leave: bool = True) -> None:
        super().__init__(leave=leave)
        self.stage = stage

    @property
    def total_train_batches(self) -> int | float:
        t = self.trainer
        if t.max_steps > 0:
            return min(t.num_training_batches, (t.max_steps - t.global_step) * t.accumulate_grad_batches)
        return t.num_training_batches

    def _get_train_description(self, current_epoch: int) -> str:
        t = self.trainer
        description = f"{self.stage} epoch {current_epoch}"
        batches = t.num_training_batches
        if t.max_steps > 0 and isinstance(batches, int) and batches > 0:
            description += f"/{math.ceil(t.max_steps * t.accumulate_grad_batches / batches) - 1}"
        return f"{description:{len(self.validation_description)}}"


def make_trainer(stage: Stage, stage_dir: Path | None, *, max_steps: int = -1, accumulate: int = 1, validate: bool = False,
                 extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """The Lightning Trainer of a stage, every setting given at construction. Without ``stage_dir``: for evaluation."""
    t, o = stage.trainer, stage.optim
    if t.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"stage {stage.name!r}: trainer.strategy={t.strategy!r} needs DeepSpeed: pip install 'mllm-kit[deepspeed]'.")
    callbacks: list[Any] = []
    if t.progress:
        callbacks.append(StepBudgetProgressBar(stage.name, leave=True))
    common = dict(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
                  deterministic=t.deterministic, enable_model_summary=False, enable_progress_bar=t.progress, num_sanity_val_steps=0)
    if stage_dir is None:  # evaluation: one process on the stage's accelerator (no launcher for a CLI command)
        common.update(devices=1, num_nodes=1, strategy="auto")
        return L.Trainer(logger=False, enable_checkpointing=False, callbacks=callbacks, **common)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    callbacks += [
        ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="step-{step}", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        PerfMonitor(peak_tflops=t.peak_tflops),  # perf/tokens_per_s, perf/mfu, ... (host counts only: no device sync)
        *extra_callbacks,
    ]
    validation: dict[str, Any] = {"limit_val_batches": 0}
    if validate and t.val_every_n_steps:
        # Lightning counts micro-batches between validation runs; the recipe counts optimiser steps.
        validation = {"val_check_interval": t.val_every_n_steps * accumulate, "check_val_every_n_epoch": None}
    return L.Trainer(
        max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=accumulate, gradient_clip_val=o.grad_clip or None,
        callbacks=callbacks, logger=[CSVLogger(stage_dir, name="logs", version=""), TensorBoardLogger(stage_dir, name="logs", version="")],
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False,
        plugins=[] if t.strategy in SHARDED_STRATEGIES else [AtomicCheckpointIO()],  # sharded ones write their own
        default_root_dir=stage_dir, strategy=build_strategy(t, world_size(t)), **validation, **common,
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


def prepare_stage(recipe: Recipe, index: int, run_dir: Path, state: RunState, resume: bool = False,
                  model: MLLM | None = None, teachers: Teachers | None = None) -> PreparedStage:
    stage = recipe.stages[index]
    where = f"stages[{index}]"
    stage_dir = run_dir / stage.name
    model = model if model is not None else stage_model(recipe, index, state)  # seeds the stage's RNG streams
    apply_transforms(model, stage, where=where)
    counts = apply_trainable(model, stage.trainable, where=f"{where}.trainable", precision=stage.trainer.precision)
    log.info("%s", format_table(counts, f"stage {stage.name!r}: parameters"))
    if stage.trainer.activation_checkpointing:
        model.enable_activation_checkpointing()
    if stage.trainer.compile:
        model.compile_blocks()

    teacher = (teachers or Teachers(recipe, state, [index])).get(index)
    objective = OBJECTIVES.build(stage.objective)
    view = bind(model, teacher.model if teacher else None, stage, objective, where)
    world = world_size(stage.trainer)
    accumulate = stage.optim.accumulation(world, f"{where}.optim")
    data = MLLMDataModule(model, stage.data, run_dir / "data", stage.optim.micro_batch_size, accumulate, stage.trainer.seed, recipe.eval,
                          teacher=view, preference=objective.preference)
    per_epoch = data.steps_per_epoch(world)
    if per_epoch == 0:
        raise ConfigError(f"{where}.data: {len(data.dataset)} samples are fewer than one global batch of {stage.optim.global_batch_size}.")
    total_steps = stage.optim.max_steps or math.ceil(stage.optim.epochs * per_epoch)
    module = MLLMModule(model, stage, objective, total_steps, recipe.eval, sorted(set(data.tasks.values())),
                        data.eval_prompts.encoder.stop_token_ids() if data.eval_prompts else None, teacher)
    benches = bench_callback(recipe, stage, stage_dir, state, run_dir / "data")
    trainer = make_trainer(stage, stage_dir, max_steps=total_steps, accumulate=accumulate, validate=data.eval_prompts is not None,
                           extra_callbacks=[benches] if benches else [])
    if trainer.world_size != world:
        raise ConfigError(f"{where}.trainer: devices={stage.trainer.devices!r} × num_nodes={stage.trainer.num_nodes} gave "
                          f"{trainer.world_size} processes, not the {world} the batch arithmetic assumed; give devices as a number.")
    ckpt = stage_dir / "checkpoints" / LAST_CKPT
    ckpt_path = str(ckpt) if resume and ckpt.exists() else None  # a file, or a sharded strategy's directory
    log.info("stage %s: %d steps (%d per epoch), global batch %d = %d × %d ranks × %d accumulation%s%s", stage.name, total_steps,
             per_epoch, stage.optim.global_batch_size, stage.optim.micro_batch_size, world, accumulate,
             f", distilling from the {teacher.spec.form} teacher" + (" (own view of the data)" if view else "") if teacher else "",
             f", resuming from {ckpt}" if ckpt_path else "")
    return PreparedStage(stage, model, module, data, trainer, ckpt_path, stage_dir / "final")


def run_stage(recipe: Recipe, index: int, run_dir: Path, state: RunState, resume: bool, model: MLLM | None = None,
              teachers: Teachers | None = None) -> Path:
    prepared = prepare_stage(recipe, index, run_dir, state, resume, model, teachers)
    name = prepared.stage.name
    if prepared.trainer.is_global_zero:
        state.mark(name, status="running")
    prepared.model.train()
    try:
        prepared.trainer.fit(prepared.module, datamodule=prepared.data, ckpt_path=prepared.ckpt_path)
    except RuntimeError as err:
        if "Missing key in checkpoint state_dict: optimizer" not in str(err):
            raise
        raise ConfigError(f"stage {name!r}: the sharded checkpoint {prepared.ckpt_path} has no optimiser state for a trainable "
                          f"parameter ({str(err).split('state.')[-1].rstrip('.')}): it never received a gradient (e.g. a "
                          f"trainable encoder's blocks after the layer the connector reads). List only the parts that are "
                          f"used in {name}.trainable (docs/scaling.md).") from None
    consolidate(prepared.trainer.strategy, prepared.model)  # collective: rank 0's model now holds every full weight
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
    and an unfinished one continues from its last checkpoint. Every stage to run is checked before the first trains."""
    run_dir = Path(run_dir)
    state = RunState.load(run_dir)
    selected = [recipe.stage(name).name for name in stages] if stages else [s.name for s in recipe.stages]
    launching = is_launching_process()
    if launching and state.stages and not resume and not stages:
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")
    resume = resume or not launching  # another rank of this run follows rank 0's record of what has finished
    todo = [i for i, s in enumerate(recipe.stages) if s.name in selected and not (resume and state.done(s.name))]
    check_static(recipe, todo, state)
    teachers = Teachers(recipe, state, todo)
    model = stage_model(recipe, todo[0], state) if todo else None
    if model is not None:
        check_run(recipe, todo, model, teachers)
    if launching:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_recipe(run_dir, recipe)
    for index, stage in enumerate(recipe.stages):
        if stage.name in selected and index not in todo:
            log.info("stage %s: already finished, skipping", stage.name)
        if index in todo:
            run_stage(recipe, index, run_dir, state, resume, model if index == todo[0] else None, teachers)
            teachers.release_after(index)
    if torch.distributed.is_initialized():  # every stage shares one process group; gloo + DeepSpeed may abort at exit without this
        torch.distributed.destroy_process_group()
    return state


def evaluate(model: MLLM, recipe: Recipe, stage: Stage, data_root: Path) -> EvalResult:
    """Held-out loss and generation accuracy of ``model`` on ``stage.data.eval`` (all of it), through Lightning."""
    if stage.data.eval is None:
        raise ConfigError(f"stage {stage.name!r} names no eval data (data.eval); set one, e.g. data.eval=synthetic:eval.")
    full = dataclasses.replace(recipe.eval, max_samples=None)
    data = MLLMDataModule(model, stage.data, data_root, 1, 1, stage.trainer.seed, full, train=False)
    module = MLLMModule(model, stage, OBJECTIVES.build(stage.objective), eval_spec=full, tasks=sorted(set(data.tasks.values())),
                        stop_token_ids=data.eval_prompts.encoder.stop_token_ids())
    trainer = make_trainer(stage, None)
    with torch.random.fork_rng(devices=[]):  # anything random in the forward (a random-drop control) repeats per run
        torch.manual_seed(stage.trainer.seed)
        metrics = trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)
    flat = {k: float(v) for m in metrics for k, v in m.items()}
    return EvalResult.from_metrics(flat)
