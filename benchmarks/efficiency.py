"""Visual-token dropping inside the LLM (docs/efficiency.md): time against the same model without it, next to the
ratio the closed-form FLOP count predicts, and that count against FlopCounterMode.

A LLaVA-shaped model narrow enough for a CPU: a CLIP-style tower at 336 px / patch 14 (576 image tokens, width 256,
4 blocks), mlp2x_gelu, a 24-layer Llama of width 512 (8 heads, FFN 1376). Each measurement alternates the two variants
in one process (round-robin), ``--repeats`` times after a warm-up, and reports min / median:

* ``prefill``: FastV (K 2, R 50 %) — ``MLLM.generate`` of one token for ``--batch`` prompts of 576 image tokens and
  ~40 text tokens: the encoder, the connector and the LLM's forward over the prompt (what a first token waits for);
* ``train``: PDrop (boundaries 6 / 12 / 18, λ 0.5) — forward + backward of an SFT micro-batch (the connector and the
  LLM train, the LM loss on a 24-token reply), the optimiser step (which dropping does not change) left out.

    python benchmarks/efficiency.py                       # both measurements, 5 repeats
    python benchmarks/efficiency.py prefill --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from timing import seconds_each

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.flops import StepFlops
from mllm_kit.flops.measure import measured_flops
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

FASTV = {"method": "fastv", "layer": 2, "ratio": 0.5}
PDROP = {"method": "pdrop", "layers": [6, 12, 18], "ratio": 0.5}


def build(seed: int = 0) -> MLLM:
    torch.manual_seed(seed)
    encoder = tiny_encoder_spec("clip", image_size=336, patch_size=14, hidden_size=256, num_layers=4, num_heads=4,
                                intermediate_size=1024)
    llm = tiny_llm_spec("llama", hidden_size=512, num_layers=24, num_heads=8, num_kv_heads=8, intermediate_size=1376)
    return MLLM.build(resolve_model(encoder, "mlp2x_gelu", llm))


def samples(model: MLLM, batch: int, text: int = 40, reply: int = 24) -> list[Sample]:
    """``batch`` samples: a few words, one 336 px image, ``text`` words (the last ``reply`` of them supervised)."""
    g = torch.Generator().manual_seed(1)
    n, img = model.tokens_per_image(), model.image_token_id
    out = []
    for k in range(batch):
        words = torch.randint(5, 200, (text + k,), generator=g).tolist()  # rows of different lengths: padding too
        ids = [*words[:5], *[img] * n, *words[5:]]
        labels = [IGNORE_INDEX] * (len(ids) - reply) + ids[-reply:]
        out.append(Sample(input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_image_tokens=n, id=str(k),
                          pixel_values=torch.randn(1, 3, 336, 336, generator=g)))
    return out


def prefill(model: MLLM, args: argparse.Namespace) -> dict:
    model.eval().requires_grad_(False)
    prompts = PadCollator(model.tokenizer.pad_token_id, padding_side="left")(
        [Sample(s.input_ids[:-24], torch.full_like(s.input_ids[:-24], IGNORE_INDEX), s.pixel_values, s.num_image_tokens, s.id)
         for s in samples(model, args.batch)])

    def run(spec):
        def go():
            model.set_efficiency(spec)
            with torch.no_grad():
                model.generate(prompts.input_ids, prompts.attention_mask, prompts.pixel_values, max_new_tokens=1,
                               images_per_sample=prompts.images_per_sample, row_lengths=prompts.row_lengths)
        return go

    flops = {}
    for name, spec in (("dense", None), ("fastv", FASTV)):
        model.set_efficiency(spec)
        counted = StepFlops(model, trainable=False)(prompts, head_rows=len(prompts)).model_flops
        flops[name] = (counted, measured_flops(run(spec)))
    times = seconds_each({"dense": run(None), "fastv": run(FASTV)}, args.repeats, args.warmup, "cpu")
    return report("prefill", "FastV K 2 / R 50 %", times, flops)


def train(model: MLLM, args: argparse.Namespace) -> dict:
    model.train()
    model.requires_grad_(True)
    model.encoder.requires_grad_(False)
    batch = PadCollator(model.tokenizer.pad_token_id)(samples(model, args.batch))
    objective = LMObjective()

    def run(spec):
        def go():
            model.set_efficiency(spec)
            objective(model(batch), batch, None)["loss"].backward()
            model.zero_grad(set_to_none=True)
        return go

    flops = {}
    for name, spec in (("dense", None), ("pdrop", PDROP)):
        model.set_efficiency(spec)
        flops[name] = (StepFlops(model)(batch).model_flops, measured_flops(run(spec)))
    times = seconds_each({"dense": run(None), "pdrop": run(PDROP)}, args.repeats, args.warmup, "cpu")
    return report("train", "PDrop 6/12/18, λ 0.5", times, flops)


def report(what: str, method: str, times: dict[str, list[float]], flops: dict[str, tuple[float, int]]) -> dict:
    dense, dropped = times["dense"], next(v for k, v in times.items() if k != "dense")
    name = next(k for k in times if k != "dense")
    row = {
        "measurement": what, "method": method, "repeats": len(dense),
        "dense_s": [min(dense), statistics.median(dense)], "dropped_s": [min(dropped), statistics.median(dropped)],
        "ratio_min": min(dropped) / min(dense), "ratio_median": statistics.median(dropped) / statistics.median(dense),
        "flop_ratio": flops[name][0] / flops["dense"][0],
        "count_vs_counter": {k: c / m for k, (c, m) in flops.items()},
    }
    print(f"{what:8s} {method:22s} dense {row['dense_s'][0]:.3f} / {row['dense_s'][1]:.3f} s, dropped "
          f"{row['dropped_s'][0]:.3f} / {row['dropped_s'][1]:.3f} s (min / median of {len(dense)}): "
          f"{row['ratio_min']:.3f}× / {row['ratio_median']:.3f}×; FLOPs {row['flop_ratio']:.3f}× "
          f"(count / FlopCounterMode: {', '.join(f'{k} {v:.4f}' for k, v in row['count_vs_counter'].items())})")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurements", nargs="*", metavar="prefill|train", help="default: both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.measurements) - {"prefill", "train"})
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose prefill and/or train")
    args.measurements = args.measurements or ["prefill", "train"]
    model = build()
    rows = [{"prefill": prefill, "train": train}[m](model, args) for m in args.measurements]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
