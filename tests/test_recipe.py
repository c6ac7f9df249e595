"""Recipe loading: presets, overrides, and errors that name the key path."""

import pytest
import yaml

from mllm_kit.errors import ConfigError
from mllm_kit.config import load_recipe, recipe_from_dict, resolve_component
from mllm_kit.training.runner import prepare_stage
from mllm_kit.training.state import RunState


def _write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_overrides_merge_onto_recipe_defaults(tiny_recipe):
    recipe = recipe_from_dict(tiny_recipe())
    align, sft = recipe.stages
    assert align.data.template == "plain" and sft.data.template == "chatml"
    assert align.data.max_length == 256 and align.optim.lr == 1e-3
    assert sft.trainable == ["connector", "llm"]


def test_cli_overrides_address_stages_by_name(tmp_path, tiny_recipe):
    recipe = load_recipe(str(_write(tmp_path, tiny_recipe())), ["stages.sft.optim.lr=3e-4", "data.max_length=128"])
    assert recipe.stage("sft").optim.lr == 3e-4
    assert recipe.stage("align").optim.lr == 1e-3
    assert all(s.data.max_length == 128 for s in recipe.stages)


def test_a_base_recipes_stages_merge_by_name(tmp_path, tiny_recipe):
    base = _write(tmp_path, tiny_recipe())
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\nname: child\nstages:\n  - name: sft\n    optim: {{lr: 3.0e-4}}\n"
                     "  - {name: extra, trainable: [llm], optim: {max_steps: 5}}\n")
    recipe = load_recipe(str(child))
    assert [s.name for s in recipe.stages] == ["align", "sft", "extra"]
    sft = recipe.stage("sft")
    assert sft.optim.lr == 3e-4 and sft.optim.max_steps == 2 and sft.trainable == ["connector", "llm"]  # the rest is the base's
    assert recipe.stage("extra").optim.max_steps == 5
    child.write_text(f"base: {base}\nname: child\nstages:\n  - {{optim: {{lr: 3.0e-4}}}}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] needs a name.*base stages: \['align', 'sft'\]"):
        load_recipe(str(child))


