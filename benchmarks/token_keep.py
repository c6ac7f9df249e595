"""Which image tokens a token-dropping method keeps, on a finished synthetic-shapes run (docs/zoo.md, the FastV rows).

The synthetic images are one or more flat-coloured shapes on a grey background (235 ± noise), so each 8×8 patch's
share of shape pixels is read off the image: *interior* patches (all shape), *edge* patches (part shape, part
background — where a circle, a square and a triangle differ) and *background* patches. For each method, over the
held-out questions: the fraction of each kind kept at the drop layer, and the share of images (with two or more interior
patches) whose interior is kept whole or dropped whole — a flat-coloured interior gives identical tokens, which an
attention score ranks together.

    python benchmarks/token_keep.py runs/learning-eff/eff_dense --ratios 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from mllm_kit import MLLM
from mllm_kit.inference import Generator, Prompt
from mllm_kit.training.state import finished_stage, read_run

SHAPE_DISTANCE = 40  # a pixel farther than this from the background grey (235, noise ≤ 20) is shape


def patch_kinds(image: Path, patch: int, size: int) -> np.ndarray:
    """``[grid²]``: 0 background, 1 edge, 2 interior, per patch of the image resized as the encoder sees it."""
    pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size)), dtype=np.int32)
    shape = (np.abs(pixels - 235).max(axis=-1) > SHAPE_DISTANCE).astype(np.float32)
    grid = size // patch
    share = shape.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)
    return np.where(share == 0, 0, np.where(share == 1, 2, 1))


def kept(model: MLLM, generator: Generator, prompts: list[Prompt]) -> list[np.ndarray]:
    """For each prompt, a ``[N]`` bool of its image tokens kept at the first drop."""
    batch = generator.batch(generator.samples(prompts))
    embeds, ctx = model.embed_inputs(batch)
    steps = model.layer_steps(ctx)
    with torch.no_grad(), model.llm.stepping(ctx, steps) as call:
        model.llm.model.get_decoder()(inputs_embeds=embeds, attention_mask=ctx.attention_mask, use_cache=False)
    index = call.streams[0].index
    rows, cols = ctx.image_positions
    n = model.tokens_per_image()
    out = []
    for k in range(len(prompts)):
        positions = cols[rows == k]
        out.append(np.isin(positions.numpy(), index[k].numpy()))
    assert all(len(o) == n for o in out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run = Path(args.run)
    recipe, state = read_run(run)
    stage = finished_stage(recipe, state, None)
    generator = Generator.from_run(run, stage.name)
    model = generator.model
    data_dir = next((run / "data").glob("synthetic-*"))
    records = json.loads((data_dir / "eval.json").read_text())[: args.samples]
    encoder = model.encoder
    kinds = [patch_kinds(data_dir / r["image"], encoder.patch_size, encoder.image_size) for r in records]
    prompts = [Prompt(r["conversations"][0]["value"].replace("<image>\n", ""), [data_dir / r["image"]], id=r["id"]) for r in records]
    print(f"{run}: {len(records)} held-out questions; patches per image: "
          f"{np.mean([np.mean(k == 2) for k in kinds]):.2f} interior, {np.mean([np.mean(k == 1) for k in kinds]):.2f} edge, "
          f"{np.mean([np.mean(k == 0) for k in kinds]):.2f} background")
    print("| method | R | interior kept | edge kept | background kept | interior all kept | interior all dropped |")
    print("|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        fastv = {"method": "fastv", "layer": args.layer, "ratio": ratio}
        for name, spec in (("fastv", fastv), ("random", {"method": "random", "like": fastv})):
            model.set_efficiency(spec)
            torch.manual_seed(args.seed)
            masks = [m for start in range(0, len(prompts), 50) for m in kept(model, generator, prompts[start : start + 50])]
            share = {kind: np.mean(np.concatenate([m[k == kind] for m, k in zip(masks, kinds)])) for kind in (2, 1, 0)}
            interiors = [m[k == 2] for m, k in zip(masks, kinds) if (k == 2).sum() >= 2]
            whole = np.mean([i.all() for i in interiors])
            none = np.mean([not i.any() for i in interiors])
            print(f"| {name} | {ratio} | {share[2]:.3f} | {share[1]:.3f} | {share[0]:.3f} | {whole:.3f} | {none:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
