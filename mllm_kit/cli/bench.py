"""``mllm-kit eval --run R --bench NAME=PATH ...``: score a run on benchmark files (under torchrun, over all ranks)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mllm_kit.cli.overrides import RunOverrides
from mllm_kit.errors import ConfigError


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmarks (instead of the run's data.eval)")
    g.add_argument("--bench", action="append", default=[], metavar="NAME=PATH",
                   help="a registered bench and its file, e.g. vqav2=questions.jsonl, mmbench=dev.tsv, synthetic=synthetic:eval "
                        "(repeatable; `mllm-kit components` lists the benches)")
    g.add_argument("--answers", action="append", default=[], metavar="NAME=PATH",
                   help="gold answers in a separate file: a JSONL by question_id, or the benchmark's own annotations "
                        "(VQAv2/GQA/TextVQA/VizWiz annotation JSON, ScienceQA problems.json, SEED-Bench.json, the MME folder)")
    g.add_argument("--image-root", help="folder the benches' image paths are relative to (default: each file's)")
    g.add_argument("--out", help="output folder (default: RUN/eval/STAGE)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--limit", type=int, default=None,
                   help="only the first N questions of each bench (with all their MMBench shifts / MME pair)")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when a GPU is present, else CPU")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: each bench's own")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} {value!r}: expected NAME=PATH, e.g. {flag} vqav2=llava_vqav2_mscoco_test-dev2015.jsonl.")
        out[name] = path
    return out


def run_benches(args: argparse.Namespace, overrides: RunOverrides) -> int:

    import torch
    from rich.console import Console

    from mllm_kit.evaluation.benches import get_bench
    from mllm_kit.evaluation.formats import take
    from mllm_kit.evaluation.runner import rank_and_world, results_table, run_bench, write_results
    from mllm_kit.inference import GenerationConfig, Generator
    from mllm_kit.training.data import resolve_path
    from mllm_kit.training.state import finished_stage, read_run

    benches = _pairs(args.bench, "--bench")
    answers = _pairs(args.answers, "--answers")
    unknown = sorted(set(answers) - set(benches))
    if unknown:
        raise ConfigError(f"--answers names {unknown}, which no --bench names.")
    chosen = {name: get_bench(name) for name in benches}
    run = Path(args.run)
    recipe, state = read_run(run)
    stage = finished_stage(recipe, state, args.stage)
    items = {}
    for name, path in benches.items():  # read (and check) every file before loading the model
        source, root = resolve_path(stage.data, path, args.image_root, run / "data")
        items[name] = take(chosen[name].read(source, root, answers.get(name)), args.limit)
    _init_distributed()
    rank, _ = rank_and_world()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else None)
    generator = Generator.from_run(run, stage.name, device, connector=overrides.connector, efficiency=overrides.efficiency)
    results = []
    for name, bench in chosen.items():
        config = GenerationConfig(max_new_tokens=args.max_new_tokens or bench.max_new_tokens)
        results.append(run_bench(generator, name, bench, items[name], config, args.batch_size))
    if rank == 0:
        out = Path(args.out) if args.out else run / "eval" / stage.name
        config = {"model": "mllm_kit", "model_args": f"run={run},stage={stage.name}", "batch_size": args.batch_size,
                  "benches": benches, "connector": overrides.connector, "efficiency": generator.efficiency_spec}
        timing = generator.timing
        config["timing"] = {"prefill_s": timing.prefill_s, "decode_s": timing.decode_s, "prompts": timing.prompts,
                            "prompt_tokens": timing.prompt_tokens, "new_tokens": timing.new_tokens}
        path = write_results(out, results, config)
        console = Console()
        console.print(results_table(results))
        console.print(f"generation (rank 0): {timing.summary()}")
        console.print(f"wrote {path}")
    return 0


def _init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
