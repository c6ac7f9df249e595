"""A mixture's encoder cost against the sum of its members', and AnyRes's padding waste on mixed image sizes.

    python benchmarks/mixture_cost.py                  # CPU; medians of round-robin repeats, JSON to stdout
    python benchmarks/mixture_cost.py --anyres-only    # the AnyRes counts alone (deterministic, a second)

Members are random towers built from configs (CLIP-B/16-shaped at 224 px and a DINOv2-S/14-shaped one at 224 px):
the mixture runs each once per image, so its forward should cost the sum of the members' (≤ 1.05× is the target;
the split of the flattened pixels into member views is free). AnyRes: for random image sizes, the crops a batch
carries (Σ rows·cols per image, never padded to the largest grid) and the fraction of crop pixels that are black
padding inside each image's canvas (the rows/columns `unpad` then drops from the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import seconds_each

from mllm_kit.config import resolve_component
from mllm_kit.connectors.anyres import LLAVA_NEXT_PINPOINTS
from mllm_kit.data.transforms import best_grid, pinpoint_grids
from mllm_kit.registry import ENCODERS

CLIP_B = {"name": "hf_clip", "config": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                                         "num_hidden_layers": 12, "num_attention_heads": 12}}
DINO_S = {"name": "hf_dinov2", "image_size": 224, "config": {"image_size": 224, "patch_size": 14, "hidden_size": 384,
                                                              "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4}}


@torch.no_grad()
def encoder_cost(batch: int = 8, repeats: int = 15) -> dict:
    """Each round runs both members alone (one callable, as a mixture would if it added nothing) and the mixture; the
    median of the per-round ratios cancels the machine's drift between rounds."""
    torch.manual_seed(0)
    clip, dino = (ENCODERS.build(resolve_component("encoders", s)) for s in (CLIP_B, DINO_S))
    mix = ENCODERS.build(resolve_component("encoders", {"name": "mixture", "members": {"clip": CLIP_B, "dino": DINO_S}}))
    mix.members["clip"].load_state_dict(clip.state_dict())
    mix.members["dino"].load_state_dict(dino.state_dict())
    a, b = torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 224, 224)
    flat = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
    runs = {"members": lambda: (clip(a), dino(b)), "mixture": lambda: mix.features(flat)}
    s = seconds_each(runs, steps=repeats, warmup=1, device="cpu")
    ratios = [m / alone for m, alone in zip(s["mixture"], s["members"])]
    return {"batch": batch, "repeats": repeats,
            "members_ms": {"min": round(1000 * min(s["members"])), "median": round(1000 * statistics.median(s["members"]))},
            "mixture_ms": {"min": round(1000 * min(s["mixture"])), "median": round(1000 * statistics.median(s["mixture"]))},
            "ratio": {"min_over_min": round(min(s["mixture"]) / min(s["members"]), 3),
                      "median_of_rounds": round(statistics.median(ratios), 3),
                      "max_of_rounds": round(max(ratios), 3)}}


def anyres_waste(samples: int = 2000, crop: int = 336) -> dict:
    g = torch.Generator().manual_seed(0)
    grids = pinpoint_grids(LLAVA_NEXT_PINPOINTS, crop)
    crops, pixels, content = 0, 0, 0.0
    largest = 0
    for w, h in torch.randint(100, 1600, (samples, 2), generator=g).tolist():
        rows, cols = best_grid(w, h, crop, grids)
        crops += rows * cols
        largest = max(largest, rows * cols)
        scale = min(cols * crop / w, rows * crop / h)
        pixels += rows * cols * crop * crop
        content += min(w * scale, cols * crop) * min(h * scale, rows * crop)
    return {"images": samples, "crops": crops, "crops_if_padded_to_largest_grid": samples * largest,
            "padding_fraction_of_crop_pixels": round(1 - content / pixels, 4)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="timed round-robin rounds of members and mixture")
    parser.add_argument("--anyres-only", action="store_true", help="skip the timing")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = {} if args.anyres_only else {"encoder_cost": encoder_cost(repeats=args.rounds)}
    print(json.dumps({**result, "anyres": anyres_waste()}, indent=2))
