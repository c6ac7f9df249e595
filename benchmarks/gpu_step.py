"""MFU of a packed SFT step at published shapes, on one accelerator (``benchmarks/gpu.sh`` runs it).

The model is built from configs with random weights directly on the device, in the chosen dtype (nothing is
downloaded or written): LLaVA-1.5-7B's shape (CLIP ViT-L/14-336, ``mlp2x_gelu``, a Llama-7B body, vision tower frozen,
projector + LLM trained) and a Qwen2-0.5B-class model (the same tower, Qwen2-0.5B's body, tied 152K vocabulary).
Rows are packed to ``--pack`` tokens by mllm-kit's own collator (one image of 576 tokens + 64-1024 text tokens per
sample, the second half of the text supervised); attention is flash-attention-2 when installed, else SDPA; every
decoder layer is checkpointed. FLOPs are :mod:`mllm_kit.flops`' closed form (packed attention by each sample's
length), MFU against the device's dense peak for the dtype; reported with and without the vision tower's FLOPs.

    python benchmarks/gpu_step.py --config llava15-7b --json out.json           # on a GPU
    python benchmarks/gpu_step.py --config tiny --device cpu --dtype float32     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                  patch_size=14, hidden_act="quick_gelu", projection_dim=768)
CONFIGS = {
    "llava15-7b": dict(vision=CLIP_L_336, family="llama", llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
                       rows=1),
    "qwen2-0.5b": dict(vision=CLIP_L_336, family="qwen2", llm=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True), rows=4),
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                             patch_size=14), family="llama",
                 llm=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2), rows=2),
}


def build(config: dict, dtype: str, device: str, attn: str):
    from mllm_kit import MLLM
    from mllm_kit.tiny import tiny_tokenizer

    vision = dict(config["vision"])
    llm = {"model_type": config["family"], **config["llm"]}
    with torch.device(device):
        model = MLLM.build({"name": "hf_clip", "config": vision, "select_layer": -2, "dtype": dtype},
                           {"name": "mlp", "depth": 2, "act": "gelu"},
                           {"name": "hf_causal_lm", "config": llm, "tokenizer": str(tiny_tokenizer()), "dtype": dtype,
                            "attn_implementation": attn})
    return model.to(device=device, dtype=getattr(torch, dtype))


def packed_batches(model, n: int, rows: int, pack: int, device: str, dtype: str):
    from mllm_kit.batch import IGNORE_INDEX
    from mllm_kit.data.dataset import Sample
    from mllm_kit.data.packing import PackCollator, first_fit_decreasing

    g = torch.Generator().manual_seed(0)
    n_img, size = model.tokens_per_image(), model.encoder.image_size
    collate = PackCollator(model.tokenizer.pad_token_id, max_length=pack)
    out = []
    for _ in range(n):
        samples: list[Sample] = []
        while sum(len(s.input_ids) for s in samples) < rows * pack * 0.9:
            text = int(torch.randint(64, 1025, (1,), generator=g))
            if n_img + text > pack:
                continue
            ids = torch.cat([torch.full((n_img,), model.image_token_id), torch.randint(10, 300, (text,), generator=g)])
            labels = ids.clone()
            labels[: n_img + text // 2] = IGNORE_INDEX
            samples.append(Sample(ids, labels, torch.randn(1, 3, size, size, generator=g), n_img, str(len(samples))))
        sizes = [(len(s.input_ids), 1) for s in samples]
        groups = first_fit_decreasing(sizes, range(len(samples)), pack)[:rows]
        out.append(collate([[samples[i] for i in group] for group in groups]).to(device))
        out[-1].pixel_values = out[-1].pixel_values.to(getattr(torch, dtype))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llava15-7b", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--pack", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    from mllm_kit.flops import StepFlops
    from mllm_kit.objectives.lm import LMObjective
    from mllm_kit.training.perf import peak_flops

    config = CONFIGS[args.config]
    attn = "flash_attention_2" if args.device.startswith("cuda") and importlib.util.find_spec("flash_attn") else "sdpa"
    model = build(config, args.dtype, args.device, attn)
    model.encoder.requires_grad_(False)
    model.enable_activation_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=args.device.startswith("cuda"))
    objective = LMObjective()
    batches = packed_batches(model, args.steps + args.warmup, config["rows"], args.pack, args.device, args.dtype)
    counter = StepFlops(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, flops = [], []
    for k, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        objective(model(batch), batch, None)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            flops.append(counter(batch))
    precision = {"bfloat16": "bf16-true", "float16": "16-true", "float32": "32-true"}[args.dtype]
    peak = peak_flops(torch.device(args.device), precision)
    median = statistics.median(times)
    count = flops[times.index(min(times))]
    tokens = statistics.median(sum(sum(n) for n in b.seq_lens) for b in batches[args.warmup:])
    result = {
        "config": args.config, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "dtype": args.dtype, "attention": attn, "pack": args.pack, "rows": config["rows"],
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
        "step_s": {"min": min(times), "median": median}, "tokens_per_s": tokens / median,
        "tflops": count.model_flops / min(times) / 1e12, "peak_tflops": (peak.flops or 0) / 1e12, "peak_source": peak.source,
        "mfu": count.model_flops / min(times) / peak.flops if peak.flops else None,
        "mfu_without_vision": count.without_vision.model_flops / min(times) / peak.flops if peak.flops else None,
        "hfu": count.hardware_flops / min(times) / peak.flops if peak.flops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
