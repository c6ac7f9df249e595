"""The recipe schema: dataclasses for the file as written (:class:`RecipeSpec`) and as resolved (:class:`Recipe`).

A recipe has ``model`` (encoder / connector / llm: preset names or specs), recipe-level defaults for ``data``,
``optim`` and ``trainer``, and an ordered ``stages`` list whose entries may override any of those fields.
:mod:`mllm_kit.config.load` turns a file into a :class:`Recipe` once: every preset expanded into a full component
spec, every stage merged and every registry name checked. Nothing downstream resolves again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mllm_kit.config.validate import to_dict
from mllm_kit.data.synthetic import SynthConfig
from mllm_kit.errors import ConfigError, did_you_mean


@dataclass
class ModelSpec:
    """Component specs. As written: a preset name, ``{preset: name, **overrides}``, ``{name: registered, **options}``
    or ``{_target_: pkg.mod.Class, **options}``; once resolved, always a full mapping with ``name`` or ``_target_``.
    ``efficiency``: a visual-token efficiency method for every stage and for inference (``{method: fastv, layer: 2,
    ratio: 0.5}``; docs/efficiency.md); a stage's own ``efficiency`` replaces it."""

    encoder: Any = "clip_vit_l14_336"
    connector: Any = "mlp2x_gelu"
    llm: Any = None
    efficiency: Any = None


@dataclass
class ShardSource:
    """``{format: wds, urls: "shards/train-{000000..000127}.tar"}``: WebDataset tar shards written by ``mllm-kit data
    convert --to wds`` (brace ranges expand; patterns join with ``::``; local files only)."""

    format: Literal["wds"] = "wds"
    urls: str = ""


@dataclass
class WeightedSource:
    """One source of a weighted mixture (``data.sources``): a LLaVA JSON/JSONL path, a synthetic split or shards, its
    image folder, and its share of every epoch (weights are normalised over the sources)."""

    train: str | ShardSource = ""
    weight: float = 1.0
    image_root: str | None = None


