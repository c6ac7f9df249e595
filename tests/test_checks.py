"""A recipe's mistakes fail before anything trains: names at load time, the rest before the first stage starts."""

import json
import time

import pytest
import torch

from mllm_kit.cli.main import main
from mllm_kit.data.synthetic import SynthConfig, generate


def _fit_fails(tmp_path, capsys, *overrides, recipe="quickstart", limit=10.0):
    run = tmp_path / "run"
    start = time.perf_counter()
    code = main(["fit", "--recipe", recipe, "--smoke", "--run-dir", str(run), "trainer.progress=false", *overrides])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < limit, f"took {elapsed:.1f} s"
    assert not run.exists(), "a failed check must leave no run directory behind"
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.sft.transforms=[{name: upcycle_moee}]", r"stages[1].transforms[0].name: unknown transform 'upcycle_moee'. Did you mean 'upcycle_moe'?"),
        ("stages.sft.transforms=[{name: upcycle_moe, num_expert: 4}]", r"stages[1].transforms[0]: unknown option 'num_expert'. Did you mean 'num_experts'?"),
        ("stages.sft.objective=lmm", r"stages[1].objective: unknown objective 'lmm'. Did you mean 'lm'?"),
        ("stages.sft.data.template=chatm", r"stages[1].data.template: unknown template 'chatm'. Did you mean 'chatml'?"),
        ("model.connector=mlp2x_gelo", r"model.connector: 'mlp2x_gelo' is neither a connector preset nor a registered connector. Did you mean 'mlp2x_gelu'?"),
        ("model.connector={name: matryoshka, inner: mlp2x_gelo}", r"model.connector.inner: 'mlp2x_gelo' is neither"),
    ],
)
def test_unknown_names_in_the_last_stage_fail_at_load(tmp_path, capsys, override, message):
    assert message in _fit_fails(tmp_path, capsys, override)


@pytest.mark.parametrize(
    "overrides, smoke, message",
    [
        (["stages.sft.trainable=[conector]"], True, "stages[1] ('sft').trainable: 'conector' matches no parameter. Did you mean 'connector'?"),
        (["stages.sft.optim.global_batch_size=10", "stages.sft.optim.micro_batch_size=4"], True,
         "stages[1].optim.global_batch_size=10 is not divisible by micro_batch_size × world size = 4 × 1 = 4"),
        # --smoke swaps in synthetic data and one CPU process: check these on the recipe as written
        (["stages.sft.data.train=/nope.json"], False, "stages[1] ('sft').data.train: file '/nope.json' does not exist"),
        (["stages.sft.trainer.devices=3", "stages.sft.trainer.accelerator=cpu"], False,
         "stages[1] ('sft').optim.global_batch_size=32 is not divisible by micro_batch_size × world size = 32 × 3 = 96"),
    ],
)
def test_later_stage_mistakes_fail_before_the_first_stage_trains(tmp_path, capsys, overrides, smoke, message):
    run = tmp_path / "run"
    start = time.perf_counter()
    code = main(["fit", "--recipe", "quickstart", *(["--smoke"] if smoke else []), "--run-dir", str(run), "trainer.progress=false", *overrides])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert not run.exists(), "a failed check must leave no run directory behind"


def test_trainable_paths_are_checked_against_the_transformed_model(tmp_path, capsys):
    """The MoE stage trains modules that exist only after its transform; a typo there is still found up front."""
    err = _fit_fails(tmp_path, capsys, "stages.moe.trainable=[re:experts_typo]", recipe="quickstart_moe", limit=15.0)
    assert "stages[2] ('moe').trainable: 're:experts_typo' matches no parameter" in err
    run = tmp_path / "ok"  # the recipe as written passes the same check (its trainable paths exist only after upcycling)
    from mllm_kit.config import load_recipe, smoke_recipe
    from mllm_kit.training.preflight import check_run
    from mllm_kit.training.stage import build_recipe_model

    recipe = smoke_recipe(load_recipe("quickstart_moe"))
    check_run(recipe, [0, 1, 2], build_recipe_model(recipe))
    assert not run.exists()


@pytest.mark.parametrize("kind", ["missing", "not_a_run"])
def test_eval_on_a_folder_that_is_not_a_run(tmp_path, capsys, kind):
    folder = tmp_path / "somewhere"
    if kind == "not_a_run":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    assert main(["eval", "--run", str(folder)]) == 2
    err = capsys.readouterr().err
    assert ("does not exist" if kind == "missing" else "is not a run directory") in err
    assert "recipe.yaml" in err and "state.json" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_recipe_without_eval_data_is_not_evaluated(tmp_path, capsys, tiny_recipe):
    """The user's own training file and no eval set: fit trains and evaluates nothing (no synthetic shapes)."""
    import yaml

    paths = generate(tmp_path / "mine", SynthConfig(num_align=8, num_sft=8, num_eval=4, image_size=32))
    data = tiny_recipe(max_steps=1)
    data["data"].pop("eval")
    data["stages"] = [{"name": "sft", "trainable": ["connector"], "data": {"train": str(paths.sft)}}]
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["fit", "--recipe", str(recipe), "--run-dir", str(run)]) == 0
    assert json.loads((run / "state.json").read_text())["stages"]["sft"]["status"] == "done"
    assert not list(run.glob("eval*.json")) and "held-out accuracy" not in capsys.readouterr().out
    assert not list((run / "data").glob("synthetic-*")), "no synthetic data may be rendered for a recipe that names none"


def test_data_synth_small_images(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--image-size", "32", "--num-align", "4", "--num-sft", "4", "--num-eval", "4"]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "s2"), "--image-size", "32", "--radius", "3,6", "--num-align", "2",
                 "--num-sft", "2", "--num-eval", "2"]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "s3"), "--image-size", "32", "--radius", "4,16"]) == 2
    assert "allowed at image_size 32" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quickstart_moe", "quickstart_lora", "quickstart_lora_moe", "cumo", "llava15_lora", "octavius", "llava_mod"])
def test_every_transform_of_the_zoo_replays_on_a_weightless_copy(name):
    from mllm_kit.config import load_recipe, smoke_recipe
    from mllm_kit.training.preflight import check_run
    from mllm_kit.training.stage import build_recipe_model

    recipe = smoke_recipe(load_recipe(name))
    model = build_recipe_model(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_run(recipe, list(range(len(recipe.stages))), model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "the check must not touch the model"
