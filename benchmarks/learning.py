"""What each component learns on the quickstart task, with the quickstart's budget.

Every variant is `recipes/quickstart.yaml` (tiny CLIP-style encoder 64 px / patch 8 → 8×8 grid, tiny Llama,
250 alignment + 900 SFT steps at batch 32, 12,000 SFT samples, 600 held-out questions) with one component
swapped in by `key=value` overrides. Options change only where the published preset cannot fit the tiny
models (a 2-block encoder, an 8×8 grid, a 2-layer LLM, or CPU time for BERT-base width); each variant says
which. Held-out accuracy is greedy generation with exact match, per task.

    python benchmarks/learning.py                       # every variant (≈ 3-6 min each on 2 CPU cores)
    python benchmarks/learning.py qformer resampler     # some of them
    python benchmarks/learning.py --list

Results go to `runs/learning/<variant>/` (the run) and `runs/learning/results.json`; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "quickstart"
MOE_CONNECTOR_AUX = "{moe_balance: 0.1, moe_z: 0.01}"

# name → (overrides, extra evaluations as connector.KEY=VALUE lists, what differs from the preset)
VARIANTS: dict[str, tuple[list[str], list[list[str]], str]] = {
    "mlp2x_gelu": ([], [], "the quickstart itself"),
    "qformer": (["model.connector={preset: qformer, num_layers: 2, hidden: 128, heads: 4, intermediate_size: 512, init_std: 0.3}"], [],
                "BLIP-2 layout (32 queries, cross-attention every 2nd layer, query FFN, ln_vision, linear out) at width 128, "
                "2 layers; init_std 0.3 (at 0.02 shape stays at chance, docs/connectors/qformer.md)"),
    "qformer_light": (["model.connector={preset: qformer_light, init_std: 0.3}"], [],
                      "preset (64 queries, 2 layers at LLM width, pre/post MLPs); init_std 0.3 (see qformer)"),
    "resampler": (["model.connector=resampler"], [], "preset (64 latents, 6 layers, 8 heads × 64)"),
    "c_abstractor": (["model.connector={preset: c_abstractor, num_queries: 16, hidden: 128}"], [],
                     "M = 16 (4×4 of the 8×8 grid), RegStage width 128, depth 3"),
    "dense_sti": (["model.connector=dense_sti"], [], "preset; layers (0, 0) of the 2-block encoder, 64 + 8 + 8 tokens"),
    "dense_sci": (["model.connector=dense_sci"], [], "preset"),
    "dense_dci": (["model.connector=dense_dci"], [], "preset; groups F_0 and F_1 of the 2-block encoder"),
    "deepstack": (["model.connector=deepstack", "model.llm.config.num_hidden_layers=5"], [],
                  "preset (2×2 crops of 64 px, stacks before LLM layers 1-4); the LLM has 5 layers instead of 2"),
    "deepstack_vit": (["model.connector={preset: deepstack_vit, num_crops: 2, start: 0}"], [],
                      "2 crops (1×2 / 2×1), stacks at blocks 0-1 of the 2-block encoder"),
    "matryoshka": (["model.connector={preset: matryoshka, scales: [64, 16, 4, 1]}", "stages.sft.objective=matryoshka"],
                   [["connector.scale=16"], ["connector.scale=4"], ["connector.scale=1"]],
                   "scales 64/16/4/1 of the 8×8 grid (pool kernels 1, 2, 4, 8); SFT averages the LM loss over scales"),
    "moe_mlp": (["model.connector=moe_mlp", f"stages.align.aux_loss_coef={MOE_CONNECTOR_AUX}",
                 f"stages.sft.aux_loss_coef={MOE_CONNECTOR_AUX}"], [], "preset (4 experts, top-2), aux 0.1 / 0.01, from scratch"),
}


def run(name: str, root: Path) -> dict:
    overrides, extra_evals, note = VARIANTS[name]
    run_dir = root / name
    cmd = [sys.executable, "-m", "mllm_kit.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    if not (run_dir / "eval.json").is_file():
        flag = ["--resume"] if (run_dir / "state.json").is_file() else []
        subprocess.run([*cmd, "fit", "--recipe", RECIPE, "--run-dir", str(run_dir), *flag, "trainer.progress=false", *overrides],
                       check=True, env=env)
    wall = time.time() - start
    result = {"variant": name, "note": note, "wall_s": round(wall, 1), **json.loads((run_dir / "eval.json").read_text())}
    result["extra"] = {}
    for options in extra_evals:
        label = "-".join(sorted(options))
        out = run_dir / f"eval-{label}.json"
        if not out.is_file():
            subprocess.run([*cmd, "eval", "--run", str(run_dir), *options], check=True, env=env)
        result["extra"][" ".join(options)] = json.loads(out.read_text())["per_task"]
    return result


def table(results: list[dict]) -> str:
    rows = ["| variant | colour | shape | wall | what differs from the preset |", "|---|---|---|---|---|"]
    for r in results:
        t = r["per_task"]
        rows.append(f"| `{r['variant']}` | {t.get('color', 0):.3f} | {t.get('shape', 0):.3f} | {r['wall_s'] / 60:.1f} min | {r['note']} |")
        for label, per_task in r["extra"].items():
            rows.append(f"| `{r['variant']}` {label} | {per_task.get('color', 0):.3f} | {per_task.get('shape', 0):.3f} | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--root", default="runs/learning")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v[2]}" for k, v in VARIANTS.items()))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    store = root / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in args.variants or list(VARIANTS):
        results[name] = run(name, root)
        store.write_text(json.dumps(results, indent=2) + "\n")
        print(table([results[name]]), flush=True)
    print(table(list(results.values())))


if __name__ == "__main__":
    main()
