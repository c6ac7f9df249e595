"""Recipes: OmegaConf YAML → a validated, fully resolved tree of dataclasses (DESIGN.md, "Recipes").

A recipe has ``model`` (encoder / connector / llm specs or preset names), recipe-level defaults for
``data``, ``optim`` and ``trainer``, and an ordered ``stages`` list. Each stage may override any
``data``/``optim``/``trainer`` field; overrides are merged and validated when the recipe loads, so a
typo fails before anything trains, with the key path and a suggestion.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mllm_kit.data.synthetic import SynthConfig
from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.presets import preset_path
from mllm_kit.schema import to_dict, validate


@dataclass
class ModelSpec:
    encoder: Any = "clip_vit_l14_336"
    connector: Any = "mlp2x_gelu"
    llm: Any = None


@dataclass
class DataSpec:
    """``train``/``eval``: a LLaVA JSON/JSONL path, or ``synthetic:align|sft|eval``. ``image_mode`` overrides the
    encoder's resize mode for this data (LLaVA-1.5 pads to square only in SFT). ``system_prompt`` replaces the
    template's default system prompt (``""``: none) for samples without one. ``length_group_size``: how many
    global micro-batches are sorted by length together before shuffling (1 = LLaVA's grouping)."""

    train: str | None = None
    eval: str | None = None
    image_root: str | None = None
    template: str = "chatml"
    system_prompt: str | None = None
    image_mode: Literal["resize", "center_crop", "pad"] | None = None
    max_length: int = 2048
    truncation: Literal["trim", "drop"] = "trim"
    group_by_modality: bool = True
    length_group_size: int = 1
    num_workers: int = 0
    synthetic: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class OptimSpec:
    lr: float = 2e-5
    module_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    global_batch_size: int = 128
    micro_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int | None = None


@dataclass
class TrainerSpec:
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    activation_checkpointing: bool = False
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    seed: int = 0
    deterministic: bool = False
    progress: bool = True


@dataclass
class EvalSpec:
    data: str | None = "synthetic:eval"
    max_new_tokens: int = 8
    batch_size: int = 32


@dataclass
class SmokeSpec:
    """What ``--smoke`` uses: tiny models of the same families, synthetic data, a few steps per stage."""

    steps: int = 3
    global_batch_size: int = 4
    micro_batch_size: int = 2
    synthetic: SynthConfig = field(default_factory=lambda: SynthConfig(num_align=32, num_sft=32, num_eval=16))
    # connector options that must change to fit the tiny models (e.g. Matryoshka scales for a 4×4 grid)
    connector: dict[str, Any] = field(default_factory=dict)
    llm_layers: int = 2


@dataclass
class StageSpec:
    name: str
    trainable: list[str]
    transforms: list[Any] = field(default_factory=list)
    objective: Any = "lm"
    aux_loss_coef: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    teacher: Any = None


@dataclass
class RecipeSpec:
    """The file as written (before stage overrides are merged)."""

    name: str
    stages: list[StageSpec]
    description: str = ""
    citation: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    smoke: SmokeSpec = field(default_factory=SmokeSpec)


@dataclass
class Stage:
    """A stage with recipe-level defaults and its own overrides merged."""

    name: str
    trainable: list[str]
    transforms: list[Any]
    objective: Any
    aux_loss_coef: dict[str, float]
    data: DataSpec
    optim: OptimSpec
    trainer: TrainerSpec
    teacher: Any


@dataclass
class Recipe:
    name: str
    description: str
    citation: str
    model: ModelSpec
    stages: list[Stage]
    eval: EvalSpec
    smoke: SmokeSpec
    source: str = ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        names = [s.name for s in self.stages]
        raise ConfigError(f"recipe {self.name!r} has no stage {name!r}.{did_you_mean(name, names)} Stages: {', '.join(names)}.")

    def to_dict(self) -> dict[str, Any]:
        """A recipe file equivalent to this resolved recipe (each stage carries its merged settings)."""
        data = to_dict(self)
        data.pop("source", None)
        return data


# -- loading ----------------------------------------------------------------------------------------
def find_recipe(path_or_name: str) -> Path:
    """A recipe file path, or the name of one in the zoo (``quickstart`` → ``recipes/quickstart.yaml``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        raise ConfigError(f"recipe file {path_or_name!r} does not exist.")
    return preset_path("recipes", path.stem)


def read_recipe(path_or_name: str, seen: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The raw recipe mapping; ``base: other_recipe`` merges this file over another (mappings merge, lists and
    values replace; ``stages`` merge by name: a stage named like one of the base's changes it in place, a new
    name is appended), so a zoo entry that differs from a published recipe in one component stays one line."""
    path = find_recipe(path_or_name)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot parse recipe: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping.")
    base = raw.pop("base", None)
    if base is None:
        return path, raw
    if str(base) in seen:
        raise ConfigError(f"{path}: base recipes form a cycle: {' → '.join((*seen, str(base)))}.")
    _, parent = read_recipe(str(base), (*seen, str(base)))
    stages = _merge_stages(parent.get("stages") or [], raw.pop("stages", None) or [], path)
    return path, {**_deep_merge(parent, raw), "stages": stages}


def _merge_stages(base: list[Any], override: list[Any], path: Path) -> list[Any]:
    merged = list(base)
    names = [s.get("name") if isinstance(s, dict) else None for s in base]
    for i, stage in enumerate(override):
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"{path}: stages[{i}] needs a name: a recipe with a base changes the base's stages by name "
                              f"(base stages: {[n for n in names if n]}) or appends new ones.")
        if stage["name"] in names:
            k = names.index(stage["name"])
            merged[k] = _deep_merge(merged[k], stage)
        else:
            merged.append(stage)
            names.append(stage["name"])
    return merged


