"""Model FLOPs utilisation of a training step, vision included: mllm-kit (and with ``--compare hf`` transformers'
``LlavaForConditionalGeneration`` on identical weights and batches).

A plain PyTorch loop as in ``train_step.py`` (its ``build_llava``): a CLIP-like tower (frozen), the ``mlp2x_gelu``
projector and the LLM trained with AdamW on the next-token loss of the supervised tokens, on padded batches of
synthetic samples (an image's tokens, then text of random length whose second half is the reply). FLOPs per step
are ``mllm_kit.flops``'s closed form — encoder, connector, LLM and LM head, backward included; transformers' LLaVA
applies the head at every position, so its count is the same model's with the head on all rows. The peak is the
device's (``mllm_kit.training.perf.peak_flops``): on CPU the measured fp32 matmul peak at the thread count used.

The model is built once, saved as a LLaVA-HF checkpoint and converted to mllm-kit on disk. Each repeat runs every
variant once, round-robin (``timing.processes_each``), in a process of its own that loads only its model, so each peak
memory is that variant's training steps' alone (``timing.reset_peak_memory``: peak RSS on CPU, max allocated on CUDA).
Every process runs the same seeded batches in the same order (their text lengths differ, so their FLOPs do); it
times ``--steps`` steps after ``--warmup``, and its step time is their mean, its FLOP/s the FLOPs of those same
batches over their total time — identical work on every side of a ratio. The table gives the min / median over
``--repeats`` and each variant's step time and peak memory over transformers' (``--compare hf``).

    python benchmarks/mfu.py                                   # both configs, mllm-kit alone
    python benchmarks/mfu.py --config llava-100m --compare hf --repeats 5 --json mfu.json
    python benchmarks/mfu.py --config tiny --steps 2 --warmup 1 --repeats 1    # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import TYPE_CHECKING

from timing import peak_memory_mib, processes_each, reset_peak_memory, seconds_each, timing_parser
from train_step import build_llava

if TYPE_CHECKING:
    from mllm_kit import Batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: the LLaVA shape (train_step.build_llava's keys) + batch size and each sample's text-token range
CONFIGS = {
    # ~100M parameters: a CLIP-like ViT (6 × 384, 224 px / 14 → 256 tokens) and a Llama (6 × 768) with a 32K vocabulary
    "llava-100m": {"v_hidden": 384, "v_layers": 6, "v_heads": 6, "image": 224, "patch": 14, "hidden": 768, "layers": 6,
                   "heads": 12, "kv_heads": 12, "inter": 2048, "vocab": 32_000, "family": "llama", "batch": 4, "text": (64, 256)},
    # the same body with Qwen2's 151,936-token vocabulary (tied, as Qwen2-0.5B) and GQA (12 query / 2 key-value heads)
    "qwen2-152k": {"v_hidden": 384, "v_layers": 6, "v_heads": 6, "image": 224, "patch": 14, "hidden": 768, "layers": 6,
                   "heads": 12, "kv_heads": 2, "inter": 2048, "vocab": 151_936, "family": "qwen2", "tie": True, "batch": 4,
                   "text": (64, 256)},
    "tiny": {"v_hidden": 64, "v_layers": 2, "v_heads": 4, "image": 32, "patch": 8, "hidden": 64, "layers": 2, "heads": 4,
             "kv_heads": 2, "inter": 128, "vocab": 32_000, "family": "llama", "batch": 4, "text": (16, 48)},
}
VARIANTS = {"mllm-kit": "mllm-kit", "compiled": "mllm-kit, trainer.compile", "bf16-encoder": "mllm-kit, frozen encoder in bf16",
            "hf": "transformers"}


def make_batches(size: dict, image_token_id: int, pad_token_id: int, n: int) -> list[dict]:
    """``n`` right-padded batches: per sample 4 text tokens, the image's tokens, then ``text`` tokens (the second
    half supervised)."""
    import torch

    g = torch.Generator().manual_seed(1)
    tokens = (size["image"] // size["patch"]) ** 2
    low, high = size["text"]
    batches = []
    for _ in range(n):
        rows = []
        for _ in range(size["batch"]):
            text = int(torch.randint(low, high + 1, (1,), generator=g))
            words = torch.randint(10, 300, (4 + text,), generator=g)
            ids = torch.cat([words[:4], torch.full((tokens,), image_token_id), words[4:]])
            labels = ids.clone()
            labels[: 4 + tokens + text // 2] = -100
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, l) in enumerate(rows):
            ids[r, : len(i)], labels[r, : len(l)], mask[r, : len(i)] = i, l, 1
        pixels = torch.randn(len(rows), 3, size["image"], size["image"], generator=g)
        batches.append({"ids": ids, "labels": labels, "mask": mask, "pixels": pixels, "lengths": [len(i) for i, _ in rows]})
    return batches


def save_models(config: str, root: str) -> str:
    """Build the random LLaVA of ``config`` once and write it twice under ``root``: as a LLaVA-HF checkpoint
    (``hf/``) and converted to mllm-kit (``mllm-kit/``), so that every child only loads its own model from disk and
    its peak memory is that model's, not the converter's."""
    from mllm_kit.interop.llava import from_hf_llava

    os.environ["MLLM_KIT_CACHE"] = os.path.join(root, "cache")
    llava, tok = build_llava(CONFIGS[config])
    llava.save_pretrained(os.path.join(root, "hf"))
    tok.save_pretrained(os.path.join(root, "hf"))
    from_hf_llava(llava, tok, os.path.join(root, "parts")).save_pretrained(os.path.join(root, "mllm-kit"))
    return root


def to_batch(b: dict, size: dict, dtype: str, device: str) -> Batch:
    """A batch of :func:`make_batches` as mllm-kit's collator would give it (host counts included)."""
    import torch

    from mllm_kit import Batch

    images = b["pixels"].shape[0]
    pixels = b["pixels"].to(getattr(torch, dtype))
    return Batch(input_ids=b["ids"], labels=b["labels"], attention_mask=b["mask"], pixel_values=pixels,
                 images_per_sample=[1] * images, num_image_tokens=images * (size["image"] // size["patch"]) ** 2,
                 num_loss_tokens=int((b["labels"][:, 1:] != -100).sum()), row_lengths=b["lengths"]).to(device)


def count_batches(config: str, models: str, steps: int, warmup: int) -> list[dict]:
    """FLOPs, real tokens and positions of each timed batch (the ``steps`` after ``warmup``), counted once with
    mllm-kit's model: every child builds the same seeded batches (:func:`make_batches`), so batch k is the same work in
    every process. ``model`` / ``llm_only`` are what mllm-kit computes (LM head at the supervised rows); ``hf_*`` the
    same model with the head on every position, as transformers' LLaVA computes it."""
    from transformers import AutoTokenizer

    from mllm_kit import MLLM
    from mllm_kit.flops import StepFlops

    size = CONFIGS[config]
    os.environ["MLLM_KIT_CACHE"] = os.path.join(models, "cache")
    tok = AutoTokenizer.from_pretrained(os.path.join(models, "hf"))
    model = MLLM.from_pretrained(os.path.join(models, "mllm-kit")).train()
    model.encoder.requires_grad_(False)
    counter = StepFlops(model)
    counts = []
    for data in make_batches(size, model.image_token_id, tok.pad_token_id, steps + warmup)[warmup:]:
        b = to_batch(data, size, "float32", "cpu")
        ours, everywhere = counter(b), counter(b, head_rows=b.input_ids.numel())
        counts.append({"model": ours.model_flops, "llm_only": ours.without_vision.model_flops, "hf_model": everywhere.model_flops,
                       "hf_llm_only": everywhere.without_vision.model_flops, "tokens": sum(b.row_lengths),
                       "positions": int(b.input_ids.numel())})
    return counts


def run_variant(variant: str, config: str, models: str, device: str, dtype: str, steps: int, warmup: int) -> dict:
    """One process: load the variant from ``models`` (:func:`save_models`), run ``warmup`` + ``steps`` steps on the
    seeded batches, report the seconds of each timed step (batch order) and the steps' peak memory."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from mllm_kit import MLLM
    from mllm_kit.objectives.lm import LMObjective

    size = CONFIGS[config]
    os.environ["MLLM_KIT_CACHE"] = os.path.join(models, "cache")
    tok = AutoTokenizer.from_pretrained(os.path.join(models, "hf"))
    if variant == "hf":
        model = LlavaForConditionalGeneration.from_pretrained(os.path.join(models, "hf"), dtype=torch.float32)
        model.model.vision_tower.requires_grad_(False)
        image_token_id = model.config.image_token_index
    else:
        model = MLLM.from_pretrained(os.path.join(models, "mllm-kit"))
        model.encoder.requires_grad_(False)
        image_token_id = model.image_token_id
        if variant == "compiled":  # what trainer.compile does; the warm-up steps include the compilation
            model.compile_blocks()
    batches = [to_batch(b, size, dtype, device) for b in make_batches(size, image_token_id, tok.pad_token_id, steps + warmup)]
    model.to(device=device, dtype=getattr(torch, dtype)).train()
    if variant == "bf16-encoder":  # what the encoder's `dtype: bfloat16` option gives
        model.encoder.to(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    objective = LMObjective()
    it = iter(batches)

    def step() -> None:
        b = next(it)
        if variant == "hf":
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, labels=b.labels).loss
        else:
            loss = objective(model(b), b, None)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    seconds = seconds_each({variant: step}, steps, warmup, device)[variant]
    return {"variant": variant, "seconds": seconds, "peak_mib": peak_memory_mib(device),
            "params": sum(p.numel() for p in model.parameters())}


def summarise(config: str, runs: dict[str, list[dict]], counts: list[dict], peak: float, peak_source: str) -> dict:
    """Per process, the timed steps' total time against the total FLOPs of the same batches (``counts``, in batch
    order: :func:`count_batches`) — so a ratio or an MFU never pairs one batch's time with another batch's FLOPs;
    then min / median over the repeats. Each variant's MFU uses its own FLOP count (transformers': head on every row);
    ``vs_hf`` divides a variant's step time and peak memory by transformers' (min by min, median by median)."""
    out = {"config": config, "size": CONFIGS[config], "peak_tflops": peak / 1e12, "peak_source": peak_source, "variants": {}}
    tokens, positions = sum(c["tokens"] for c in counts), sum(c["positions"] for c in counts)
    for variant, rows in runs.items():
        model_key, llm_key = ("hf_model", "hf_llm_only") if variant == "hf" else ("model", "llm_only")
        flops, llm_only = sum(c[model_key] for c in counts), sum(c[llm_key] for c in counts)
        for r in rows:
            if len(r["seconds"]) != len(counts):
                raise SystemExit(f"{variant} timed {len(r['seconds'])} steps; {len(counts)} batches were counted.")
        total = [sum(r["seconds"]) for r in rows]
        step = [t / len(counts) for t in total]
        out["variants"][variant] = {
            "step_s": {"min": min(step), "median": statistics.median(step)},
            "tokens_per_s": {"max": tokens / min(total), "median": statistics.median(tokens / t for t in total)},
            "tflops": {"max": flops / min(total) / 1e12, "median": statistics.median(flops / t for t in total) / 1e12},
            "mfu": {"max": flops / min(total) / peak, "median": statistics.median(flops / t for t in total) / peak},
            "mfu_llm_only": {"median": statistics.median(llm_only / t for t in total) / peak},
            "model_flops_per_step": flops / len(counts),
            "peak_mib": {"min": min(r["peak_mib"] for r in rows), "median": statistics.median(r["peak_mib"] for r in rows)},
            "params": rows[0]["params"],
            "padding_waste": 1 - tokens / positions,
        }
    if "hf" in runs:
        hf = out["variants"]["hf"]
        for variant, v in out["variants"].items():
            if variant != "hf":
                v["vs_hf"] = {"step_s": {k: v["step_s"][k] / hf["step_s"][k] for k in ("min", "median")},
                              "peak_mib": {k: v["peak_mib"][k] / hf["peak_mib"][k] for k in ("min", "median")}}
    return out


def print_table(summary: dict, device: str) -> None:
    print(f"\n{summary['config']} on {device}: peak {summary['peak_tflops']:.3f} TFLOP/s ({summary['peak_source']})")
    print("| variant | params | step time (s) min / median | tokens/s | TFLOP/s | MFU | MFU, LLM only | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, v in summary["variants"].items():
        print(f"| {VARIANTS[variant]} | {v['params'] / 1e6:.1f}M | {v['step_s']['min']:.3f} / {v['step_s']['median']:.3f} | "
              f"{v['tokens_per_s']['median']:,.0f} | {v['tflops']['median']:.3f} | {v['mfu']['median']:.1%} | "
              f"{v['mfu_llm_only']['median']:.1%} | {v['peak_mib']['median']:,.0f} |")
    for variant, v in summary["variants"].items():
        if "vs_hf" in v:
            r = v["vs_hf"]
            print(f"{VARIANTS[variant]} / transformers: step time {r['step_s']['min']:.3f}× (min) / "
                  f"{r['step_s']['median']:.3f}× (median), peak memory {r['peak_mib']['min']:.3f}× / "
                  f"{r['peak_mib']['median']:.3f}×")


def main() -> None:
    parser = timing_parser(__doc__, steps=5, warmup=2)
    parser.add_argument("--config", nargs="+", default=["llava-100m", "qwen2-152k"], choices=sorted(CONFIGS))
    parser.add_argument("--compare", choices=["hf"], help="also run transformers' LlavaForConditionalGeneration")
    parser.add_argument("--compile", action="store_true", help="also run mllm-kit with its blocks compiled (trainer.compile)")
    parser.add_argument("--bf16-encoder", action="store_true", help="also run mllm-kit with the frozen encoder held in bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin repeats, one process per variant each")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "CONFIG", "MODELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    import torch

    torch.set_num_threads(threads)
    if args.child:
        print(json.dumps(run_variant(*args.child, args.device, args.dtype, args.steps, args.warmup)))
        return
    from mllm_kit.training.perf import peak_flops

    precision = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true"}[args.dtype]
    peak = peak_flops(args.device, precision)
    if peak.flops is None:
        raise SystemExit(f"no peak FLOP/s for this device ({peak.source}).")
    print(f"peak: {peak.flops / 1e12:.3f} TFLOP/s ({peak.source})")
    variants = ["mllm-kit", *(["compiled"] if args.compile else []), *(["bf16-encoder"] if args.bf16_encoder else []),
                *([args.compare] if args.compare else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    results = []
    for config in args.config:
        with tempfile.TemporaryDirectory() as tmp:
            models = save_models(config, tmp)
            counts = count_batches(config, models, args.steps, args.warmup)
            options = ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(threads)]
            commands = {variant: [sys.executable, __file__, "--child", variant, config, models, *options] for variant in variants}
            runs = processes_each(commands, args.repeats, env)
        summary = summarise(config, runs, counts, peak.flops, peak.source)
        summary.update(device=args.device, dtype=args.dtype, threads=threads, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        print_table(summary, args.device)
        results.append(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
