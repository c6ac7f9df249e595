"""The mllm-kit command line, end to end on tiny models (--smoke)."""

import json

import pytest

from mllm_kit import MLLM
from mllm_kit.cli.main import main
from mllm_kit.config.presets import list_presets
from mllm_kit.config import load_recipe


def test_recipes_lists_the_zoo(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "llava15" in out and "align → sft" in out


def test_components_lists_registries_and_presets(capsys):
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    for name in ("hf_clip", "timm", "mlp", "hf_causal_lm", "vicuna_v1", "lm", "clip_vit_l14_336", "mlp2x_gelu"):
        assert name in out


@pytest.fixture(scope="module")
def llava15_smoke(tmp_path_factory):
    run = tmp_path_factory.mktemp("llava15")
    assert main(["fit", "--recipe", "llava15", "--smoke", "--run-dir", str(run), "trainer.progress=false"]) == 0
    return run


def test_llava15_smoke_runs_every_stage(llava15_smoke):
    state = json.loads((llava15_smoke / "state.json").read_text())["stages"]
    assert [state[s]["status"] for s in ("align", "sft")] == ["done", "done"]
    assert (llava15_smoke / "sft" / "final" / "mllm.json").is_file()
    assert (llava15_smoke / "align" / "checkpoints" / "last.ckpt").is_file()
    assert (llava15_smoke / "sft" / "logs" / "metrics.csv").is_file()
    assert any((llava15_smoke / "sft" / "logs").glob("events.out.tfevents.*"))
    resolved = (llava15_smoke / "recipe.yaml").read_text()
    assert "vicuna_v1" in resolved and "plain" in resolved


def test_eval_and_report(llava15_smoke, capsys):
    assert main(["eval", "--run", str(llava15_smoke)]) == 2  # llava15 names no eval data, so there is nothing to evaluate
    assert "names no eval data (data.eval)" in capsys.readouterr().err
    assert main(["eval", "--run", str(llava15_smoke), "data.eval=synthetic:eval"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    result = json.loads((llava15_smoke / "eval-data.eval=synthetic:eval.json").read_text())
    assert result["stage"] == "sft" and result["num_samples"] == 16 and result["loss"] > 0
    assert main(["report", str(llava15_smoke)]) == 0
    assert (llava15_smoke / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_and_predict_take_an_efficiency_method(llava15_smoke, tmp_path, capsys):
    """``model.efficiency...`` overrides of eval, eval --bench and predict on a run trained without one (docs/efficiency.md)."""
    args = ["eval", "--run", str(llava15_smoke), "data.eval=synthetic:eval", "model.efficiency=fastv", "model.efficiency.layer=1"]
    assert main(args) == 0
    result = json.loads(next(llava15_smoke.glob("eval-*model.efficiency.layer=1*.json")).read_text())
    assert result["overrides"]["efficiency"] == {"method": "fastv", "layer": 1}
    assert main(["eval", "--run", str(llava15_smoke), "data.eval=synthetic:eval", "model.efficiency.layer=1"]) == 2
    assert "uses no efficiency method whose options could change" in capsys.readouterr().err
    assert main(["eval", "--run", str(llava15_smoke), "data.eval=synthetic:eval", "model.efficiency=fastv", "model.efficiency.layer=9"]) == 2
    assert "model.efficiency: drops tokens from LLM layer 9, but the LLM has 2 decoder layers" in capsys.readouterr().err
    assert main(["eval", "--run", str(llava15_smoke), "--bench", "synthetic=synthetic:eval", "--limit", "4", "--out", str(tmp_path / "b"),
                 "model.efficiency=pdrop"]) == 0
    config = json.loads(next((tmp_path / "b").glob("*_results.json")).read_text())["config"]
    assert config["efficiency"]["name"] == "pdrop" and config["timing"]["prompts"] == 4
    assert "prefill" in capsys.readouterr().out
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "What color?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["predict", "--run", str(llava15_smoke), "--data", str(questions), "--out", str(out), "--max-new-tokens", "2",
                 "model.efficiency=fastv", "model.efficiency.layer=1"]) == 0
    assert json.loads(out.read_text())["id"] == "1"


def test_existing_run_needs_resume(llava15_smoke, capsys):
    assert main(["fit", "--recipe", "llava15", "--smoke", "--run-dir", str(llava15_smoke)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_data_inspect_marks_supervised_spans(tmp_path, capsys):
    assert main(["data", "inspect", "--recipe", "llava15", "--smoke", "--stage", "sft", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ASSISTANT:" in out and "[[" in out and "<image×16>" in out


def test_bad_recipe_key_is_a_clean_error(tmp_path, capsys):
    assert main(["fit", "--recipe", "quickstart", "--run-dir", str(tmp_path), "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key. Did you mean 'lr'?" in capsys.readouterr().err


# Every zoo recipe runs with --smoke; these three have tests of their own (above, test_quickstart, test_llava_moe).
SMOKED_ELSEWHERE = ("quickstart", "llava15", "llava_moe")
SMOKE_RUN_LIMIT = 40 * 2**20  # every component shrinks under --smoke (BLIP-2's full Q-Former alone left 2.8 GB)


# The mixture recipes share one code path; eagle (pre-alignment) and llava_next (AnyRes) stay in the fast suite.
SLOW_SMOKE = ("prismatic_dinosiglip", "comm", "mova", "cambrian")


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_SMOKE else r
                                    for r in list_presets("recipes") if r not in SMOKED_ELSEWHERE])
def test_zoo_recipe_runs_with_smoke(recipe, tmp_path):
    assert main(["fit", "--recipe", recipe, "--smoke", "--run-dir", str(tmp_path), "trainer.progress=false", "--no-eval"]) == 0
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < SMOKE_RUN_LIMIT, f"--smoke left {size / 2**20:.1f} MiB: some component was not shrunk"
    state = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in state.values()) and sorted(state) == sorted(s.name for s in load_recipe(recipe).stages)
    spec = json.loads((tmp_path / load_recipe(recipe).stages[-1].name / "final" / "mllm.json").read_text())
    if recipe == "dense_connector":
        assert spec["connector"]["name"] == "dense" and spec["connector"]["mode"] == "dci"
    if recipe == "honeybee":
        assert spec["connector"]["name"] == "c_abstractor" and spec["encoder"]["select_layer"] == -1
    if recipe == "blip2_qformer":
        assert spec["connector"]["name"] == "qformer" and spec["encoder"]["select_feature"] == "cls_patch"
    if recipe in ("eagle", "prismatic_dinosiglip", "cambrian", "mova", "comm"):
        assert spec["encoder"]["name"] == "mixture" and len(spec["encoder"]["order"]) >= 2
    if recipe == "pdrop":  # trained with PyramidDrop, and kept for inference (on the tiny LLM's layers)
        assert spec["efficiency"]["name"] == "pdrop" and spec["efficiency"]["ratios"] == [0.5, 0.25, 0.125]
    if recipe == "eagle":  # the pre-aligned member's weights reached the joint stage
        import torch

        pre = MLLM.from_pretrained(tmp_path / "pre_align_convnext" / "final").encoder.state_dict()
        joint = MLLM.from_pretrained(tmp_path / "align" / "final").encoder.members["convnext"].state_dict()
        assert all(torch.equal(pre[k], joint[k]) for k in pre)
    if recipe == "llava_next":
        assert spec["connector"]["name"] == "anyres" and spec["tokens_per_image"] is None
    if recipe == "deepstack":
        assert spec["connector"]["name"] == "deepstack" and spec["connector"]["num_crops"] == 4
    if recipe == "matryoshka":
        header = (tmp_path / "sft" / "logs" / "metrics.csv").read_text().splitlines()[0]
        assert all(f"train/lm_loss_{s}" in header for s in (16, 4, 1))
    if recipe == "octavius":
        assert [t["name"] for t in spec["transforms"]] == ["add_lora_moe"] and spec["transforms"][0]["r"] == 32
        model = MLLM.from_pretrained(tmp_path / "instruct" / "final")
        assert model.reads_instruction and model.llm.lora_moe_gate.weight.shape[1] == 4
    if recipe == "quickstart_moe":
        assert [t["name"] for t in spec["transforms"]] == ["upcycle_moe"]
    if recipe == "cumo":
        assert spec["connector"]["name"] == "moe_mlp"
        header = (tmp_path / "sft" / "logs" / "metrics.csv").read_text().splitlines()[0]
        assert "train/moe_balance" in header and "train/moe_z" in header