def load_recipe(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, apply ``key=value`` overrides, resolve interpolations and validate."""
    path, raw = read_recipe(path_or_name, (Path(path_or_name).stem,))
    for override in overrides:
        apply_override(raw, override)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve interpolation: {err}") from None
    spec = validate(resolved, RecipeSpec, "")
    recipe = resolve(spec)
    recipe.source = str(path)
    return recipe


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return resolve(validate(copy.deepcopy(data), RecipeSpec, ""))


def resolve(spec: RecipeSpec) -> Recipe:
    if not spec.stages:
        raise ConfigError("stages: a recipe needs at least one stage.")
    names = [s.name for s in spec.stages]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"stages: stage names must be unique; repeated: {sorted(dupes)}.")
    stages = []
    for i, s in enumerate(spec.stages):
        where = f"stages[{i}]"
        if not s.trainable:
            raise ConfigError(f"{where}.trainable: stage {s.name!r} trains nothing; list module paths such as [connector] or [connector, llm].")
        data = _merge(spec.data, s.data, DataSpec, f"{where}.data")
        optim = _merge(spec.optim, s.optim, OptimSpec, f"{where}.optim")
        trainer = _merge(spec.trainer, s.trainer, TrainerSpec, f"{where}.trainer")
        _check_optim(optim, f"{where}.optim")
        stages.append(Stage(s.name, s.trainable, s.transforms, s.objective, s.aux_loss_coef, data, optim, trainer, s.teacher))
    return Recipe(spec.name, spec.description, spec.citation, spec.model, stages, spec.eval, spec.smoke)


def _merge(base: Any, override: dict[str, Any], schema: type, path: str) -> Any:
    merged = _deep_merge(to_dict(base), override)
    return validate(merged, schema, path)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "module_lr" else v
    return out


def _check_optim(optim: OptimSpec, path: str) -> None:
    for key in ("global_batch_size", "micro_batch_size"):
        if getattr(optim, key) <= 0:
            raise ConfigError(f"{path}.{key}: must be positive, got {getattr(optim, key)}.")
    if not 0 <= optim.warmup_ratio < 1:
        raise ConfigError(f"{path}.warmup_ratio: must be in [0, 1), got {optim.warmup_ratio}.")
    if optim.lr <= 0:
        raise ConfigError(f"{path}.lr: must be positive, got {optim.lr}.")


def accumulation_steps(optim: OptimSpec, world_size: int, path: str = "optim") -> int:
    """global batch = micro batch × devices × nodes × accumulation; anything else is an error."""
    per_step = optim.micro_batch_size * world_size
    if optim.global_batch_size % per_step:
        raise ConfigError(
            f"{path}.global_batch_size={optim.global_batch_size} is not divisible by micro_batch_size × world size = "
            f"{optim.micro_batch_size} × {world_size} = {per_step}; change one of them."
        )
    return optim.global_batch_size // per_step


# -- command-line overrides ---------------------------------------------------------------------------
def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (YAML value). A ``stages`` element may be addressed by name or index."""
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.path=value.")
    value = yaml.safe_load(value_text) if value_text.strip() else None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i])} is not a mapping.")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"override {where}: index {index} out of range ({len(items)} items).")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part not in names:
        raise ConfigError(f"override {where}: no stage named {part!r}.{did_you_mean(part, [n for n in names if n])}")
    return names.index(part)

