"""Generation throughput of mllm-kit vs transformers' LlavaForConditionalGeneration.generate, same weights and prompts.

Both decode greedily with a KV cache, ``min_new_tokens = max_new_tokens`` so every row produces the same number of
tokens, left-padded prompts of mixed lengths with one image each. The two run round-robin in one process (drift in
the machine's speed falls on both alike); the greedy tokens must be equal, or the comparison is void.

    python benchmarks/generate.py                  # 20M config, CPU
    python benchmarks/generate.py --device cuda
"""

from __future__ import annotations

import os
import statistics

from timing import seconds_each, timing_parser
from train_step import SIZES, build_llava

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prompts(size: dict, image_token_id: int, pad_id: int, batch: int, device: str):
    """Left-padded ``[B, T]`` ids (text lengths 24..24+8(B-1), one image each), attention mask and pixels."""
    import torch

    g = torch.Generator().manual_seed(0)
    n_img = (size["image"] // size["patch"]) ** 2
    rows = [torch.cat([torch.randint(10, 300, (4,), generator=g), torch.full((n_img,), image_token_id),
                       torch.randint(10, 300, (20 + 8 * k,), generator=g)]) for k in range(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), pad_id)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r):], mask[k, width - len(r):] = r, 1
    pixels = torch.randn(batch, 3, size["image"], size["image"], generator=g)
    return ids.to(device), mask.to(device), pixels.to(device)


def main() -> None:
    import tempfile

    import torch

    from mllm_kit.interop.llava import from_hf_llava

    parser = timing_parser(__doc__, steps=5, warmup=1)
    parser.add_argument("--size", default="20M", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLLM_KIT_CACHE"] = tmp
        llava, tok = build_llava(size)
        ours = from_hf_llava(llava, tok, tmp).to(args.device).eval()
        llava.to(args.device).eval()
        ids, mask, pixels = prompts(size, llava.config.image_token_index, tok.pad_token_id, args.batch, args.device)
        n = args.new_tokens
        common = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out: dict[str, torch.Tensor] = {}

        def run_hf() -> None:
            with torch.no_grad():
                out["transformers"] = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **common)[:, ids.shape[1]:]

        def run_ours() -> None:
            out["mllm-kit"] = ours.generate(ids, mask, pixels, max_new_tokens=n, min_new_tokens=n)

        times = seconds_each({"transformers": run_hf, "mllm-kit": run_ours}, args.steps, args.warmup, args.device)
    if not torch.equal(out["transformers"], out["mllm-kit"]):
        raise SystemExit("greedy tokens differ between mllm-kit and transformers: the comparison is void")
    tokens = args.batch * n
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = {k: tokens / min(v) for k, v in times.items()}
    for k in times:
        print(f"{k:>12}: {rate[k]:8.1f} tokens/s median, {best[k]:8.1f} best of {len(times[k])}")
    print(f"mllm-kit / transformers: {rate['mllm-kit'] / rate['transformers']:.3f} (median), "
          f"{best['mllm-kit'] / best['transformers']:.3f} (best); {args.size}, batch {args.batch}, {n} new tokens, {args.device}")


if __name__ == "__main__":
    main()
