"""Recipe files → a resolved :class:`Recipe`, checked once (DESIGN.md, "Recipes").

Order: the file and its ``base:`` chain are merged with OmegaConf (mappings merge, lists and values replace,
``stages`` merge by name); ``key=value`` overrides apply (a stage is addressed by name or index); model presets
expand into full specs; ``${...}`` interpolations resolve over the whole tree (so ``${model.llm.family}`` sees the
preset's fields, and ``${tiny_tokenizer:}`` is the offline tokenizer's directory); the tree is validated against
the schema; each stage's overrides merge over the recipe-level defaults; and every registry name — components
(nested ones too), transforms, objectives, templates — is checked. A misspelling anywhere, in any stage, fails here
in seconds with the key path and the closest valid names, before anything trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mllm_kit.config.presets import preset_path, read_yaml
from mllm_kit.config.recipe import (
    FSDP_PRECISIONS, LIGHTNING_STRATEGIES, SHARDED_STRATEGIES, DataSpec, EvalSpec, ModelSpec, OptimSpec, Recipe, RecipeSpec, Stage,
    TeacherSpec, TrainerSpec,
)
from mllm_kit.config.resolve import check_template, expand, resolve_component, resolve_efficiency, resolve_named
from mllm_kit.config.runs import check_run_ref, model_from_init_run
from mllm_kit.config.validate import to_dict, validate
from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.registry import OBJECTIVES, TRANSFORMS

MODEL_GROUPS = {"encoder": "encoders", "connector": "connectors", "llm": "llms"}


def _tiny_tokenizer() -> str:
    from mllm_kit.tiny import tiny_tokenizer

    return str(tiny_tokenizer())


OmegaConf.register_resolver("tiny_tokenizer", _tiny_tokenizer, replace=True)


def find_recipe(path_or_name: str) -> Path:
    """A recipe file path, or the name of one in the zoo (``quickstart`` → the packaged ``quickstart.yaml``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        raise ConfigError(f"recipe file {path_or_name!r} does not exist.")
    return preset_path("recipes", path.stem)


def read_recipe(path_or_name: str, seen: tuple[str, ...] = ()) -> tuple[Path, DictConfig]:
    """The recipe tree with its ``base:`` chain merged in (interpolations unresolved)."""
    path = find_recipe(path_or_name)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return path, OmegaConf.create(raw)
    if str(base) in seen:
        raise ConfigError(f"{path}: base recipes form a cycle: {' → '.join((*seen, str(base)))}.")
    _, parent = read_recipe(str(base), (*seen, str(base)))
    stages = _merge_stages(parent.pop("stages", None) or [], raw.pop("stages", None) or [], path)
    try:
        merged = OmegaConf.merge(parent, raw)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot merge over base {base!r}: {err}") from None
    merged.stages = stages
    return path, merged


def _merge_stages(base: Any, override: list[Any], path: Path) -> list[Any]:
    """A derived recipe changes its base's stages by name and appends new ones."""
    merged = list(base)
    names = [s.get("name") if isinstance(s, (dict, DictConfig)) else None for s in merged]
    for i, stage in enumerate(override):
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"{path}: stages[{i}] needs a name: a recipe with a base changes the base's stages by name "
                              f"(base stages: {[n for n in names if n]}) or appends new ones.")
        if stage["name"] in names:
            k = names.index(stage["name"])
            merged[k] = OmegaConf.merge(merged[k], stage)
        else:
            merged.append(OmegaConf.create(stage))
            names.append(stage["name"])
    return merged


