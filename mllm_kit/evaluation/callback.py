"""In-training benchmark evaluation (recipe ``eval.benches``): every ``eval.every_n_steps`` optimiser steps and at the
end of the stage, score the model on the benches, log ``bench/<name>/<metric>``, and with ``eval.keep_best`` keep the
weights of the best step so far in ``<stage>/best/`` (recorded in ``state.json``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L

from mllm_kit.config.recipe import DataSpec
from mllm_kit.errors import ConfigError
from mllm_kit.evaluation.benches import Bench
from mllm_kit.evaluation.formats import Item, take
from mllm_kit.evaluation.runner import BenchResult, run_bench
from mllm_kit.inference import GenerationConfig, Generator
from mllm_kit.log import get_logger

log = get_logger(__name__)


class BenchEvaluation(L.Callback):
    """``benches``: name → (bench, items), read and checked before training. ``keep_best``: ``"<bench>/<metric>"``;
    ``mode``: ``max`` or ``min``; ``on_best(step, value)`` records a new best (the runner marks it in ``state.json``).
    ``best``: the best value recorded before a resume."""

    def __init__(self, benches: Mapping[str, tuple[Bench, list[Item]]], data: DataSpec, every_n_steps: int | None,
                 batch_size: int = 8, max_new_tokens: int | None = None, keep_best: str | None = None, mode: str = "max",
                 best_dir: Path | None = None, best: float | None = None,
                 on_best: Callable[[int, float], None] | None = None) -> None:
        self.benches = dict(benches)
        self.data = data
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.keep_best, self.mode, self.best_dir, self.best, self.on_best = keep_best, mode, best_dir, best, on_best
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # advances once per optimiser step, after the last micro-batch of it
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[BenchResult]:
        from mllm_kit.training.strategies import full_parameters

        self._last_step = step = trainer.global_step
        model = pl_module.model
        was_training = model.training
        generator = Generator(model, self.data)  # eval mode: no dropout, no MoE jitter
        results = []
        try:
            with full_parameters(model):
                for name, (bench, items) in self.benches.items():
                    config = GenerationConfig(max_new_tokens=self.max_new_tokens or bench.max_new_tokens)
                    results.append(run_bench(generator, name, bench, items, config, self.batch_size, show_progress=False))
        finally:
            model.train(was_training)
        metrics = {f"bench/{r.name}/{k}": v for r in results for k, v in r.metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.keep_best is not None:
            if f"bench/{self.keep_best}" not in metrics:
                bench = self.keep_best.partition("/")[0]
                raise ConfigError(f"eval.keep_best: bench {bench!r} reports no {self.keep_best!r}; it reports "
                                  f"{sorted(k.removeprefix('bench/') for k in metrics if k.startswith(f'bench/{bench}/'))}.")
            self._keep(trainer, model, step, metrics[f"bench/{self.keep_best}"])
        return results

    def _keep(self, trainer: L.Trainer, model: Any, step: int, value: float) -> None:
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if not better:
            return
        self.best = value
        if trainer.is_global_zero and self.best_dir is not None:
            model.save_pretrained(self.best_dir)  # atomic: the previous best stays whole until this one is complete
            if self.on_best is not None:
                self.on_best(step, value)
            log.info("step %d: new best %s = %.4f, weights in %s", step, self.keep_best, value, self.best_dir)


def bench_stage_names(recipe: Any) -> list[str]:
    """The stages ``eval.benches`` score during training: ``eval.stages``, or the last stage."""
    if not recipe.eval.benches:
        return []
    return list(recipe.eval.stages or [recipe.stages[-1].name])


def read_benches(recipe: Any, stage: Any, data_root: Path | None) -> dict[str, tuple[Bench, list[Item]]]:
    """Every ``eval.benches`` file of ``recipe`` read and checked for ``stage``; ``data_root=None`` (pre-flight, before a
    run directory exists) skips the ``synthetic:`` ones, which are generated."""
    from mllm_kit.evaluation.benches import get_bench
    from mllm_kit.training.data import SYNTHETIC, resolve_path

    out = {}
    for name, source in recipe.eval.benches.items():
        if data_root is None and source.startswith(SYNTHETIC):
            continue
        bench = get_bench(name)
        path, root = resolve_path(stage.data, source, None, data_root or Path("."))
        out[name] = (bench, take(bench.read(path, root), recipe.eval.bench_limit))
    return out


def bench_callback(recipe: Any, stage: Any, stage_dir: Path, state: Any, data_root: Path) -> BenchEvaluation | None:
    """The stage's :class:`BenchEvaluation`, or ``None`` when the recipe scores no benches during it."""
    if stage.name not in bench_stage_names(recipe):
        return None
    spec = recipe.eval
    best = state.stages.get(stage.name, {}).get("best", {}).get("value")

    def on_best(step: int, value: float) -> None:
        state.mark(stage.name, best={"metric": spec.keep_best, "value": value, "step": step, "dir": f"{stage.name}/best"})

    return BenchEvaluation(read_benches(recipe, stage, data_root), stage.data, spec.every_n_steps, spec.batch_size,
                           None, spec.keep_best, spec.keep_best_mode, stage_dir / "best", best, on_best)
