"""``mllm-kit export`` and ``mllm-kit import``: leave the toolkit as a transformers LLaVA checkpoint or a bundle, and
start a run from a published LLaVA-HF checkpoint."""

from __future__ import annotations

import argparse

FORMATS = ("hf-llava", "bundle")


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mllm_kit.errors import ConfigError
    from mllm_kit.interop.llava import refuse_existing
    from mllm_kit.model import MLLM
    from mllm_kit.training.state import finished_stage, read_run

    out = Path(args.out)
    if args.dtype and args.to != "hf-llava":
        raise ConfigError("--dtype applies to --to hf-llava; a bundle keeps the dtypes the model was trained in.")
    refuse_existing(out, args.overwrite)  # before loading anything
    recipe, state = read_run(Path(args.run))
    stage = finished_stage(recipe, state, args.stage)
    model = MLLM.from_pretrained(state.final_dir(stage.name)).eval()
    if args.without_efficiency:
        model.set_efficiency(None)
    data = stage.data
    if args.to == "hf-llava":
        from mllm_kit.interop.llava import to_hf_llava

        to_hf_llava(model, out, template=data.template, image_mode=data.image_mode, system_prompt=data.system_prompt,
                    dtype=args.dtype, overwrite=args.overwrite)
        what = "a transformers LlavaForConditionalGeneration checkpoint + LlavaProcessor"
    else:
        from mllm_kit.interop.bundle import save_bundle

        save_bundle(model, out, template=data.template, system_prompt=data.system_prompt, image_mode=data.image_mode,
                    overwrite=args.overwrite)
        what = "an mllm-kit bundle (safetensors + mllm.json, manifest.json)"
    print(f"{args.run} (stage {stage.name}) → {out}: {what}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from mllm_kit.interop.hf_import import import_hf_llava

    run = import_hf_llava(args.source, args.out, overwrite=args.overwrite, stage=args.stage)
    print(f"{args.source} → run directory {run} (stage {args.stage} done); continue from it with "
          f"`init_from: {run}` in a recipe stage, or `mllm-kit export --run {run} --to hf-llava OUT`")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``import`` subcommands."""
    p = sub.add_parser("export", help="write a run's finished stage as a transformers LLaVA checkpoint or an mllm-kit bundle",
                       description="Write a run's finished stage (default: the last) as a transformers LLaVA checkpoint "
                                   "(hf-llava: LlavaForConditionalGeneration + LlavaProcessor, no custom code; LoRA merged) "
                                   "or as an mllm-kit bundle (any architecture; safetensors only).")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--stage", help="the finished stage to export (default: the last finished one)")
    p.add_argument("--to", required=True, choices=FORMATS, help="hf-llava: transformers' LLaVA; bundle: mllm-kit's own format")
    p.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: as trained)")
    p.add_argument("--without-efficiency", action="store_true",
                   help="drop the stage's visual-token efficiency method (FastV, PDrop): the same weights, every token in every "
                        "layer — what LLaVA-HF runs")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="turn a local LLaVA-HF checkpoint into a run directory that recipes can start from",
                       description="Convert a local transformers LLaVA checkpoint directory into a run directory with one "
                                   "finished stage; a recipe stage continues from it with init_from: RUN.")
    p.add_argument("--from", dest="source_format", required=True, choices=["hf-llava"], help="the source format")
    p.add_argument("source", metavar="DIR", help="a LlavaForConditionalGeneration directory (config.json, weights, processor)")
    p.add_argument("--out", required=True, help="the run directory to write (atomically)")
    p.add_argument("--stage", default="imported", help="name of the stage that holds the imported weights (default: imported)")
    p.add_argument("--overwrite", action="store_true", help="replace the run directory if it exists")
    p.set_defaults(func=_import)