def load_recipe(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override, expand presets, interpolate, validate and check (see the module docstring)."""
    path, tree = read_recipe(path_or_name, (Path(path_or_name).stem,))
    _expand_model(tree, path)
    for override in overrides:
        apply_override(tree, override)
    _expand_model(tree, path)  # an override may name another preset
    try:
        data = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve interpolation: {err}") from None
    recipe = recipe_from_dict(data)
    recipe.source = str(path)
    return recipe


def _expand_model(tree: DictConfig, path: Path) -> None:
    """Expand the presets of the recipe's ``model`` and of every stage's ``model`` and ``teacher.model``."""
    _expand_specs(tree.get("model"), "model")
    for i, stage in enumerate(tree.get("stages") or []):
        if isinstance(stage, DictConfig):
            _expand_specs(stage.get("model"), f"stages[{i}].model")
            teacher = stage.get("teacher")
            if isinstance(teacher, DictConfig):
                _expand_specs(teacher.get("model"), f"stages[{i}].teacher.model")


def _expand_specs(model: Any, where: str) -> None:
    if not isinstance(model, DictConfig):
        return
    for key, group in MODEL_GROUPS.items():
        spec = model.get(key)
        if spec is None:
            continue
        raw = OmegaConf.to_container(spec, resolve=False) if isinstance(spec, DictConfig) else spec
        if isinstance(raw, str) and raw.startswith("${"):
            continue  # an interpolation: resolved with the whole tree
        model[key] = expand(group, raw, f"{where}.{key}")


def recipe_from_dict(data: dict[str, Any], check_runs: bool = True) -> Recipe:
    """A :class:`Recipe` from a plain mapping (a recipe file's content, or a saved resolved recipe).

    ``check_runs``: check the run directories that stages' ``init_from`` name (a saved run's recipe is read without:
    it records ``RUN:STAGE`` as checked when that run started). A recipe that names no LLM and whose first stage starts
    from a run directory takes the model of that run's recipe (the parts it does name override that run's)."""
    data = model_from_init_run(data) if check_runs else data
    return resolve(validate(data, RecipeSpec, ""), check_runs)


def resolve(spec: RecipeSpec, check_runs: bool = True) -> Recipe:
    if not spec.stages:
        raise ConfigError("stages: a recipe needs at least one stage.")
    names = [s.name for s in spec.stages]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"stages: stage names must be unique; repeated: {sorted(dupes)}.")
    model = spec.model
    if model.llm is None:
        raise ConfigError("model.llm: the recipe names no LLM; set a preset (e.g. vicuna_7b_v15) or a spec.")
    for key, group in MODEL_GROUPS.items():
        setattr(model, key, resolve_component(group, getattr(model, key), f"model.{key}"))
    model.efficiency = resolve_efficiency(model.efficiency, "model.efficiency")
    stages = [_resolve_stage(spec, i, check_runs) for i in range(len(spec.stages))]
    _check_benches(spec.eval, stages)
    return Recipe(spec.name, spec.description, spec.citation, model, stages, spec.eval, spec.smoke)


def _check_benches(spec: EvalSpec, stages: list[Stage]) -> None:
    """Recipe-load check of ``eval.benches`` and what goes with it (the files are read when the stage starts)."""
    from mllm_kit.registry import BENCHES

    names = [s.name for s in stages]
    for name, path in spec.benches.items():
        if name not in BENCHES:
            raise ConfigError(f"eval.benches.{name}: unknown bench.{did_you_mean(name, BENCHES.names())} "
                              f"Benches: {', '.join(BENCHES.names())}.")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"eval.benches.{name}: give the bench file's path (or synthetic:eval), got {path!r}.")
    for stage in spec.stages or []:
        if stage not in names:
            raise ConfigError(f"eval.stages: no stage {stage!r}.{did_you_mean(stage, names)} Stages: {', '.join(names)}.")
    if (spec.stages or spec.every_n_steps or spec.keep_best) and not spec.benches:
        raise ConfigError("eval.stages / every_n_steps / keep_best apply to eval.benches, which names none; add benches "
                          "(e.g. eval.benches: {vqav2: data/vqav2_val.jsonl}) or remove them.")
    if spec.every_n_steps is not None and spec.every_n_steps < 1:
        raise ConfigError(f"eval.every_n_steps: must be ≥ 1 (or null: at the end of the stage only), got {spec.every_n_steps}.")
    if spec.keep_best is not None:
        bench, sep, metric = spec.keep_best.partition("/")
        if not sep or bench not in spec.benches or not metric:
            raise ConfigError(f"eval.keep_best: {spec.keep_best!r} must be '<bench>/<metric>' with a bench of eval.benches "
                              f"({', '.join(spec.benches)}), e.g. '{next(iter(spec.benches))}/accuracy'.")
        sharded = [s.name for s in stages if (s.name in (spec.stages or names[-1:])) and s.trainer.strategy in SHARDED_STRATEGIES]
        if sharded:
            raise ConfigError(f"eval.keep_best: stage(s) {sharded} train under a sharded strategy, whose weights are gathered "
                              f"only at the end of the stage; keep the best step with ddp or deepspeed_stage_1/2.")


def _over_model(base: ModelSpec, specs: dict[str, Any], where: str) -> ModelSpec:
    """``base`` with the components named in ``specs`` (a partial model) resolved in their place."""
    unknown = [k for k in specs if k not in MODEL_GROUPS]
    if unknown:
        hint = " A stage's efficiency method is its own top-level `efficiency` key." if "efficiency" in unknown else ""
        raise ConfigError(f"{where}.{unknown[0]}: unknown key.{did_you_mean(str(unknown[0]), MODEL_GROUPS)} Valid keys: "
                          f"{', '.join(MODEL_GROUPS)}.{hint}")
    parts = {k: resolve_component(g, specs[k], f"{where}.{k}") if specs.get(k) is not None else getattr(base, k)
             for k, g in MODEL_GROUPS.items()}
    return ModelSpec(**parts, efficiency=base.efficiency)


def _check_earlier(spec: RecipeSpec, index: int, name: str, where: str, hint: str = "") -> None:
    earlier = [t.name for t in spec.stages[:index]]
    if name not in earlier:
        raise ConfigError(f"{where}: {name!r} is not an earlier stage of this recipe.{did_you_mean(name, earlier)} "
                          f"Earlier stages: {', '.join(earlier) or '(none)'}{hint}.")


def _resolve_start(spec: RecipeSpec, index: int, check_runs: bool = True) -> tuple[ModelSpec | None, str | None]:
    """A stage's fresh model (its ``model`` over the recipe's; a ``pre_align`` member with its own projector) or what it
    continues from: an earlier stage, or a finished stage of another run directory (``RUN:STAGE``)."""
    s, where = spec.stages[index], f"stages[{index}]"
    init_from = s.init_from
    if s.model is not None and init_from is not None:
        raise ConfigError(f"{where}: names both model (a fresh start) and init_from={init_from!r}; keep one.")
    earlier = [t.name for t in spec.stages[:index]]
    if init_from is not None and init_from not in earlier and check_runs:
        if init_from in [t.name for t in spec.stages]:
            _check_earlier(spec, index, init_from, f"{where}.init_from")
        init_from = check_run_ref(init_from, f"{where}.init_from", earlier)
    members = _mixture_members(spec)
    for name, source in s.init_members.items():
        _check_member(members, name, f"{where}.init_members.{name}")
        _check_earlier(spec, index, source, f"{where}.init_members.{name}")
        source_spec = spec.stages[[t.name for t in spec.stages].index(source)]
        if source_spec.pre_align != name:
            raise ConfigError(f"{where}.init_members.{name}: stage {source!r} does not pre-align member {name!r} "
                              f"(its pre_align is {source_spec.pre_align!r}).")
    if s.pre_align is not None:
        if s.init_from is not None:
            raise ConfigError(f"{where}: a pre_align stage builds its own model (member + projector); remove init_from.")
        _check_member(members, s.pre_align, f"{where}.pre_align")
        over = {"connector": "mlp2x_gelu", **(s.model or {}), "encoder": members[s.pre_align]}
        return _over_model(spec.model, over, f"{where}.model"), None
    return (_over_model(spec.model, s.model, f"{where}.model") if s.model is not None else None), init_from


def _mixture_members(spec: RecipeSpec) -> dict[str, Any]:
    encoder = spec.model.encoder
    return dict(encoder.get("members") or {}) if isinstance(encoder, dict) and encoder.get("name") == "mixture" else {}


def _check_member(members: dict[str, Any], name: str, where: str) -> None:
    if not members:
        raise ConfigError(f"{where}: names encoder member {name!r}, but the recipe's model.encoder is not a mixture.")
    if name not in members:
        raise ConfigError(f"{where}: the encoder mixture has no member {name!r}.{did_you_mean(name, list(members))} "
                          f"Members: {', '.join(members)}.")


def _resolve_teacher(spec: RecipeSpec, index: int) -> TeacherSpec | None:
    t, where = spec.stages[index].teacher, f"stages[{index}].teacher"
    if t is None:
        return None
    forms = [k for k in ("run", "hf_llava", "model") if getattr(t, k) is not None]
    if len(forms) > 1 or (not forms and t.stage is None):
        raise ConfigError(f"{where}: give exactly one teacher: run (+ stage), stage (an earlier stage of this recipe), hf_llava "
                          f"or model (+ weights); got {forms or 'none'}.")
    if t.run is not None and t.stage is None:
        raise ConfigError(f"{where}.stage: a teacher run needs the stage whose final weights teach (e.g. stage: sft).")
    if forms and forms[0] != "run" and t.stage is not None:
        raise ConfigError(f"{where}.stage: applies to a run (or to this recipe) only, not to a {forms[0]} teacher.")
    if t.weights is not None and t.model is None:
        raise ConfigError(f"{where}.weights: belongs to a model teacher (teacher.model); {forms[0] if forms else 'stage'} teachers carry their own.")
    if t.form == "stage":
        _check_earlier(spec, index, t.stage, f"{where}.stage", " (a teacher from another run needs teacher.run)")
    if t.template is not None:
        check_template(t.template, f"{where}.template")
    model = None if t.model is None else to_dict(_over_model(spec.model, t.model, f"{where}.model"))
    return dataclasses.replace(t, model=model)


def _resolve_stage(spec: RecipeSpec, index: int, check_runs: bool = True) -> Stage:
    s, where = spec.stages[index], f"stages[{index}]"
    if not s.trainable:
        raise ConfigError(f"{where}.trainable: stage {s.name!r} trains nothing; list module paths such as [connector] or [connector, llm].")
    data = _merge(spec.data, s.data, DataSpec, f"{where}.data")
    optim = _merge(spec.optim, s.optim, OptimSpec, f"{where}.optim")
    trainer = _merge(spec.trainer, s.trainer, TrainerSpec, f"{where}.trainer")
    _check_optim(optim, f"{where}.optim")
    check_template(data.template, f"{where}.data.template")
    transforms = [resolve_named(TRANSFORMS, t, f"{where}.transforms[{k}]") for k, t in enumerate(s.transforms)]
    objective = resolve_named(OBJECTIVES, s.objective, f"{where}.objective")
    model, init_from = _resolve_start(spec, index, check_runs)
    teacher = _resolve_teacher(spec, index)
    _check_packing(data, objective, teacher, f"{where}.data")
    _check_sources(data, f"{where}.data")
    _check_trainer(trainer, teacher, f"{where}.trainer")
    efficiency = spec.model.efficiency if s.efficiency is None else resolve_efficiency(s.efficiency, f"{where}.efficiency")
    return Stage(s.name, s.trainable, transforms, objective, s.aux_loss_coef, data, optim, trainer, model, init_from, teacher,
                 s.pre_align, dict(s.init_members), efficiency)


def _merge(base: Any, override: dict[str, Any], schema: type, path: str) -> Any:
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(to_dict(base), override))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from None
    return validate(merged, schema, path)


def _check_sources(data: DataSpec, path: str) -> None:
    if data.sources is None:
        return
    if data.train is not None:
        raise ConfigError(f"{path}: gives both train and sources; sources replaces train (a weighted mixture of trains): "
                          f"set {path}.train: null where sources is set.")
    if not data.sources:
        raise ConfigError(f"{path}.sources: an empty list; list sources as {{train: PATH, weight: W}}, or set {path}.train.")
    for k, source in enumerate(data.sources):
        if not source.train:
            raise ConfigError(f"{path}.sources[{k}].train: no data given; set a LLaVA JSON/JSONL path, shards or synthetic:sft.")
        if not source.weight > 0:
            raise ConfigError(f"{path}.sources[{k}].weight: must be positive, got {source.weight}.")


def _check_packing(data: DataSpec, objective: dict[str, Any], teacher: TeacherSpec | None, path: str) -> None:
    """Packing and per-sample loss weights are implemented for the LM objective on the model's own view."""
    if data.packing_max_images is not None and data.packing_max_images < 1:
        raise ConfigError(f"{path}.packing_max_images: must be ≥ 1 (or null for no cap), got {data.packing_max_images}.")
    if data.packing_buffer < 1:
        raise ConfigError(f"{path}.packing_buffer: must be ≥ 1 sample, got {data.packing_buffer}.")
    for key, used in (("packing", data.packing), ("loss_weighting", data.loss_weighting != "token")):
        if used and (objective.get("name") != "lm" or teacher is not None):
            what = "a teacher" if teacher is not None else f"objective {objective.get('name')!r}"
            raise ConfigError(f"{path}.{key}: is supported with objective lm and no teacher; this stage has {what}. "
                              f"Set {path}.{key}: {'false' if key == 'packing' else 'token'}.")


