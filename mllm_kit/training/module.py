"""The LightningModule of a stage: it runs the model, the objective scores the outputs, Lightning steps.

One training step (DESIGN.md, "Data flow")::

    StepBatch(batch, step_loss_tokens)          the loader's micro-batch + its optimiser step's supervised-token count
    normalizer = all-reduce(step_loss_tokens) / (accumulation × world size)      one collective per optimiser step
    for each pass of objective.passes(batch):    model(pass.batch) → outputs   [teacher(pass.batch.teacher_view()), no grad]
                                                 objective(outputs, pass.batch, normalizer, teacher_outputs)
    loss = objective.reduce(results) + Σ coef · aux loss                  Lightning: backward, accumulate, clip, step

Lightning divides the returned loss by the accumulation count and DDP averages gradients over ranks; the normaliser
undoes both, so the gradient is exactly the token mean over the global batch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from mllm_kit.batch import Batch
from mllm_kit.config.recipe import EvalSpec, Stage
from mllm_kit.model import MLLM
from mllm_kit.errors import ConfigError
from mllm_kit.objectives.base import Objective
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.training.data import StepBatch
from mllm_kit.training.evaluate import GenerationAccuracy, PromptBatch, generate_answers
from mllm_kit.training.optim import build_optimizer, build_scheduler
from mllm_kit.training.strategies import full_parameters
from mllm_kit.training.teacher import Teacher

def score(model: MLLM, objective: Objective, batch: Batch, normalizer: float | None,
          teacher: MLLM | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Run the objective's passes on ``model`` (and the frozen ``teacher`` on each pass's teacher view, without
    gradients; its activations are freed after the objective read them) → ``(loss parts, aux losses averaged over
    passes, metrics of the last pass)``."""
    passes = objective.passes(batch, model)
    results, aux, metrics = [], {}, {}
    for p in passes:
        outputs = model(p.batch, connector_options=p.connector)
        teacher_outputs = None
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = teacher(p.batch.teacher_view())
        results.append(objective(outputs, p.batch, normalizer, teacher_outputs))
        del teacher_outputs
        for name, value in outputs.aux_losses.items():
            aux[name] = aux.get(name, 0.0) + value / len(passes)
        metrics = outputs.metrics
    return objective.reduce(results, passes), aux, metrics


class MLLMModule(L.LightningModule):
    """Trains (and validates) an :class:`MLLM` for one stage."""

    def __init__(self, model: MLLM, stage: Stage, objective: Objective, total_steps: int = 1, eval_spec: EvalSpec | None = None,
                 tasks: list[str] | None = None, stop_token_ids: list[int] | None = None, teacher: Teacher | None = None) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.objective = objective
        # Not a submodule: never optimised, checkpointed or wrapped by DDP (training/teacher.py).
        self.teacher = teacher
        self.objective_modules = nn.ModuleDict(objective.trainable_modules())
        # Held-out loss is the LM loss of the data whatever the stage distils (validation runs no teacher).
        self.val_objective = LMObjective() if objective.needs_teacher else objective
        self.total_steps = total_steps
        self.eval_spec = eval_spec or EvalSpec()
        self.stop_token_ids = stop_token_ids
        self.accuracy = GenerationAccuracy(tasks or ["all"])
        self._normalizer_step = -1
        self._normalizer = 1.0

    def forward(self, batch: Batch):
        return self.model(batch)

    def _step_normalizer(self, step_loss_tokens: int) -> float:
        # One collective per optimiser step: every micro-batch of the step carries the same local count.
        if self._normalizer_step != self.global_step:
            local = torch.tensor(float(step_loss_tokens), device=self.device)
            total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
            self._normalizer = max(float(total), 1.0) / (self.trainer.accumulate_grad_batches * self.trainer.world_size)
            self._normalizer_step = self.global_step
        return self._normalizer

    def training_step(self, step: StepBatch, batch_idx: int) -> torch.Tensor:
        batch = step.batch
        parts, aux_losses, metrics = score(self.model, self.objective, batch, self._step_normalizer(step.step_loss_tokens),
                                           self.teacher.model if self.teacher is not None else None)
        loss = parts.pop("loss")
        for name, value in aux_losses.items():
            coef = self.stage.aux_loss_coef.get(name, 0.0)
            if coef:
                loss = loss + coef * value
            parts[name] = value.detach()
        self.log_dict({f"train/{k}": v for k, v in {**parts, **metrics}.items()}, on_step=True, batch_size=len(batch))
        self.log("loss", parts.get("lm_loss", loss.detach()), on_step=True, prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    # -- held-out data: loss (dataloader 0) and generation accuracy (dataloader 1) ----------------
    def validation_step(self, batch: Batch | PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, PromptBatch):
            with full_parameters(self.model):
                predictions = generate_answers(self.model, batch.batch, self.eval_spec.max_new_tokens, self.stop_token_ids)
            self.accuracy.update(predictions, batch.targets, batch.tasks)
            return
        parts, _, _ = score(self.model, self.val_objective, batch, None)
        tokens = int(batch.num_loss_tokens or 1)  # token-weighted mean over the held-out set
        self.log("val/loss", parts["lm_loss"], on_epoch=True, batch_size=tokens, add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.accuracy.update_called:
            return
        result = self.accuracy.compute()
        self.log_dict({f"val/{k}": v for k, v in result.items()}, add_dataloader_idx=False)
        self.accuracy.reset()

    def configure_model(self) -> None:
        # Sharded strategies (training/strategies.py) split the model here, before the optimiser is built.
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model)

    # -- the teacher: on the stage's device, recorded in every checkpoint ----------------------------
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mllm_kit_teacher"] = self.teacher.describe() if self.teacher is not None else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("mllm_kit_teacher")
        current = self.teacher.describe() if self.teacher is not None else None
        if recorded != current:
            raise ConfigError(f"stage {self.stage.name!r}: the checkpoint was trained with teacher {recorded}, but the recipe now "
                              f"gives {current}; resume with the same teacher, or start the stage again in a new run directory.")

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.stage.optim, self.objective_modules)
        scheduler = build_scheduler(optimizer, self.stage.optim, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
