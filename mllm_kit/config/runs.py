"""Run directories named in a recipe: ``init_from: RUN`` (its last finished stage) or ``init_from: RUN:STAGE``.

Checked when the recipe loads: the directory is a run directory (``state.json``, written by ``mllm-kit fit`` or
``mllm-kit import``), the stage has finished and its ``final/`` weights exist. The reference is then written as
``RUN:STAGE``, so the run's own ``recipe.yaml`` records which stage it started from. This module reads the files
itself (config imports nothing of training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mllm_kit.errors import ConfigError

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.yaml"
MODEL_FILE = "mllm.json"


def split_run_ref(text: str) -> tuple[str, str | None]:
    """``(run directory, stage or None)`` of ``RUN`` or ``RUN:STAGE`` (a directory whose name holds ``:`` is a run)."""
    if (Path(text) / STATE_FILE).is_file():
        return text, None
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return text, None


def _stages(run: str) -> dict[str, dict[str, Any]]:
    return json.loads((Path(run) / STATE_FILE).read_text()).get("stages", {})


def _order(run: str, names: list[str]) -> list[str]:
    """``names`` in the order of the run's recipe (state.json does not keep it)."""
    try:
        order = [s.get("name") for s in OmegaConf.to_container(OmegaConf.load(Path(run) / RECIPE_FILE)).get("stages", [])]
    except Exception:  # no or unreadable recipe.yaml: keep state.json's order
        order = []
    return [n for n in order if n in names] + [n for n in names if n not in order]


def check_run_ref(text: str, where: str, earlier: list[str]) -> str:
    """``RUN:STAGE`` for ``init_from: text`` naming a finished stage of a run directory, else a ConfigError that says
    what is wrong (``earlier``: the earlier stages of this recipe, for the message)."""
    run, stage = split_run_ref(text)
    if not (Path(run) / STATE_FILE).is_file():
        what = "does not exist" if not Path(run).exists() else f"has no {STATE_FILE}"
        raise ConfigError(
            f"{where}: {text!r} is neither an earlier stage of this recipe (earlier stages: {', '.join(earlier) or 'none'}) "
            f"nor a run directory ({run!r} {what}). Name an earlier stage, or a run made by `mllm-kit fit` or "
            f"`mllm-kit import` as init_from: RUN (its last finished stage) or RUN:STAGE.")
    stages = _stages(run)
    done = _order(run, [n for n, s in stages.items() if s.get("status") == "done"])
    if stage is None:
        if not done:
            listed = ", ".join(f"{name} ({info.get('status')})" for name, info in stages.items()) or "none"
            raise ConfigError(f"{where}: run {run!r} has no finished stage to start from; finish one first (stages: {listed}).")
        stage = done[-1]
    elif stage not in done:
        status = stages.get(stage, {}).get("status", "not run")
        raise ConfigError(f"{where}: stage {stage!r} of run {run!r} has not finished ({status}); finished stages: "
                          f"{', '.join(done) or 'none'}.")
    final = Path(run) / stages[stage].get("final", "")
    if not (final / MODEL_FILE).is_file():
        raise ConfigError(f"{where}: stage {stage!r} of run {run!r} is marked done but its final weights are missing "
                          f"({final / MODEL_FILE} does not exist).")
    return f"{run}:{stage}"


def run_model(ref: str) -> dict[str, Any] | None:
    """The ``model`` section of the recipe of the run that ``ref`` (``RUN`` or ``RUN:STAGE``) names, if readable."""
    run, _ = split_run_ref(ref)
    file = Path(run) / RECIPE_FILE
    if not file.is_file():
        return None
    model = OmegaConf.to_container(OmegaConf.load(file)).get("model")
    return model if isinstance(model, dict) else None


def model_from_init_run(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe (as a mapping) that names no LLM and whose first stage starts from a run directory, with the model of
    that run's recipe (the parts the recipe names override the run's); any other recipe unchanged."""
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    first = stages[0] if stages and isinstance(stages[0], dict) else {}
    init = first.get("init_from")
    if model.get("llm") is not None or not isinstance(init, str) or first.get("model") is not None:
        return data
    saved = run_model(init)
    if saved is None:
        return data  # init_from is checked (and explained) when the stages resolve
    return {**data, "model": {**saved, **model}}
