"""The LightningModule: forward, objective, globally normalised loss, optimiser and schedule."""

from __future__ import annotations

import lightning as L
import torch

from mllm_kit.batch import Batch
from mllm_kit.model import MLLM
from mllm_kit.objectives.base import Objective
from mllm_kit.recipe import Stage
from mllm_kit.training.optim import build_optimizer, build_scheduler


class MLLMModule(L.LightningModule):
    """Trains an :class:`MLLM` for one stage.

    The loss of each micro-batch is ``sum(token losses) / N_global`` where ``N_global`` is the number of
    supervised tokens in the whole optimiser step (all accumulation micro-batches, all ranks). Lightning
    divides by the accumulation count and DDP averages over ranks, so the value handed back is rescaled by
    both; the resulting gradient is exactly the token-mean over the global batch.
    """

    def __init__(self, model: MLLM, stage: Stage, objective: Objective, total_steps: int, accumulate: int) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.objective = objective
        self.total_steps = total_steps
        self.accumulate = accumulate
        self._normalizer_step = -1
        self._normalizer = 1.0

    def forward(self, batch: Batch):
        return self.model(batch)

    def _global_tokens(self, batch: Batch) -> float:
        # One collective per optimiser step: every micro-batch of the window carries the same local count.
        if self._normalizer_step != self.global_step:
            local = torch.tensor(float(batch.window_loss_tokens), device=self.device)
            total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
            self._normalizer = max(float(total), 1.0)
            self._normalizer_step = self.global_step
        return self._normalizer

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if batch.window_loss_tokens is not None:
            batch.loss_normalizer = self._global_tokens(batch) / (self.accumulate * self.trainer.world_size)
        parts, aux_losses, metrics = self.objective.compute(self.model, batch)
        loss = parts.pop("loss")
        for name, value in aux_losses.items():
            coef = self.stage.aux_loss_coef.get(name, 0.0)
            if coef:
                loss = loss + coef * value
            parts[name] = value.detach()
        log = {f"train/{k}": v for k, v in {**parts, **metrics}.items()}
        log["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=len(batch))
        self.log("loss", parts.get("lm_loss", loss.detach()), on_step=True, prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.stage.optim)
        scheduler = build_scheduler(optimizer, self.stage.optim, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
