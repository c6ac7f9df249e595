"""The run directory's record of its stages (``state.json``): the only stage hand-off record.

Run directory::

    recipe.yaml               the fully resolved recipe
    state.json                per stage: status and where its final weights are
    data/                     generated synthetic data
    <stage>/checkpoints/      Lightning checkpoints (full state), written atomically; last.ckpt resumes
    <stage>/logs/             metrics.csv and TensorBoard events
    <stage>/final/            the stage's weights: encoder/, llm/ (HF dirs), connector.safetensors, mllm.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mllm_kit.config.load import recipe_from_dict
from mllm_kit.config.recipe import Recipe, Stage
from mllm_kit.errors import ConfigError
from mllm_kit.files import atomic_write_json, atomic_write_text

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
        file = Path(run_dir) / STATE_FILE
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


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    atomic_write_text(Path(run_dir) / RECIPE_FILE, OmegaConf.to_yaml(OmegaConf.create(recipe.to_dict()), sort_keys=False))


def read_run(run_dir: str | Path) -> tuple[Recipe, RunState]:
    """The resolved recipe and stage record of a run directory, or a clear error when ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a run directory"
        raise ConfigError(f"{run_dir} {what}: a run directory (made by `mllm-kit fit`) holds {RECIPE_FILE} (the resolved recipe), "
                          f"{STATE_FILE} (which stages finished) and one folder per stage with its final/ weights.")
    # The run directories its stages' init_from name were checked when this run started; they may be gone by now.
    return recipe_from_dict(OmegaConf.to_container(OmegaConf.load(recipe_file)), check_runs=False), RunState.load(run_dir)


def finished_stage(recipe: Recipe, state: RunState, stage: str | None = None) -> Stage:
    """The stage named ``stage`` (default: the last finished one), with a clear error unless it has finished."""
    run_dir = state.path.parent
    done = [s for s in recipe.stages if state.done(s.name)]
    if not done:
        raise ConfigError(f"{run_dir}: no stage has finished yet; nothing to load.")
    chosen = recipe.stage(stage) if stage else done[-1]
    if not state.done(chosen.name):
        raise ConfigError(f"{run_dir}: stage {chosen.name!r} has not finished; finished: {[s.name for s in done]}.")
    return chosen
