"""The ``mllm-kit`` command line: fit, eval, chat, predict, export, import, report, recipes, components, data synth / inspect."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mllm_kit.cli import bench, generate, interop
from mllm_kit.cli.overrides import parse_overrides
from mllm_kit.errors import ConfigError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console():
    from rich.console import Console

    return Console()


def _load(args: argparse.Namespace):
    from mllm_kit.config import load_recipe, smoke_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    return smoke_recipe(recipe) if args.smoke else recipe


def _fit(args: argparse.Namespace) -> int:
    from mllm_kit.training.runner import fit, is_launching_process

    recipe = _load(args)
    run_dir = Path(args.run_dir or Path("runs") / (recipe.name + ("-smoke" if args.smoke else "")))
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    fit(recipe, run_dir, resume=args.resume, stages=stages)
    if recipe.eval_data and not args.no_eval and is_launching_process():
        return _evaluate_run(run_dir)
    return 0


def _evaluate_run(run_dir: Path, overrides: Sequence[str] = (), stage_name: str | None = None) -> int:
    import dataclasses

    from mllm_kit.efficiency import override_efficiency
    from mllm_kit.files import atomic_write_json
    from mllm_kit.model import MLLM
    from mllm_kit.training.runner import evaluate
    from mllm_kit.training.state import finished_stage, read_run

    recipe, state = read_run(run_dir)
    stage = finished_stage(recipe, state, stage_name)
    changes = parse_overrides(overrides, "eval", data=True)
    if changes.data:
        stage = dataclasses.replace(stage, data=dataclasses.replace(stage.data, **changes.data))
    model = MLLM.from_pretrained(state.final_dir(stage.name), connector=changes.connector)
    override_efficiency(model, changes.efficiency)
    result = evaluate(model, recipe, stage, run_dir / "data")
    name = "-".join(["eval", *([stage.name] if stage_name else []), *sorted(overrides)]).replace("/", "_") + ".json"
    atomic_write_json(run_dir / name, {"stage": stage.name, "accuracy": result.accuracy, "num_samples": result.num_samples,
                                       "per_task": result.per_task, "loss": result.loss, "overrides": changes.describe()})
    suffix = f" with {', '.join(sorted(overrides))}" if overrides else ""
    _console().print(f"[bold]{run_dir.name}[/] (stage {stage.name}{suffix}): {result.summary()}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.bench:
        if any(item.startswith("data.eval=") for item in args.overrides):
            raise ConfigError("eval --bench reads the benches' own files; drop data.eval=... (or drop --bench).")
        return bench.run_benches(args, parse_overrides(args.overrides, "eval --bench"))
    return _evaluate_run(Path(args.run), args.overrides, args.stage)


def _report(args: argparse.Namespace) -> int:
    from mllm_kit.cli.report import write_report

    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    _console().print(f"wrote {path}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mllm_kit.config import load_recipe
    from mllm_kit.config.presets import list_presets

    table = Table(title="recipe zoo")
    for column in ("recipe", "description", "stages"):
        table.add_column(column)
    for name in list_presets("recipes"):
        recipe = load_recipe(name)
        table.add_row(name, recipe.description, " → ".join(s.name for s in recipe.stages))
    _console().print(table)
    return 0


def _components(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mllm_kit.config.presets import GROUPS, list_presets, preset_path
    from mllm_kit.registry import REGISTRIES

    table = Table(title="mllm-kit components")
    for column in ("kind", "name", "from"):
        table.add_column(column)
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            table.add_row(kind, name, registry.origin(name))
    for group in GROUPS:
        for name in list_presets(group):
            table.add_row(f"preset: {group}", name, str(preset_path(group, name).parent))
    _console().print(table)
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from mllm_kit.data.shards import convert

    convert(args.data, args.image_root, args.out, args.samples_per_shard, args.prefix)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from mllm_kit.data.synthetic import SynthConfig, generate, parse_radius

    config = SynthConfig(
        seed=args.seed, image_size=args.image_size, num_align=args.num_align, num_sft=args.num_sft,
        num_eval=args.num_eval, tasks=tuple(args.tasks.split(",")), blank_images=args.blank_images,
        palette=args.palette,
        radius=parse_radius(args.radius) if args.radius else None,
    )
    paths = generate(args.out, config)
    _console().print(f"synthetic data in {paths.root}: {paths.align.name}, {paths.sft.name}, {paths.eval.name}, {paths.preference.name}")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from mllm_kit.cli.samples import render_sample
    from mllm_kit.registry import OBJECTIVES
    from mllm_kit.training.data import build_dataset
    from mllm_kit.training.stage import build_recipe_model

    recipe = _load(args)
    stage = recipe.stage(args.stage) if args.stage else recipe.stages[0]
    model = build_recipe_model(recipe, stage.model)
    preference = OBJECTIVES.build(stage.objective).preference
    dataset = build_dataset(model, stage.data, Path(args.data_root), "train", preference=preference)
    console = _console()
    for index in range(args.index, min(len(dataset), args.index + args.count)):
        sample = dataset[index]
        console.print(render_sample(sample, model.tokenizer, model.image_token_id))
        if sample.rejected is not None:
            console.print("[dim]rejected:[/] " + render_sample(sample.rejected, model.tokenizer, model.image_token_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm-kit", description="Assemble and train multimodal LLMs from swappable parts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="run every stage of a recipe (then evaluate, if its last stage names data.eval)")
    p.add_argument("--recipe", required=True, help="recipe file, or the name of one in the zoo")
    p.add_argument("--smoke", action="store_true", help="tiny models of the same families, synthetic data, a few steps per stage")
    p.add_argument("--run-dir", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="skip finished stages; continue the unfinished one from its last checkpoint")
    p.add_argument("--stages", help="comma-separated subset of stages to run")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate after the last stage")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 stages.sft.optim.max_steps=10")
    p.set_defaults(func=_fit)

    p = sub.add_parser("eval", help="held-out loss and accuracy of a run's last finished stage (or --stage) on its data.eval, "
                                    "or its scores on benchmark files (--bench)")
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun, whose own --run-path --run clashes with)")
    p.add_argument("--stage", help="evaluate this finished stage instead of the last (writes eval-STAGE.json)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="connector.KEY=VALUE: connector options for this evaluation, e.g. connector.scale=36 (Matryoshka); "
                        "model.efficiency.KEY=VALUE: the visual-token efficiency method, e.g. model.efficiency.ratio=0.75, "
                        "model.efficiency=off; data.eval=PATH: another held-out set")
    bench.add_bench_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="plot loss and learning-rate curves of every stage to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/report.png)")
    p.set_defaults(func=_report)

    p = sub.add_parser("recipes", help="list the recipe zoo")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("components", help="list every registered component and preset")
    p.set_defaults(func=_components)

    generate.add_parsers(sub)
    interop.add_parsers(sub)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the synthetic shapes dataset (LLaVA JSON + images)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--radius", metavar="MIN,MAX", default=None,
                   help="shape half-size range in px (default: IMAGE_SIZE/8,IMAGE_SIZE/4, i.e. 8,16 at 64)")
    p.add_argument("--num-align", type=int, default=2000)
    p.add_argument("--num-sft", type=int, default=12000)
    p.add_argument("--num-eval", type=int, default=600)
    p.add_argument("--tasks", default="color,shape", help="comma-separated: color,shape,count,position,relation")
    p.add_argument("--blank-images", action="store_true", help="render backgrounds only (blind control)")
    p.add_argument("--palette", default="standard", choices=["standard", "isoluminant"],
                   help="shape colours; isoluminant: one luminance, so grayscale cannot tell them apart")
    p.set_defaults(func=_data_synth)

    p = data.add_parser("convert", help="write LLaVA JSON/JSONL + an image folder as WebDataset tar shards")
    p.add_argument("--to", required=True, choices=["wds"], help="the output format")
    p.add_argument("--data", required=True, help="LLaVA JSON or JSONL file")
    p.add_argument("--image-root", help="folder the samples' image paths are relative to (default: the data file's)")
    p.add_argument("--out", required=True, help="output directory (shards and manifest.json)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar, ...")
    p.set_defaults(func=_data_convert)

    p = data.add_parser("inspect", help="show encoded samples of a recipe's stage with supervised spans marked")
    p.add_argument("--recipe", required=True)
    p.add_argument("--stage", help="stage name (default: the first)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--data-root", default="runs/inspect-data", help="where synthetic data is generated")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_data_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mllm_kit.errors import MllmKitError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MllmKitError as err:
        print(f"mllm-kit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
