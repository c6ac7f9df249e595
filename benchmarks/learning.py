"""What each component learns on the quickstart task, with the quickstart's budget.

Connector variants are `recipes/quickstart.yaml` (tiny CLIP-style encoder 64 px / patch 8 → 8×8 grid, tiny Llama,
250 alignment + 900 SFT steps at batch 32, 12,000 SFT samples, 600 held-out questions) with one component
swapped in by `key=value` overrides. Options change only where the published preset cannot fit the tiny
models (a 2-block encoder, an 8×8 grid, a 2-layer LLM, or CPU time for BERT-base width); each variant says
which. LLM-side variants add one stage (`recipes/quickstart_{moe,lora,lora_moe}.yaml`) to a copy of the finished
`mlp2x_gelu` run. Held-out accuracy is greedy generation with exact match, per task.

    python benchmarks/learning.py                       # every variant (≈ 3-6 min each on 2 CPU cores)
    python benchmarks/learning.py qformer resampler     # some of them
    python benchmarks/learning.py --seed 1 matryoshka   # another training seed (runs/learning/matryoshka-seed1)
    python benchmarks/learning.py --list

Results go to `runs/learning/<variant>/` (the run) and `runs/learning/results.json`; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MOE_CONNECTOR_AUX = "{moe_balance: 0.1, moe_z: 0.01}"


@dataclass
class Variant:
    overrides: list[str]
    note: str
    extra_evals: list[list[str]] = field(default_factory=list)  # connector.KEY=VALUE lists for `mllm-kit eval`
    recipe: str = "quickstart"
    stage: str | None = None  # run only this stage, on a copy of the `mlp2x_gelu` run


VARIANTS: dict[str, Variant] = {
    "mlp2x_gelu": Variant([], "the quickstart itself"),
    "qformer": Variant(["model.connector={preset: qformer, num_layers: 2, hidden: 128, heads: 4, intermediate_size: 512, init_std: 0.3}"],
                       "BLIP-2 layout (32 queries, cross-attention every 2nd layer, query FFN, ln_vision, linear out) at width 128, "
                       "2 layers; init_std 0.3 (at 0.02 shape stays at chance, docs/connectors/qformer.md)"),
    "qformer_light": Variant(["model.connector={preset: qformer_light, init_std: 0.3}"],
                             "preset (64 queries, 2 layers at LLM width, pre/post MLPs); init_std 0.3 (see qformer)"),
    "resampler": Variant(["model.connector=resampler"], "preset (64 latents, 6 layers, 8 heads × 64)"),
    "c_abstractor": Variant(["model.connector={preset: c_abstractor, num_queries: 16, hidden: 128}"],
                            "M = 16 (4×4 of the 8×8 grid), RegStage width 128, depth 3"),
    "dense_sti": Variant(["model.connector=dense_sti"], "preset; layers (0, 0) of the 2-block encoder, 64 + 8 + 8 tokens"),
    "dense_sci": Variant(["model.connector=dense_sci"], "preset"),
    "dense_dci": Variant(["model.connector=dense_dci"], "preset; groups F_0 and F_1 of the 2-block encoder"),
    "deepstack": Variant(["model.connector=deepstack", "model.llm.config.num_hidden_layers=5"],
                         "preset (2×2 crops of 64 px, stacks before LLM layers 1-4); the LLM has 5 layers instead of 2"),
    "deepstack_vit": Variant(["model.connector={preset: deepstack_vit, num_crops: 2, start: 0}"],
                             "2 crops (1×2 / 2×1), stacks at blocks 0-1 of the 2-block encoder"),
    "matryoshka": Variant(["model.connector={preset: matryoshka, scales: [64, 16, 4, 1]}", "stages.sft.objective=matryoshka"],
                          "scales 64/16/4/1 of the 8×8 grid (pool kernels 1, 2, 4, 8); SFT averages the LM loss over scales",
                          [["connector.scale=16"], ["connector.scale=4"], ["connector.scale=1"]]),
    "matryoshka_2": Variant(["model.connector={preset: matryoshka, scales: [64, 16]}", "stages.sft.objective=matryoshka"],
                            "scales 64/16 only: the 2×2 and 1×1 budgets of an 8×8 grid keep little shape and take half "
                            "the gradient", [["connector.scale=16"]]),
    "moe_mlp": Variant(["model.connector=moe_mlp", f"stages.align.aux_loss_coef={MOE_CONNECTOR_AUX}",
                        f"stages.sft.aux_loss_coef={MOE_CONNECTOR_AUX}"], "preset (4 experts, top-2), aux 0.1 / 0.01, from scratch"),
    "llm_moe": Variant([], "+ MoE stage: layer 0's FFN upcycled to 4 experts (top-2, capacity 1.5), FFNs + routers, 300 steps",
                       recipe="quickstart_moe", stage="moe"),
    "lora": Variant([], "+ LoRA stage (r 16, every Linear, LLM frozen) on colour, shape, count, position; 600 steps",
                    recipe="quickstart_lora", stage="lora"),
    "lora_moe": Variant([], "+ LoRA-MoE stage (4 experts r 16, instance top-2 gate, LLM frozen), same four tasks; 600 steps",
                        recipe="quickstart_lora_moe", stage="lora_moe"),
}


def label(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-seed{seed}"


def run(name: str, root: Path, seed: int = 0) -> dict:
    v = VARIANTS[name]
    run_dir = root / label(name, seed)
    overrides = [*v.overrides, f"trainer.seed={seed}"]
    cmd = [sys.executable, "-m", "mllm_kit.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    if not (run_dir / "eval.json").is_file():
        flags = ["--resume"] if (run_dir / "state.json").is_file() else []
        if v.stage is not None:
            if not (run_dir / "state.json").is_file():
                base = root / label("mlp2x_gelu", seed)
                if not (base / "eval.json").is_file():
                    run("mlp2x_gelu", root, seed)
                shutil.copytree(base, run_dir, ignore=lambda d, names: [n for n in names if n == "checkpoints"
                                                                        or (Path(d) == base and n.startswith("eval"))])
            flags = ["--stages", v.stage]
        subprocess.run([*cmd, "fit", "--recipe", v.recipe, "--run-dir", str(run_dir), *flags, "trainer.progress=false", *overrides],
                       check=True, env=env)
    wall = time.time() - start
    result = {"variant": label(name, seed), "note": v.note, "wall_s": round(wall, 1), **json.loads((run_dir / "eval.json").read_text())}
    result["extra"] = {}
    for options in v.extra_evals:
        out = run_dir / ("-".join(["eval", *sorted(options)]) + ".json")
        if not out.is_file():
            subprocess.run([*cmd, "eval", "--run", str(run_dir), *options], check=True, env=env)
        result["extra"][" ".join(options)] = json.loads(out.read_text())["per_task"]
    return result


def table(results: list[dict]) -> str:
    tasks = sorted({t for r in results for t in r["per_task"]}, key=["color", "shape", "count", "position"].index)
    rows = [f"| variant | {' | '.join(tasks)} | wall | what differs from the preset |", "|---" * (len(tasks) + 3) + "|"]
    for r in results:
        cells = " | ".join(f"{r['per_task'][t]:.3f}" if t in r["per_task"] else "" for t in tasks)
        rows.append(f"| `{r['variant']}` | {cells} | {r['wall_s'] / 60:.1f} min | {r['note']} |")
        for label, per_task in r["extra"].items():
            cells = " | ".join(f"{per_task[t]:.3f}" if t in per_task else "" for t in tasks)
            rows.append(f"| `{r['variant']}` {label} | {cells} | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--root", default="runs/learning")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data and the held-out set stay fixed)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v.note}" for k, v in VARIANTS.items()))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    store = root / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in args.variants or list(VARIANTS):
        key = label(name, args.seed)
        results[key] = run(name, root, args.seed)
        store.write_text(json.dumps(results, indent=2) + "\n")
        print(table([results[key]]), flush=True)
    print(table(list(results.values())))


if __name__ == "__main__":
    main()
