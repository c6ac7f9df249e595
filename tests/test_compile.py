"""``trainer.compile: true`` compiles blocks in place: the stage trains to the same weights as eager, and saves as usual."""

import pytest
import torch

from mllm_kit import MLLM


@pytest.mark.slow
def test_compiled_stage_trains_like_eager(tiny_recipe, tmp_path):
    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.training.runner import fit

    weights = {}
    for compiled in (False, True):
        data = tiny_recipe()
        data["data"].pop("eval")
        data["stages"] = data["stages"][1:]
        data["trainer"]["compile"] = compiled
        fit(recipe_from_dict(data), tmp_path / str(compiled))
        model = MLLM.from_pretrained(tmp_path / str(compiled) / "sft" / "final")
        weights[compiled] = {k: v for k, v in model.state_dict().items()}
    assert weights[True].keys() == weights[False].keys()  # compiling in place renames nothing
    diff = max((weights[True][k] - weights[False][k]).abs().max().item() for k in weights[False])
    assert diff < 1e-4, diff
