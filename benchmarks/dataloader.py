"""Data-loader throughput: samples/s of the training loader from LLaVA JSON + image files and from WebDataset shards,
at 0, 1 and 2 worker processes.

    python benchmarks/dataloader.py [--samples 2000] [--image-size 336] [--rounds 3]
    python benchmarks/dataloader.py --samples 64 --batches 2 --rounds 1      # a quick check that it runs

The samples are the synthetic shapes (PNG) rendered at ``--image-size`` and encoded for the quickstart model with a
CLIP transform at 336 px (decode → resize → normalise in the workers, as in training); batches of 16 go through the
real ``StepLoader`` and ``PadCollator``. The first batch (worker start-up) is not timed. Each round measures every
(source, worker count) once, round-robin, so drift in the machine's speed falls on all of them alike; the median
over ``--rounds`` is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mllm_kit import MLLM
from mllm_kit.config import resolve_model
from mllm_kit.config.recipe import DataSpec, ShardSource
from mllm_kit.data.shards import convert
from mllm_kit.data.synthetic import SynthConfig, generate
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.training.data import MLLMDataModule


def throughput(model: MLLM, spec: DataSpec, root: Path, workers: int, batches: int) -> float:
    data = MLLMDataModule(model, DataSpec(**{**spec.__dict__, "num_workers": workers}), root, 16, 1, seed=0)
    it = iter(data._loader())
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it).batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (the median is reported)")
    args = parser.parse_args()
    model = MLLM.build(resolve_model({**tiny_encoder_spec("clip", image_size=336, patch_size=14)}, "mlp2x_gelu",
                                     tiny_llm_spec("llama")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = generate(root / "synth", SynthConfig(image_size=args.image_size, num_align=4, num_sft=args.samples, num_eval=4))
        convert(paths.sft, paths.image_root, root / "wds", samples_per_shard=500)
        shards = len(json.loads((root / "wds" / "manifest.json").read_text())["shards"])
        sources = {"json": DataSpec(train=str(paths.sft), image_root=str(paths.image_root)),
                   "shards": DataSpec(train=ShardSource(urls=str(root / "wds" / f"train-{{000000..{shards - 1:06d}}}.tar")))}
        rates: dict[str, dict[str, list[float]]] = {name: {str(w): [] for w in (0, 1, 2)} for name in sources}
        for _ in range(args.rounds):
            for w in (0, 1, 2):
                for name, spec in sources.items():
                    rates[name][str(w)].append(throughput(model, spec, root, w, args.batches))
        result = {"samples": args.samples, "image_size": args.image_size, "batch": 16, "timed_batches": args.batches,
                  "rounds": args.rounds,
                  "samples_per_s": {name: {w: round(statistics.median(r), 1) for w, r in by_workers.items()}
                                    for name, by_workers in rates.items()}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
