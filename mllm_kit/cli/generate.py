"""``mllm-kit chat`` and ``mllm-kit predict``: talk to a trained run, or answer a JSONL file of prompts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_kit.cli.overrides import USAGE, parse_overrides


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The decoding options every generating command takes (:class:`~mllm_kit.inference.GenerationConfig`)."""
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable); the answer ends before it")
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")


def generation_config(args: argparse.Namespace):
    from mllm_kit.inference import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, stop=tuple(args.stop), seed=args.seed)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``chat`` and ``predict`` subcommands."""
    p = sub.add_parser("chat", help="talk to a run's model in the terminal (/image PATH, /reset, /quit)")
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun, whose own --run-path --run clashes with)")
    p.add_argument("--stage", help="a finished stage (default: the last)")
    p.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: CPU)")
    add_generation_args(p, max_new_tokens=256)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=USAGE)
    p.set_defaults(func=_chat)

    p = sub.add_parser("predict", help="answer every prompt of a JSONL file; resumes, skipping ids already in --out")
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (--run-dir under torchrun, whose own --run-path --run clashes with)")
    p.add_argument("--stage", help="a finished stage (default: the last)")
    p.add_argument("--data", required=True, help='LLaVA question JSONL ({"question_id", "image", "text"}) or conversation JSON/JSONL')
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's)")
    p.add_argument("--out", required=True, help="JSONL of {id, prompt, text, model}, appended batch by batch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    add_generation_args(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=USAGE)
    p.set_defaults(func=_predict)


def _chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from mllm_kit.data.templates import Turn
    from mllm_kit.inference import Generator, Prompt

    console = Console()
    changes = parse_overrides(args.overrides, "chat")
    generator = Generator.from_run(args.run, args.stage, args.device, connector=changes.connector, efficiency=changes.efficiency)
    config = generation_config(args)
    history: list[Turn] = []
    images: list[str] = []  # every image of the conversation, in order
    pending = list(args.image)
    console.print("[dim]/image PATH attaches an image to your next message; /reset starts over; /quit (or Ctrl-D) ends.[/]")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, images, pending = [], [], []
            console.print("[dim]conversation cleared[/]")
            continue
        if line.startswith("/image"):
            path = Path(line.removeprefix("/image").strip()).expanduser()
            if not path.is_file():
                console.print(f"[red]no image file {str(path)!r}[/]")
            else:
                pending.append(str(path))
            continue
        text = "<image>\n" * len(pending) + line
        prompt = Prompt(text, [*images, *pending], tuple(history))
        console.print("model> ", end="")
        pieces = []
        for piece in generator.stream(prompt, config):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
            sys.stdout.flush()
        console.print()
        images += pending
        pending = []
        history += [Turn("user", text), Turn("assistant", "".join(pieces))]


def _predict(args: argparse.Namespace) -> int:
    from mllm_kit.evaluation.formats import read_questions
    from mllm_kit.evaluation.predictions import append, done_ids
    from mllm_kit.inference import Generator
    from mllm_kit.log import get_logger, progress

    log = get_logger(__name__)
    items = read_questions(args.data, args.image_root, require_answers=False)
    done = done_ids(args.out)
    todo = [item for item in items if item.id not in done]
    log.info("%s: %d prompts, %d already answered in %s", args.data, len(items), len(items) - len(todo), args.out)
    if not todo:
        return 0
    changes = parse_overrides(args.overrides, "predict")
    generator = Generator.from_run(args.run, args.stage, args.device, connector=changes.connector, efficiency=changes.efficiency)
    config = generation_config(args)
    model_name = f"{Path(args.run).name}/{args.stage or 'last'}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    batches = [todo[k : k + args.batch_size] for k in range(0, len(todo), args.batch_size)]
    for batch in progress(batches, "predict"):
        answers = generator.generate([item.prompt for item in batch], config, batch_size=args.batch_size)
        append(args.out, ({"id": item.id, "prompt": item.prompt.text, "text": answer, "model": model_name}
                          for item, answer in zip(batch, answers)))
    log.info("wrote %d predictions to %s; %s", len(todo), args.out, generator.timing.summary())
    return 0