def test_zoo_recipes_load():
    for name in ("quickstart", "llava15"):
        recipe = load_recipe(name)
        assert recipe.stages
    llava = load_recipe("llava15")
    align, sft = llava.stages
    assert (align.optim.lr, align.optim.global_batch_size, align.data.template) == (1e-3, 256, "plain")
    assert (sft.optim.lr, sft.optim.global_batch_size, sft.data.template) == (2e-5, 128, "vicuna_v1")
    assert sft.optim.warmup_ratio == 0.03 and sft.optim.weight_decay == 0.0 and sft.optim.schedule == "cosine"
    assert sft.trainable == ["connector", "llm"] and align.trainable == ["connector"]
    dense = load_recipe("dense_connector")
    assert dense.model.connector == resolve_component("connectors", "dense_dci")
    assert dense.model.encoder == resolve_component("encoders", "clip_vit_l14_336")
    assert [(s.name, s.optim.lr, s.optim.global_batch_size) for s in dense.stages] == [("align", 1e-3, 256), ("sft", 2e-5, 128)]
    honeybee = load_recipe("honeybee")
    pre, ft = honeybee.stages
    assert (pre.optim.lr, pre.optim.warmup_steps, pre.optim.max_steps, pre.optim.weight_decay) == (1e-4, 2000, 50000, 0.01)
    assert (ft.optim.lr, ft.optim.global_batch_size, ft.optim.warmup_steps, ft.optim.max_steps) == (2e-5, 128, 150, 4000)
    blip2 = load_recipe("blip2_qformer")
    align = blip2.stage("align")
    assert (align.optim.lr, align.optim.betas, align.optim.weight_decay, align.optim.warmup_steps) == (1e-4, [0.9, 0.98], 0.05, 2000)
    assert (align.optim.min_lr_ratio, align.optim.global_batch_size, align.trainable) == (0.1, 1920, ["connector"])
    deepstack = load_recipe("deepstack")
    assert deepstack.model.connector["name"] == "deepstack" and [s.optim.lr for s in deepstack.stages] == [1e-3, 2e-5]
    assert deepstack.model.connector["inner"] == {"name": "mlp", "depth": 2, "act": "gelu"}  # the nested preset, expanded
    m3 = load_recipe("matryoshka")
    assert [s.objective for s in m3.stages] == [{"name": "lm"}, {"name": "matryoshka"}] and m3.model.connector["name"] == "matryoshka"
    assert (m3.stage("sft").optim.global_batch_size, m3.stage("sft").optim.weight_decay, m3.stage("sft").data.max_length) == (128, 0.0, 2048)
    octavius = load_recipe("octavius")
    (instruct,) = octavius.stages
    assert instruct.transforms == [{"name": "add_lora_moe", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                    "num_experts": 4, "top_k": 2, "r": 32, "alpha": 32, "dropout": 0.1, "gate": "instance"}]
    o = instruct.optim
    assert (o.lr, o.betas, o.weight_decay, o.global_batch_size, o.epochs, o.warmup_ratio) == (5e-4, [0.9, 0.95], 1e-3, 64, 2, 0.1)
    assert instruct.trainable == ["connector", "re:lora_", "llm.lora_moe_gate"] and octavius.model.connector["name"] == "linear"
    cumo = load_recipe("cumo")
    assert [s.optim.lr for s in cumo.stages] == [1e-3, 2e-6, 4e-6]
    assert cumo.stage("sft").transforms == [{"name": "upcycle", "num_experts": 4, "top_k": 2}]
    assert cumo.stage("sft").aux_loss_coef == {"moe_balance": 0.1, "moe_z": 0.01}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["stages"][1].update(optim={"lrr": 1.0}), r"stages\[1\]\.optim\.lrr: unknown key\. Did you mean 'lr'"),
        (lambda r: r.update(optimm={}), r"optimm: unknown key\. Did you mean 'optim'"),
        (lambda r: r["optim"].update(lr="fast"), r"optim\.lr: expected a number"),
        (lambda r: r["stages"][0].update(trainable=[]), r"stages\[0\]\.trainable: stage 'align' trains nothing"),
        (lambda r: r["stages"][0].pop("trainable"), r"stages\[0\]\.trainable: required key is missing"),
        (lambda r: r["data"].update(truncation="cut"), r"data\.truncation: expected one of \['trim', 'drop'\]"),
        (lambda r: r["stages"][1].update(name="align"), r"stage names must be unique"),
        (lambda r: r["data"]["synthetic"].update(taskz=["color"]), r"data\.synthetic\.taskz: unknown key\. Did you mean 'tasks'"),
        (lambda r: r["data"]["synthetic"].update(radius=[8, 40]), r"data\.synthetic: .*radius"),
    ],
)
def test_recipe_errors_name_the_key_path(mutate, message, tiny_recipe):
    data = tiny_recipe()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(data)


def test_unknown_preset_suggests_the_closest(tiny_recipe):
    data = tiny_recipe()
    data["model"]["connector"] = "mlp2x_gelo"
    with pytest.raises(ConfigError, match=r"model\.connector: 'mlp2x_gelo' is neither a connector preset nor a registered connector\. "
                                          r"Did you mean 'mlp2x_gelu'"):
        recipe_from_dict(data)


def test_unknown_recipe_name():
    with pytest.raises(ConfigError, match="Did you mean 'quickstart'"):
        load_recipe("quickstrat")


def test_global_batch_must_divide(tiny_recipe):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.optim\.global_batch_size=6 is not divisible by micro_batch_size × world size = 4 × 1"):
        recipe_from_dict(tiny_recipe(global_batch_size=6, micro_batch_size=4))
    optim = recipe_from_dict(tiny_recipe(global_batch_size=16, micro_batch_size=4)).stages[0].optim
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not divisible by micro_batch_size × world size = 4 × 3 = 12"):
        optim.accumulation(3)
    assert optim.accumulation(2) == 2


