"""Supervised tokens per second: packed rows against padded, length-grouped batches, on a LLaVA-665K-like length mix.

    python benchmarks/packing.py                 # CPU; JSON to stdout
    python benchmarks/packing.py --scale 1       # LLaVA's real lengths (576 image tokens, max_length 2048): slow on CPU

The length mix (printed with the results): 94 % image samples — 576 image positions plus log-normal text (median
130 tokens, σ 0.9; multi-turn conversations give the long tail) — and 6 % text-only samples (ShareGPT-like, median 600,
σ 0.8), capped at ``max_length`` 2048; each sample supervises its last ~40 % of text tokens. ``--scale`` divides every
length by a factor (default 4: 144 image positions, max_length 512) so that a CPU step stays short. Image positions
are ordinary token positions here: the LLM's cost is what packing changes, and the encoder's work per image is the
same either way.

Both modes run the real path — :class:`PadCollator` with LLaVA's modality-length grouping (:func:`grouped_indices`)
or :class:`PackCollator` rows from :func:`first_fit_decreasing` — through ``MLLM.forward`` and the LM objective, a
backward and an AdamW step, alternating the two modes step by step on the same samples; reported: median supervised
tokens/s over the timed steps, and the padding waste of each (the fraction of computed positions that hold no sample).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.data.packing import PackCollator, first_fit_decreasing
from mllm_kit.data.sampler import grouped_indices
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec


def length_mix(n: int, scale: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    """``(total tokens, supervised tokens, has image)`` per sample."""
    g = torch.Generator().manual_seed(seed)
    max_length, image = 2048 // scale, 576 // scale
    out = []
    for k in range(n):
        has_image = torch.rand((), generator=g).item() < 0.94
        median, sigma = (130, 0.9) if has_image else (600, 0.8)
        text = int(torch.empty(()).log_normal_(mean=float(torch.tensor(median / scale).log()), std=sigma, generator=g).item())
        text = max(8, min(text, max_length - (image if has_image else 0)))
        out.append((text + (image if has_image else 0), max(1, int(0.4 * text)), has_image))
    return out


def samples_for(mix: list[tuple[int, int, bool]], vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k, (total, supervised, _) in enumerate(mix):
        ids = torch.randint(10, vocab, (total,), generator=g)
        labels = torch.full((total,), IGNORE_INDEX)
        labels[-supervised:] = ids[-supervised:]
        out.append(Sample(input_ids=ids, labels=labels, pixel_values=None, num_image_tokens=0, id=str(k)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8,
                        help="padded: micro-batches sorted by length together (data.length_group_size; 1 = LLaVA's)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    max_length = 2048 // args.scale
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu",
                                     tiny_llm_spec("llama", num_layers=args.layers, hidden_size=args.hidden,
                                                   intermediate_size=4 * args.hidden))).train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    objective = LMObjective()
    mix = length_mix(4000, args.scale)
    samples = samples_for(mix, model.llm.vocab_size)
    mean_tokens = statistics.mean(t for t, _, _ in mix)

    # padded: LLaVA's grouping with as many samples per step as the packed rows hold on average
    rows = first_fit_decreasing([(t, 0) for t, _, _ in mix], list(range(len(mix))), max_length)
    per_row = len(mix) / len(rows)
    batch_size = max(1, round(per_row * args.rows))
    signed = [t if img else -t for t, _, img in mix]
    order = grouped_indices(signed, batch_size, 1, torch.Generator().manual_seed(2), group_by_modality=True,
                            group_size=args.group_size)
    pad, pack = PadCollator(model.tokenizer.pad_token_id), PackCollator(model.tokenizer.pad_token_id, max_length)
    padded = [pad([samples[i] for i in order[k : k + batch_size]]) for k in range(0, batch_size * (args.steps + 1), batch_size)]
    shuffled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3)).tolist()
    packed = [pack([[samples[i] for i in rows[r]] for r in shuffled[k : k + args.rows]])
              for k in range(0, args.rows * (args.steps + 1), args.rows)]

    def step(batch) -> float:
        start = time.perf_counter()
        out = objective(model(batch), batch, None)
        out["loss"].backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    rates: dict[str, list[float]] = {"padded": [], "packed": []}
    for k in range(args.steps + 1):  # step 0 warms up
        for name, batches in (("padded", padded), ("packed", packed)):
            seconds = step(batches[k])
            if k:
                rates[name].append(batches[k].num_loss_tokens / seconds)

    def waste(batches) -> float:
        real = sum(int((b.labels.shape[1] * b.labels.shape[0])) for b in batches)
        used = sum(sum(sum(n) for n in b.seq_lens) if b.seq_lens else int(b.attention_mask.sum()) for b in batches)
        return round(1 - used / real, 4)

    result = {
        "length_mix": {"samples": len(mix), "image_fraction": round(sum(img for *_, img in mix) / len(mix), 3),
                       "image_positions": 576 // args.scale, "max_length": max_length,
                       "tokens_mean": round(mean_tokens, 1),
                       "tokens_p50_p90_p99": [int(v) for v in torch.tensor([t for t, _, _ in mix]).float().quantile(
                           torch.tensor([0.5, 0.9, 0.99])).tolist()]},
        "model": {"llm_hidden": args.hidden, "llm_layers": args.layers},
        "padded": {"batch_size": batch_size, "length_group_size": args.group_size, "supervised_tokens_per_s": round(statistics.median(rates["padded"]), 1),
                   "padding_waste": waste(padded[1:])},
        "packed": {"rows": args.rows, "samples_per_row": round(per_row, 2),
                   "supervised_tokens_per_s": round(statistics.median(rates["packed"]), 1),
                   "padding_waste": waste(packed[1:]),
                   "row_fill_all_rows": round(sum(t for t, _, _ in mix) / (len(rows) * max_length), 4)},
    }
    result["speedup"] = round(result["packed"]["supervised_tokens_per_s"] / result["padded"]["supervised_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
