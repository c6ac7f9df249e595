"""The ``mllm-kit`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _components(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import mllm_kit  # noqa: F401  (registers the built-ins)
    from mllm_kit.presets import GROUPS, list_presets
    from mllm_kit.registry import REGISTRIES

    table = Table(title="mllm-kit components")
    table.add_column("registry")
    table.add_column("names")
    for kind, registry in REGISTRIES.items():
        table.add_row(kind, ", ".join(registry.names()) or "-")
    for group in GROUPS:
        table.add_row(f"presets: {group}/", ", ".join(list_presets(group)) or "-")
    Console().print(table)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from mllm_kit.data.synthetic import SynthConfig, generate
    from mllm_kit.log import get_logger

    config = SynthConfig(
        seed=args.seed, image_size=args.image_size, num_align=args.num_align, num_sft=args.num_sft,
        num_eval=args.num_eval, tasks=tuple(args.tasks.split(",")), blank_images=args.blank_images,
    )
    paths = generate(args.out, config)
    get_logger("cli").info("synthetic data in %s: %s, %s, %s", paths.root, paths.align.name, paths.sft.name, paths.eval.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm-kit", description="Assemble and train multimodal LLMs from swappable parts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("components", help="list every registered component and preset")
    p.set_defaults(func=_components)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the synthetic shapes dataset (LLaVA JSON + images)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-align", type=int, default=2000)
    p.add_argument("--num-sft", type=int, default=12000)
    p.add_argument("--num-eval", type=int, default=600)
    p.add_argument("--tasks", default="color,shape", help="comma-separated: color,shape,count,position,relation")
    p.add_argument("--blank-images", action="store_true", help="render backgrounds only (blind control)")
    p.set_defaults(func=_data_synth)
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
