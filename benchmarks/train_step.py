"""Training-step time of mllm-kit vs transformers' LlavaForConditionalGeneration, same weights and batches.

Both run in a plain PyTorch loop (forward, next-token loss on supervised tokens, backward, AdamW step),
with the vision tower frozen and the projector + LLM trained, as in LLaVA's SFT stage. Each variant runs in
its own process so peak memory is its own (the training steps' peak: peak RSS on CPU, max allocated on CUDA, reset
after the model is built). The two variants alternate, one process each per round, for ``--repeats`` rounds
(``timing.processes_each``); a process reports its median step time over ``--steps`` steps after ``--warmup``, and
the table gives the min / median of those over the rounds.

    python benchmarks/train_step.py                 # both sizes, CPU
    python benchmarks/train_step.py --device cuda   # on a GPU
    python benchmarks/train_step.py --sizes tiny --steps 2 --warmup 1 --repeats 1   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from timing import peak_memory_mib, processes_each, reset_peak_memory, timing_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    # name: (vision hidden, vision layers, image, patch, llm hidden, llm layers, heads, intermediate, batch, text tokens)
    "tiny": {"v_hidden": 64, "v_layers": 2, "image": 32, "patch": 8, "hidden": 64, "layers": 2, "heads": 4, "inter": 128,
             "batch": 8, "text": 112},
    "20M": {"v_hidden": 256, "v_layers": 4, "image": 64, "patch": 8, "hidden": 512, "layers": 4, "heads": 8, "inter": 1376,
            "batch": 8, "text": 192},
}


def build_llava(size: dict):
    """A random LLaVA of ``size``; optional keys: ``family`` (llama, qwen2), ``vocab`` (default: the tiny tokenizer's;
    a larger one keeps the tokenizer and widens embeddings and head), ``kv_heads``, ``v_heads``, ``tie``."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from mllm_kit.tiny import tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    vision = CLIPVisionConfig(image_size=size["image"], patch_size=size["patch"], hidden_size=size["v_hidden"], intermediate_size=4 * size["v_hidden"],
                              num_hidden_layers=size["v_layers"], num_attention_heads=size.get("v_heads", 4))
    text_config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[size.get("family", "llama")]
    text = text_config(vocab_size=size.get("vocab", len(tok)), hidden_size=size["hidden"], intermediate_size=size["inter"],
                       num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                       num_key_value_heads=size.get("kv_heads", size["heads"]), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=size.get("tie", False))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), tok


def make_batches(size: dict, image_token_id: int, n: int):
    import torch

    g = torch.Generator().manual_seed(1)
    tokens = (size["image"] // size["patch"]) ** 2
    batches = []
    for _ in range(n):
        text = torch.randint(10, 300, (size["batch"], size["text"]), generator=g)
        ids = torch.cat([text[:, :4], torch.full((size["batch"], tokens), image_token_id), text[:, 4:]], dim=1)
        labels = ids.clone()
        labels[:, : 4 + tokens + size["text"] // 2] = -100
        batches.append((ids, labels, torch.randn(size["batch"], 3, size["image"], size["image"], generator=g)))
    return batches


def run_variant(variant: str, size_name: str, device: str, steps: int, warmup: int) -> dict:
    import torch

    from mllm_kit import Batch
    from mllm_kit.interop.llava import from_hf_llava
    from mllm_kit.objectives.lm import LMObjective

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size = SIZES[size_name]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLLM_KIT_CACHE"] = tmp
        llava, tok = build_llava(size)
        image_token_id = llava.config.image_token_index
        if variant == "transformers":
            model = llava
            model.model.vision_tower.requires_grad_(False)
        else:
            model = from_hf_llava(llava, tok, tmp)
            del llava
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        objective = LMObjective()
        batches = make_batches(size, image_token_id, steps + warmup)
        times = []
        reset_peak_memory(device)
        for i, (ids, labels, pixels) in enumerate(batches):
            ids, labels, pixels = ids.to(device), labels.to(device), pixels.to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if variant == "transformers":
                loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
            else:
                batch = Batch(input_ids=ids, labels=labels, pixel_values=pixels, num_image_tokens=int(pixels.shape[0]) * model.tokens_per_image())
                loss = objective(model(batch), batch, None)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        peak = peak_memory_mib(device)
        n_params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "size": size_name, "median_ms": 1000 * statistics.median(times), "peak_mb": peak, "params": n_params}


def main() -> None:
    parser = timing_parser(__doc__, steps=30, warmup=5)
    parser.add_argument("--sizes", default="tiny,20M")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once, in a process of its own")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.size, args.device, args.steps, args.warmup)))
        return
    for size in args.sizes.split(","):
        commands = {variant: [sys.executable, __file__, "--variant", variant, "--size", size, "--device", args.device,
                              "--steps", str(args.steps), "--warmup", str(args.warmup)]
                    for variant in ("transformers", "mllm-kit")}
        runs = processes_each(commands, args.repeats)
        step = {v: [r["median_ms"] for r in rows] for v, rows in runs.items()}
        peak = {v: statistics.median(r["peak_mb"] for r in rows) for v, rows in runs.items()}
        hf, ours = step["transformers"], step["mllm-kit"]
        print(f"{size:>5} ({runs['mllm-kit'][0]['params'] / 1e6:.1f}M params, {args.device}, median step over {args.steps} "
              f"steps, min / median of {args.repeats} rounds): transformers {min(hf):.1f} / {statistics.median(hf):.1f} ms, "
              f"mllm-kit {min(ours):.1f} / {statistics.median(ours):.1f} ms, ratio {min(ours) / min(hf):.3f} / "
              f"{statistics.median(ours) / statistics.median(hf):.3f}; peak memory {peak['transformers']:.0f} MB vs "
              f"{peak['mllm-kit']:.0f} MB")


if __name__ == "__main__":
    main()