def _check_trainer(trainer: TrainerSpec, teacher: TeacherSpec | None, path: str) -> None:
    """Recipe-load check of ``trainer.strategy`` and the options that go with it."""
    known = (*LIGHTNING_STRATEGIES, *SHARDED_STRATEGIES)
    if trainer.strategy not in known:
        raise ConfigError(f"{path}.strategy: unknown strategy {trainer.strategy!r}; choose one of {', '.join(known)}.")
    if teacher is not None and trainer.strategy in ("fsdp", "deepspeed_stage_3"):
        # The teacher is replicated on every rank; beside sharded parameters that path has not been tested yet.
        raise ConfigError(f"{path}.strategy: a stage with a teacher runs under ddp or deepspeed_stage_1/2, not "
                          f"{trainer.strategy!r} yet. Set {path}.strategy: deepspeed_stage_2.")
    if trainer.strategy == "fsdp" and trainer.precision not in FSDP_PRECISIONS:
        raise ConfigError(f"{path}.precision: {trainer.precision!r} is not supported with strategy fsdp; choose one of "
                          f"{', '.join(FSDP_PRECISIONS)} (FSDP2 keeps fp32 gradient reduction under bf16).")
    if trainer.offload_optimizer and not trainer.strategy.startswith("deepspeed"):
        raise ConfigError(f"{path}.offload_optimizer: needs a DeepSpeed strategy (deepspeed_stage_1/2/3), "
                          f"not {trainer.strategy!r}.")
    if trainer.offload_parameters and trainer.strategy not in ("fsdp", "deepspeed_stage_3"):
        raise ConfigError(f"{path}.offload_parameters: needs strategy fsdp or deepspeed_stage_3, not {trainer.strategy!r}.")