def test_trainable_pattern_that_matches_nothing(tmp_path, tiny_recipe):
    data = tiny_recipe()
    data["stages"][0]["trainable"] = ["conector"]
    recipe = recipe_from_dict(data)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.trainable: 'conector' matches no parameter\. Did you mean 'connector'"):
        prepare_stage(recipe, 0, tmp_path, RunState.load(tmp_path))


def test_bad_override_stage_name(tmp_path, tiny_recipe):
    with pytest.raises(ConfigError, match="no stage named 'sfft'. Did you mean 'sft'"):
        load_recipe(str(_write(tmp_path, tiny_recipe())), ["stages.sfft.optim.lr=1"])


def test_base_recipe_merges_and_cycles_are_errors(tmp_path, tiny_recipe):
    _write(tmp_path, tiny_recipe())
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": str(tmp_path / "r.yaml"), "name": "child", "optim": {"lr": 5e-4}}))
    recipe = load_recipe(str(child))
    assert recipe.name == "child" and [s.name for s in recipe.stages] == ["align", "sft"]
    assert recipe.stage("sft").optim.lr == 5e-4 and recipe.stage("sft").optim.global_batch_size == 4
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"base": str(b), "name": "a"}))
    b.write_text(yaml.safe_dump({"base": str(a), "name": "b"}))
    with pytest.raises(ConfigError, match="base recipes form a cycle"):
        load_recipe(str(a))


def test_interpolation_sees_expanded_presets_and_the_tiny_tokenizer(tmp_path):
    """${...} resolves over the whole tree after presets expanded; ${tiny_tokenizer:} is a directory path."""
    from mllm_kit.tiny import tiny_tokenizer

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: interp\n"
        "model:\n"
        "  encoder: {preset: clip_vit_l14_336}\n"
        "  connector: {preset: mlp2x_gelu, depth: '${model.connector_depth}'}\n"
        "  connector_depth: 3\n"
        "  llm:\n"
        "    name: hf_causal_lm\n"
        "    config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, max_position_embeddings: 384}\n"
        "    tokenizer: ${tiny_tokenizer:}\n"
        "    family: ${model.encoder.name}\n"
        "data:\n"
        "  train: data/mine/train.json\n"
        "  eval: ${data.train}\n"
        "  max_length: ${model.llm.config.max_position_embeddings}\n"
        "stages:\n  - {name: sft, trainable: [connector]}\n"
    )
    with pytest.raises(ConfigError, match=r"model\.connector_depth: unknown key"):
        load_recipe(str(path))
    path.write_text(path.read_text().replace("'${model.connector_depth}'", "3").replace("  connector_depth: 3\n", ""))
    recipe = load_recipe(str(path))
    sft = recipe.stage("sft")
    assert (sft.data.eval, sft.data.max_length) == ("data/mine/train.json", 384)
    assert recipe.model.llm["tokenizer"] == str(tiny_tokenizer()) and recipe.model.llm["family"] == "hf_clip"  # the preset's name
    assert recipe.model.connector == {"name": "mlp", "depth": 3, "act": "gelu"}


def test_smoke_shrinks_every_connector_of_the_zoo():
    """--smoke keeps each recipe's connector family but at tiny sizes (BLIP-2's Q-Former is 92.8M parameters as written)."""
    from mllm_kit.config import smoke_recipe
    from mllm_kit.config.presets import list_presets
    from mllm_kit import MLLM
    from mllm_kit.connectors.base import build_connector

    for name in list_presets("recipes"):
        recipe, smoke = load_recipe(name), smoke_recipe(load_recipe(name))
        assert smoke.model.connector["name"] == recipe.model.connector["name"]
        connector = (MLLM.build(smoke.model).connector if smoke.model.encoder["name"] == "mixture"
                     else build_connector(smoke.model.connector, [64], 64, (4, 4), image_size=32, depths=[2]))
        params = sum(p.numel() for p in connector.parameters())
        assert params < 300_000, f"{name}: the smoke connector has {params:,} parameters"
    qformer = smoke_recipe(load_recipe("blip2_qformer")).model.connector
    assert (qformer["num_layers"], qformer["hidden"], qformer["heads"]) == (2, 64, 4)
