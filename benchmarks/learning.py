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

Distillation (`recipes/quickstart_kd.yaml`, docs/zoo.md): one teacher run (`kd_teacher`: a Llama with 24× the student's parameters,
250 + 1200 steps), then students of the same data and steps — 250 pre-training + 150 + 150 fine-tuning steps — that
differ only in their objectives: `sft_only` (the control: L_LM in every stage), `kd_res` (+ response KL in DPT and
DFT), `kd_res_vis` (+ visual KL), `kd` (+ RDist: LLaVA-KD); the diagnostics `kd_dft_only` and `kd_res_dft_only` (DPT without the teacher);
and the LLaVA-MoD pair on an upcycled student
(`mod_sparse_lm` vs `mod_sparse_mimic`: the last stage upcycles every other FFN to 4 experts, top-2, and trains the
connector and LLM with L_LM, or with LLaVA-MoD's kd_lm mimic loss). Seeds change the student's initialisation and data order;
the teacher is seed 0's.

    python benchmarks/learning.py --seeds 0 1 2 --distill      # teacher + every student row, 3 seeds, mean ± std

Encoder mixtures and AnyRes (docs/encoders/mixtures.md, docs/zoo.md): a colour-only member (8 px, one token) and a
shape-only member (grayscale, on isoluminant colours), alone and fused by each fusion; AnyRes against the same encoder
at a fixed 16 px, on small shapes, 1800 SFT steps. The diagnostics (the same data at a 32 px base, the native 64 px
reference, the quickstart's 900 SFT steps, half the learning rate) run by name.

    python benchmarks/learning.py --seeds 0 1 2 3 4 --mixtures
    python benchmarks/learning.py --root runs/learning-diag anyres_32 anyres_32_low --seeds 0 1 2 3 4
    python benchmarks/learning.py --root runs/learning-diag anyres_native anyres_32_short anyres_32_low_short

Visual-token dropping (docs/efficiency.md, docs/zoo.md): the quickstart with a 6-layer LLM and a small-shapes task,
each trained dense (then evaluated with FastV, PDrop and their random-drop controls) and with PDrop in SFT; a table of
accuracy against the fraction of LLM FLOPs kept, with each method's paired margin over its control.

    python benchmarks/learning.py --root runs/learning-eff --seeds 0 1 2 --efficiency

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
    extra_evals: list[list[str]] = field(default_factory=list)  # override lists for `mllm-kit eval` (connector., model.efficiency)
    recipe: str = "quickstart"
    stage: str | None = None  # run only this stage, on a copy of the `mlp2x_gelu` run
    stages: str | None = None  # run these stages (--stages); "{teacher}" in overrides is the kd_teacher run


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

# Mixtures (docs/encoders/mixtures.md): a member that sees only coarse colour (the quickstart's encoder at 8 px: one
# patch, a blurred 8×8 view) and one that sees only shape (the quickstart's encoder on a grayscale image); the six
# colours are drawn at one luminance (`palette: isoluminant`), so grayscale carries no colour at all. Each member alone
# misses part of the task; their single-member rows measure how much (the 8 px view still hints at shape through its
# area). The quickstart's budget (250 + 900 steps) for every row.
_ENC = "image_size: {size}, patch_size: 8, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2"
_COLOUR = "{name: hf_clip, config: {" + _ENC.format(size=8) + "}, select_layer: -2, image_mode: resize}"
_SHAPE = "{name: hf_clip, config: {" + _ENC.format(size=64) + "}, select_layer: -2, image_mode: resize, grayscale: true}"
_MIX = "model.encoder={name: mixture, members: {colour: " + _COLOUR + ", shape: " + _SHAPE + "}}"
# COMM, MoVA and SVA take member 0 as the base (CLIP in the papers), whose grid the output keeps: here the shape
# member, with the colour token resampled to its 8×8 grid (with the colour member first, COMM sums onto one token).
_MIX_SHAPE_BASE = ("model.encoder={name: mixture, members: {shape: " + _SHAPE + ", colour: " + _COLOUR + "}, "
                   "resample: {colour: [8, 8]}}")
_ISO = ["data.synthetic.palette=isoluminant"]
_ANYRES_DATA = ("data.synthetic.tasks=[shape]", "data.synthetic.radius=[6,10]")
_STEPS = "stages.sft.optim.max_steps=1800"
_AT_16 = ["model.encoder.config.image_size=16", *_ANYRES_DATA]
_ANYRES = "model.connector={preset: anyres, pinpoints: [[32, 64], [64, 32], [64, 64]]}"
MIXTURES: dict[str, Variant] = {
    "mix_colour_only": Variant([f"model.encoder={_COLOUR}", *_ISO], "the colour member alone (8 px, 1 token) + mlp2x_gelu"),
    "mix_shape_only": Variant([f"model.encoder={_SHAPE}", *_ISO], "the grayscale member alone (64 px, 64 tokens) + mlp2x_gelu"),
    "mix_channel_concat": Variant([_MIX, "model.connector={name: channel_concat, target_grid: shape}", *_ISO],
                                  "both, the colour token resampled to 8×8 and concatenated along channels (Eagle)"),
    "mix_sequence_concat": Variant([_MIX, "model.connector=sequence_concat", *_ISO],
                                   "both, each with its own mlp2x_gelu, 1 + 64 tokens one after another"),
    "mix_comm": Variant([_MIX_SHAPE_BASE, "model.connector={name: comm, inner: mlp2x_gelu}", *_ISO],
                        "both, COMM's multi-level merge (every layer of each member, summed on the shape member's 8×8 "
                        "grid) into mlp2x_gelu"),
    "mix_mova": Variant([_MIX_SHAPE_BASE, "model.connector={name: mova, num_layers: 1, heads: 2, top_k: 1, output_side: 8}",
                         *_ISO], "shape member as MoVA's base, the colour member its one expert (top-1), 1 adapter "
                                   "block, output 8×8 (MoVA: half the base side)"),
    "mix_sva": Variant([_MIX_SHAPE_BASE, "model.connector={name: sva, query_side: 8, hidden: 64, num_layers: 2, heads: 2}",
                        *_ISO], "Cambrian's SVA: 8×8 queries, one token of each member per window, 2 layers at width 64"),
    # AnyRes (LLaVA-NeXT) against the same encoder at a fixed 16 px, on small shapes (radius 6-10 of a 64 px image):
    # the fixed view shrinks them 4× (3-5 px across: circle, square and triangle confusable); AnyRes's best-fit grid
    # for a square image is 4×4 crops of 16 px, i.e. the native 64 px. Shape questions only, 1800 SFT steps (shape is
    # the late-learnt task).
    "anyres_low": Variant([*_AT_16, _STEPS],
                          "control: the encoder at 16 px (2×2 tokens) on 64 px images of small shapes, shape questions only"),
    "anyres": Variant([*_AT_16, _ANYRES, _STEPS],
                      "AnyRes: the 16 px base view + a 4×4 grid of 16 px crops (4 + 8·9 = 76 tokens)"),
}
# The same data at a 32 px base, where the fixed view already resolves the shapes, so AnyRes has little to add; the
# native 64 px reference; and why 1800 SFT steps (the quickstart's 900) and not a lower learning rate (docs/zoo.md).
_AT_32 = ["model.encoder.config.image_size=32", *_ANYRES_DATA]
_HALF_LR = "stages.sft.optim.lr=5e-4"
MIXTURE_DIAGNOSTICS: dict[str, Variant] = {
    "anyres_32_low": Variant([*_AT_32, _STEPS], "the encoder at a fixed 32 px (4×4 tokens)"),
    "anyres_32": Variant([*_AT_32, _ANYRES, _STEPS], "AnyRes at a 32 px base: + 2×2 crops of 32 px (16 + 8·9 = 88 tokens)"),
    "anyres_native": Variant([*_ANYRES_DATA, _STEPS], "reference: the encoder at the native 64 px (8×8 tokens)"),
    "anyres_32_low_short": Variant(_AT_32, "anyres_32_low with the quickstart's 900 SFT steps"),
    "anyres_32_short": Variant([*_AT_32, _ANYRES], "anyres_32 with the quickstart's 900 SFT steps"),
    "anyres_32_half_lr": Variant([*_AT_32, _ANYRES, _STEPS, _HALF_LR], "anyres_32 at half the SFT learning rate"),
    "anyres_32_low_half_lr": Variant([*_AT_32, _STEPS, _HALF_LR], "anyres_32_low at half the SFT learning rate"),
}
VARIANTS.update(MIXTURES)
VARIANTS.update(MIXTURE_DIAGNOSTICS)

# Visual-token efficiency (docs/efficiency.md): the quickstart with a 6-layer LLM (FastV drops from layer 2, PDrop's
# boundaries scale to layers 2, 3, 4 of 6), on the quickstart task and on one where only part of the image matters:
# small shapes (radius 4-8 px of 64, 1-4 of the 64 patches), colour and side. Each dense run is evaluated as trained,
# with FastV at K 2 (R 0.25 / 0.5 / 0.75; and at K 4, a diagnostic) and PDrop (λ 0.5) applied without training, and
# with the random-drop control of each (as many tokens, at the same layers, chosen at random: the same FLOPs); the PDrop
# rows train SFT with PDrop and are evaluated with it (and with its random control).
_DEEP = "model.llm.config.num_hidden_layers=6"
_SMALL = ["data.synthetic.tasks=[color, position]", "data.synthetic.radius=[4,8]"]
_FASTV = "{{method: fastv, layer: {k}, ratio: {r}}}"
_PDROP = "{method: pdrop}"
# FastV at the paper's K 2, then at K 4 (the diagnostic: scored at layer 3 of 6 instead of layer 1; docs/zoo.md)
_DROPS = [*(_FASTV.format(k=k, r=r) for k in (2, 4) for r in (0.25, 0.5, 0.75)), _PDROP]
_EFF_EVALS = [*([f"model.efficiency={d}"] for d in _DROPS), *([f"model.efficiency={{method: random, like: {d}}}"] for d in _DROPS)]
_PDROP_EVALS = [[f"model.efficiency={{method: random, like: {_PDROP}}}"]]
EFFICIENCY: dict[str, Variant] = {
    "eff_dense": Variant([_DEEP], "6-layer LLM, trained without dropping", _EFF_EVALS),
    "eff_pdrop": Variant([_DEEP, f"stages.sft.efficiency={_PDROP}"], "6-layer LLM, SFT with PDrop (λ 0.5 at layers 2/3/4)",
                         _PDROP_EVALS),
    "eff_small_dense": Variant([_DEEP, *_SMALL], "small shapes (colour, side), 6-layer LLM, trained without dropping", _EFF_EVALS),
    "eff_small_pdrop": Variant([_DEEP, *_SMALL, f"stages.sft.efficiency={_PDROP}"], "small shapes, SFT with PDrop", _PDROP_EVALS),
}
VARIANTS.update(EFFICIENCY)
# Why PDrop-in-SFT does not learn the small shapes' side (docs/zoo.md): the same run with the kept tokens at their
# original RoPE positions instead of PDrop's renumbered ones.
EFFICIENCY_DIAGNOSTICS: dict[str, Variant] = {
    "eff_small_pdrop_original": Variant([_DEEP, *_SMALL, "stages.sft.efficiency={method: pdrop, positions: original}"],
                                        "small shapes, SFT with PDrop, kept tokens at their original positions"),
    "eff_small_random_train": Variant([_DEEP, *_SMALL, "stages.sft.efficiency={method: random, like: {method: pdrop}}"],
                                      "small shapes, SFT with PDrop's random control (as many tokens dropped, at random)"),
    "eff_small_pdrop_long": Variant([_DEEP, *_SMALL, f"stages.sft.efficiency={_PDROP}", _STEPS],
                                    "small shapes, SFT with PDrop for 1800 steps (twice the quickstart's)"),
}
VARIANTS.update(EFFICIENCY_DIAGNOSTICS)

_TEACHER = "{run: {teacher}, stage: teacher_sft}"
_LM = ["stages.dpt.teacher=null", "stages.dpt.objective=lm", "stages.dft.teacher=null", "stages.dft.objective=lm"]
# LLaVA-MoD trains only the FFNs / experts / routers in dense→sparse; at this scale the 400-step dense student is too
# weak for that (FFN-only, both rows stayed at chance on colour and shape: 0.382 overall), so the connector and the
# whole LLM train here.
_SPARSE = ["stages.dft.transforms=[{name: upcycle_moe, layers: every_other, num_experts: 4, top_k: 2, capacity_factor: 1.5}]",
           "stages.dft.aux_loss_coef={llm_moe_balance: 0.01}"]


def _kd(stages: tuple[str, ...] = ("dpt", "dft"), **terms: int) -> list[str]:
    """Overrides that make ``stages`` distil with the ``kd`` objective and these term weights; other stages: L_LM."""
    objective = "{name: kd, lm: 1, " + ", ".join(f"{k}: {v}" for k, v in terms.items()) + "}"
    plain = [o for o in _LM if o.split(".")[1] not in stages]
    return [*plain, *(f"stages.{s}.teacher={_TEACHER}" for s in stages), *(f"stages.{s}.objective={objective}" for s in stages)]


STUDENT = "dpt,sft,dft"
DISTILL: dict[str, Variant] = {
    "kd_teacher": Variant([], "the teacher: Llama 256 × 4 layers, 250 align + 1200 SFT steps", recipe="quickstart_kd",
                          stages="teacher_align,teacher_sft"),
    "sft_only": Variant(_LM, "student (Llama 64 × 2), L_LM in every stage: the control", recipe="quickstart_kd", stages=STUDENT),
    "kd_res": Variant(_kd(response=1, visual=0, relation=0), "+ response KL in DPT and DFT", recipe="quickstart_kd", stages=STUDENT),
    "kd_res_vis": Variant(_kd(response=1, visual=1, relation=0), "+ visual KL", recipe="quickstart_kd", stages=STUDENT),
    "kd": Variant(_kd(response=1, visual=1, relation=1), "+ RDist: LLaVA-KD's DPT → SFT → DFT", recipe="quickstart_kd", stages=STUDENT),
    "kd_dft_only": Variant(_kd(("dft",), response=1, visual=1, relation=1),
                           "diagnostic: DPT without the teacher (L_LM), DFT with all four terms", recipe="quickstart_kd", stages=STUDENT),
    "kd_res_dft_only": Variant(_kd(("dft",), response=1, visual=0, relation=0),
                               "diagnostic: DPT without the teacher, DFT with the response KL only", recipe="quickstart_kd",
                               stages=STUDENT),
    "mod_sparse_lm": Variant([*_LM, *_SPARSE], "upcycled student, last stage L_LM: the control", recipe="quickstart_kd", stages=STUDENT),
    "mod_sparse_mimic": Variant([*_LM, *_SPARSE, f"stages.dft.teacher={_TEACHER}", "stages.dft.objective={name: mimic, loss_type: kd_lm}"],
                                "upcycled student, last stage LLaVA-MoD's dense→sparse mimic (kd_lm)", recipe="quickstart_kd",
                                stages=STUDENT),
}
VARIANTS.update(DISTILL)


def label(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-seed{seed}"


def run(name: str, root: Path, seed: int = 0) -> dict:
    v = VARIANTS[name]
    run_dir = root / label(name, seed)
    overrides = [*v.overrides, f"trainer.seed={seed}"]
    cmd = [sys.executable, "-m", "mllm_kit.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    if "{teacher}" in " ".join(overrides):
        teacher = root / "kd_teacher"
        if not (teacher / "eval.json").is_file():
            run("kd_teacher", root, 0)
        overrides = [o.replace("{teacher}", str(teacher.resolve())) for o in overrides]
    if not (run_dir / "eval.json").is_file():
        flags = ["--resume"] if (run_dir / "state.json").is_file() else []
        if v.stages is not None:
            flags += ["--stages", v.stages]
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
        evaluated = json.loads(out.read_text())
        result["extra"][" ".join(options)] = {**evaluated["per_task"], "all": evaluated["accuracy"]}
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


def seed_table(results: dict[str, dict], names: list[str], seeds: list[int]) -> str:
    """Held-out accuracy, mean ± std over seeds (and the per-seed values) for each variant."""
    import statistics

    rows = ["| variant | seeds | accuracy mean ± std | per seed | what differs |", "|---|---|---|---|---|"]
    for name in names:
        accs = [results[label(name, s)]["accuracy"] for s in seeds if label(name, s) in results]
        if not accs:
            continue
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(f"| `{name}` | {len(accs)} | {statistics.mean(accs):.3f} ± {spread:.3f} | {', '.join(f'{a:.3f}' for a in accs)} | "
                    f"{VARIANTS[name].note} |")
    return "\n".join(rows)


def llm_flop_fractions(run_dir: Path, specs: list[str]) -> dict[str, float]:
    """Each efficiency spec's LLM forward FLOPs over the dense model's, on the run's first 64 held-out prompts (the
    closed-form count, mllm_kit.flops; the encoder, connector and LM head are the same in every row)."""
    import yaml

    from mllm_kit.flops import StepFlops
    from mllm_kit.inference import Generator, Prompt

    generator = Generator.from_run(run_dir)
    model = generator.model
    data = next((run_dir / "data").glob("synthetic-*"))
    records = json.loads((data / "eval.json").read_text())[:64]
    prompts = [Prompt(r["conversations"][0]["value"].replace("<image>\n", ""), [data / r["image"]]) for r in records]
    batch = generator.batch(generator.samples(prompts))

    def llm(spec: str | None) -> float:
        model.set_efficiency(yaml.safe_load(spec) if spec else None)
        return StepFlops(model, trainable=False)(batch, head_rows=len(batch)).parts["llm"].forward

    dense = llm(None)
    return {spec: llm(spec) / dense for spec in specs}


def efficiency_table(results: dict[str, dict], root: Path, seeds: list[int]) -> str:
    """Accuracy against the fraction of LLM FLOPs kept, mean ± std over seeds, and each method's paired margin over its
    random-drop control (same seed, same FLOPs)."""
    import statistics

    def stats(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    rows = ["| task | method | LLM FLOPs | accuracy (mean ± std) | per seed | random control | method − control (paired) |",
            "|---|---|---|---|---|---|---|"]
    for task, dense, trained in (("quickstart (colour, shape)", "eff_dense", "eff_pdrop"),
                                 ("small shapes (colour, side)", "eff_small_dense", "eff_small_pdrop")):
        runs = [results.get(label(dense, s)) for s in seeds]
        if not all(runs):
            continue
        fractions = llm_flop_fractions(root / label(dense, seeds[0]), _DROPS)
        base = [r["accuracy"] for r in runs]
        rows.append(f"| {task} | dense | 1.000 | {stats(base)} | {', '.join(f'{a:.3f}' for a in base)} | | |")
        for spec in _DROPS:
            key, control = f"model.efficiency={spec}", f"model.efficiency={{method: random, like: {spec}}}"
            if not all(key in r["extra"] and control in r["extra"] for r in runs):
                continue
            acc = [r["extra"][key]["all"] for r in runs]
            ctl = [r["extra"][control]["all"] for r in runs]
            rows.append(f"| {task} | `{spec}` | {fractions[spec]:.3f} | {stats(acc)} | {', '.join(f'{a:.3f}' for a in acc)} | "
                        f"{stats(ctl)} | {stats([a - c for a, c in zip(acc, ctl)])} |")
        pdrop = [results.get(label(trained, s)) for s in seeds]
        control = f"model.efficiency={{method: random, like: {_PDROP}}}"
        if all(pdrop) and all(control in r["extra"] for r in pdrop):
            acc, ctl = [r["accuracy"] for r in pdrop], [r["extra"][control]["all"] for r in pdrop]
            rows.append(f"| {task} | `{_PDROP}`, trained with it | {fractions[_PDROP]:.3f} | {stats(acc)} | "
                        f"{', '.join(f'{a:.3f}' for a in acc)} | {stats(ctl)} | {stats([a - c for a, c in zip(acc, ctl)])} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="variants to run (default: all but the distillation rows)")
    parser.add_argument("--root", default="runs/learning")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data and the held-out set stay fixed)")
    parser.add_argument("--seeds", type=int, nargs="+", help="several training seeds (a mean ± std table is printed)")
    parser.add_argument("--distill", action="store_true", help="the distillation rows (teacher once, students per seed)")
    parser.add_argument("--mixtures", action="store_true", help="the encoder-mixture and AnyRes rows")
    parser.add_argument("--efficiency", action="store_true", help="the visual-token dropping rows (FastV, PDrop, controls)")
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
    connectors = [n for n in VARIANTS if n not in {*DISTILL, *MIXTURES, *MIXTURE_DIAGNOSTICS, *EFFICIENCY, *EFFICIENCY_DIAGNOSTICS}]
    names = args.variants or (list(DISTILL) if args.distill else list(MIXTURES) if args.mixtures
                              else list(EFFICIENCY) if args.efficiency else connectors)
    seeds = args.seeds or [args.seed]
    for seed in seeds:
        for name in names:
            if name == "kd_teacher" and seed != 0:
                continue
            key = label(name, seed)
            results[key] = run(name, root, seed)
            store.write_text(json.dumps(results, indent=2) + "\n")
            print(table([results[key]]), flush=True)
    print(table([results[label(n, s)] for s in seeds for n in names if label(n, s) in results]))
    if len(seeds) > 1:
        print(seed_table(results, names, seeds))
    if any(n in EFFICIENCY for n in names):
        print(efficiency_table(results, root, seeds))


if __name__ == "__main__":
    main()