@dataclass
class DataSpec:
    """``train``/``eval``: a LLaVA JSON/JSONL path, ``synthetic:align|sft|eval|preference``, or WebDataset shards
    (:class:`ShardSource`); a stage with ``eval`` data reports
    held-out loss and generation accuracy on it (see ``trainer.val_every_n_steps``), and the last stage's ``eval`` is
    what ``mllm-kit fit`` evaluates after training; without it nothing is evaluated. ``image_mode`` overrides the
    encoder's resize mode for this data (LLaVA-1.5 pads to square only in SFT). ``system_prompt`` replaces the
    template's default system prompt (``""``: none) for samples without one. ``length_group_size``: how many
    global micro-batches are sorted by length together before shuffling (1 = LLaVA's grouping).

    ``packing``: micro-batches are rows of up to ``max_length`` tokens, each holding several whole samples that attend
    only to themselves (:mod:`mllm_kit.data.packing`); ``micro_batch_size`` / ``global_batch_size`` then count rows.
    ``packing_max_images`` caps the images per row (None: no cap), ``packing_buffer`` is how many shuffled samples
    first-fit-decreasing sorts at once. ``max_bad_fraction``: samples whose image cannot be read are skipped and
    logged, up to this fraction of the data (0.1 %); one more is an error. ``loss_weighting``: how the LM loss weighs samples — ``token`` (every supervised
    token alike, LLaVA's), ``sample`` (each sample's mean, alike), ``square`` (InternVL's: tokens weighted 1/√nᵢ).

    ``sources`` (instead of ``train``): a weighted mixture. An epoch holds as many samples as all sources together;
    source i gives round(wᵢ/Σw · N) of them, drawn without replacement (a source repeats only once it is used up;
    docs/data.md)."""

    train: str | ShardSource | None = None
    sources: list[WeightedSource] | None = None
    eval: str | ShardSource | None = None
    image_root: str | None = None
    template: str = "chatml"
    system_prompt: str | None = None
    image_mode: Literal["resize", "center_crop", "pad"] | None = None
    max_length: int = 2048
    truncation: Literal["trim", "drop"] = "trim"
    group_by_modality: bool = True
    length_group_size: int = 1
    num_workers: int = 0
    packing: bool = False
    packing_max_images: int | None = None
    packing_buffer: int = 4096
    loss_weighting: Literal["token", "sample", "square"] = "token"
    max_bad_fraction: float = 0.001
    allow_pipe: bool = False  # shard URLs may be `pipe:` shell commands (run once, output cached under the run's data/)
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

    def accumulation(self, world_size: int, path: str = "optim") -> int:
        """global batch = micro batch × devices × nodes × accumulation; anything else is an error."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"{path}.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size × world size = "
                f"{self.micro_batch_size} × {world_size} = {per_step}; change one of them."
            )
        return self.global_batch_size // per_step


LIGHTNING_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true")
SHARDED_STRATEGIES = ("fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


@dataclass
class TrainerSpec:
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ... | fsdp | deepspeed_stage_{1,2,3} (docs/scaling.md)
    offload_optimizer: bool = False  # DeepSpeed: optimiser states on CPU
    offload_parameters: bool = False  # fsdp / deepspeed_stage_3: parameters on CPU between uses
    activation_checkpointing: bool = False  # recompute each transformer block (LLM, and a trainable encoder) in backward
    compile: bool = False  # torch.compile every encoder block and LLM decoder layer (MLLM.compile_blocks; docs/performance.md)
    peak_tflops: float | None = None  # the accelerator's dense peak for perf/mfu (default: a table by device name; CPU: measured)
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    val_every_n_steps: int | None = None  # optimiser steps between validation runs on data.eval (None: at the end only)
    seed: int = 0
    deterministic: bool = False
    progress: bool = True


@dataclass
class EvalSpec:
    """Generation settings of held-out evaluation (during training and after it); the data is each stage's ``data.eval``.
    ``max_samples`` caps the samples validation reads during training (the final evaluation reads all).

    ``benches`` (name → file, as ``mllm-kit eval --bench NAME=PATH``): benchmarks scored during ``stages`` (default: the
    last stage) every ``every_n_steps`` optimiser steps (None: at the end of the stage only), ``bench_limit`` questions each (whole MMBench rotations, both MME questions of an image);
    ``keep_best: <bench>/<metric>`` keeps the best step's weights in ``<stage>/best/`` (``keep_best_mode``: max|min)."""

    max_new_tokens: int = 8
    batch_size: int = 32
    max_samples: int | None = None
    benches: dict[str, str] = field(default_factory=dict)
    stages: list[str] | None = None
    every_n_steps: int | None = None
    bench_limit: int | None = None
    keep_best: str | None = None
    keep_best_mode: Literal["max", "min"] = "max"


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
class TeacherSpec:
    """The model a stage distils from (docs/distillation.md) — exactly one of:

    * ``run`` + ``stage``: a finished run directory and the stage whose ``final/`` weights teach;
    * ``stage`` alone: an earlier stage of this recipe (one recipe trains a teacher, then distils a student);
    * ``hf_llava``: a transformers ``LlavaForConditionalGeneration`` directory (imported as :mod:`mllm_kit.interop.llava` does);
    * ``model`` (+ ``weights``): component specs over the recipe's ``model`` (e.g. only ``{llm: qwen15_4b}``) and a
      ``.safetensors`` file or saved mllm-kit model directory of the whole model's weights.

    The teacher is frozen, in eval mode, run under ``no_grad`` in ``precision`` and never in the optimiser or in a
    checkpoint. ``template``: its chat template when it differs from the stage's (the dataset then builds the
    teacher's own view of every sample). ``vocab``: ``same`` (every token id must match, checked before training) or
    ``shared_prefix`` (LLaVA-MoD: logits truncated to the vocabulary both share).
    """

    run: str | None = None
    stage: str | None = None
    hf_llava: str | None = None
    model: dict[str, Any] | None = None
    weights: str | None = None
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    template: str | None = None
    vocab: Literal["same", "shared_prefix"] = "same"

    @property
    def form(self) -> str:
        """``run``, ``stage``, ``hf_llava`` or ``model``."""
        if self.run is not None:
            return "run"
        if self.hf_llava is not None:
            return "hf_llava"
        if self.model is not None:
            return "model"
        return "stage"

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the teacher it was trained with."""
        keys = {"run": ("run", "stage"), "stage": ("stage",), "hf_llava": ("hf_llava",), "model": ("model", "weights")}[self.form]
        return {"form": self.form, **{k: getattr(self, k) for k in keys}, "precision": self.precision, "vocab": self.vocab}


@dataclass
class StageSpec:
    """One stage as written. It starts from the previous stage's ``final/`` (the first from the recipe's ``model``),
    from the stage named by ``init_from``, or — when it names ``model`` (specs over the recipe's ``model``) — from a
    freshly built model, e.g. the student after a recipe's teacher stages."""

    name: str
    trainable: list[str]
    transforms: list[Any] = field(default_factory=list)
    objective: Any = "lm"
    aux_loss_coef: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    init_from: str | None = None
    teacher: TeacherSpec | None = None
    pre_align: str | None = None
    init_members: dict[str, str] = field(default_factory=dict)
    efficiency: Any = None


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
    """A stage with recipe-level defaults and its own overrides merged; ``transforms`` and ``objective`` are full specs
    (``{name: ..., **options}``). ``model``: the full specs of a fresh start (``None``: the stage continues from
    ``init_from``, the name of an earlier stage, or from the previous stage); ``teacher.model`` is resolved likewise.

    ``pre_align``: a member of the recipe's encoder mixture that this stage trains alone, with its own projector (the
    stage's ``model.connector``, default ``mlp2x_gelu``) and the recipe's LLM — Eagle's pre-alignment (specs §5.1);
    ``init_members``: member → earlier stage whose final encoder replaces that member's weights when this stage starts.
    ``efficiency``: the stage's visual-token efficiency method (its own, else the recipe's ``model.efficiency``;
    ``None``: off), a checked ``{name, **options}`` spec."""

    name: str
    trainable: list[str]
    transforms: list[dict[str, Any]]
    objective: dict[str, Any]
    aux_loss_coef: dict[str, float]
    data: DataSpec
    optim: OptimSpec
    trainer: TrainerSpec
    model: ModelSpec | None = None
    init_from: str | None = None
    teacher: TeacherSpec | None = None
    pre_align: str | None = None
    init_members: dict[str, str] = field(default_factory=dict)
    efficiency: dict[str, Any] | None = None


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

    @property
    def eval_data(self) -> str | None:
        """What ``mllm-kit fit`` evaluates after the last stage: that stage's ``data.eval``."""
        return self.stages[-1].data.eval