def _check_optim(optim: OptimSpec, path: str) -> None:
    for key in ("global_batch_size", "micro_batch_size"):
        if getattr(optim, key) <= 0:
            raise ConfigError(f"{path}.{key}: must be positive, got {getattr(optim, key)}.")
    optim.accumulation(1, path)  # the device count is checked again before training, when it is known
    if not 0 <= optim.warmup_ratio < 1:
        raise ConfigError(f"{path}.warmup_ratio: must be in [0, 1), got {optim.warmup_ratio}.")
    if optim.lr <= 0:
        raise ConfigError(f"{path}.lr: must be positive, got {optim.lr}.")
    if optim.min_lr_ratio and optim.schedule != "cosine":
        raise ConfigError(f"{path}.min_lr_ratio: applies to the cosine schedule only (schedule is {optim.schedule!r}).")


# -- command-line overrides ---------------------------------------------------------------------------
def apply_override(tree: DictConfig, override: str) -> None:
    """Apply ``a.b.c=value`` (the value parsed as YAML by OmegaConf). A ``stages`` element may be addressed by name or index."""
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.path=value.")
    try:
        value = OmegaConf.from_dotlist([f"value={value_text}"])["value"]
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {override!r}: cannot parse the value: {err}") from None
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        stages = tree.get("stages") or []
        parts[1] = str(_stage_index(stages, parts[1], ".".join(parts[:2])))
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        child = node[int(part)] if isinstance(node, list) or OmegaConf.is_list(node) else node.get(part)
        if child is None:
            node[part] = {}
            child = node[part]
        elif not (OmegaConf.is_dict(child) or OmegaConf.is_list(child)):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping.")
        node = child
    last = parts[-1]
    if OmegaConf.is_list(node):
        node[int(last)] = value
    else:
        node[last] = value


def _stage_index(stages: Any, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(stages) <= index < len(stages):
            raise ConfigError(f"override {where}: index {index} out of range ({len(stages)} stages).")
        return index % len(stages)
    names = [s.get("name") for s in stages]
    if part not in names:
        raise ConfigError(f"override {where}: no stage named {part!r}.{did_you_mean(part, [n for n in names if n])} "
                          f"Stages: {', '.join(map(str, names))}.")
    return names.index(part)
