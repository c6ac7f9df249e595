"""Peak memory and step time of the LM loss: full-vocabulary logits at every position (the path before the
position-gathered head) vs the head applied only at supervised positions, in checkpointed chunks
(:mod:`mllm_kit.objectives.head`).

A Qwen2-like decoder (152K vocabulary, hidden 512, 2 layers, untied head) on padded rows of 512 tokens where the last
10 % of each row is supervised — the shape of LLaVA's alignment stage (a caption after 576 image tokens) — and,
for contrast, 50 % supervised (SFT-like). Each variant runs in its own process: peak memory is the growth of the
process's peak RSS over a forward + backward step, above the resident model; step time is the min / median over
round-robin repeats.

    python benchmarks/lm_head.py                 # both supervision ratios, 5 repeats
    python benchmarks/lm_head.py --repeats 7 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from timing import processes_each

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(variant: str, batch: int, length: int, supervised: float, vocab: int, steps: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm_kit.batch import IGNORE_INDEX
    from mllm_kit.objectives.base import shifted_token_ce
    from mllm_kit.objectives.head import head_cross_entropy

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=length, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ids = torch.randint(0, vocab, (batch, length))
    labels = torch.full_like(ids, IGNORE_INDEX)
    start = int(length * (1 - supervised))
    labels[:, start:] = ids[:, start:]
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def step() -> float:
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        if variant == "full":
            loss_sum, n = shifted_token_ce(head(hidden), labels)
        else:
            loss_sum, n = head_cross_entropy(hidden, labels, head, count)
        loss = loss_sum / n
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    base = _rss_kib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "supervised": supervised, "peak_mib": (peak - base) / 1024, "step_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=5, help="round-robin repeats (one process each)")
    parser.add_argument("--steps", type=int, default=2, help="steps per process (the min is kept)")
    parser.add_argument("--supervised", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SUPERVISED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.batch, args.length, float(args.child[1]), args.vocab, args.steps)))
        return
    commands = {(variant, supervised): [sys.executable, __file__, "--child", variant, str(supervised), "--batch", str(args.batch),
                                        "--length", str(args.length), "--vocab", str(args.vocab), "--steps", str(args.steps)]
                for supervised in args.supervised for variant in ("full", "gathered")}
    results = processes_each(commands, args.repeats, env={**os.environ, "OMP_NUM_THREADS": "2"})
    print(f"batch {args.batch} × {args.length} tokens, vocabulary {args.vocab:,}, {args.repeats} repeats (min / median)\n")
    print("| supervised | path | peak memory over the model (MiB) | step time (s) |")
    print("|---|---|---|---|")
    summary = []
    for supervised in args.supervised:
        for variant in ("full", "gathered"):
            rows = results[(variant, supervised)]
            peak = [r["peak_mib"] for r in rows]
            step = [r["step_s"] for r in rows]
            summary.append({"supervised": supervised, "variant": variant, "peak_mib_min": min(peak), "peak_mib_median": statistics.median(peak),
                            "step_s_min": min(step), "step_s_median": statistics.median(step)})
            print(f"| {supervised:.0%} | {variant} | {min(peak):,.0f} / {statistics.median(peak):,.0f} | "
                  f"{min(step):.3f} / {statistics.median(step):.3f} |")
        full, gathered = summary[-2], summary[-1]
        print(f"| {supervised:.0%} | gathered / full | {gathered['peak_mib_median'] / full['peak_mib_median']:.2f}× | "
              f"{gathered['step_s_median'] / full['step_s_median']:.2f}× |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
