"""`mllm-kit fit --recipe llava_moe --smoke`: three stages; stage III changes only FFNs and routers; the run reloads."""

import json
import re

import torch

from mllm_kit import MLLM
from mllm_kit.cli.main import main
from mllm_kit.llm.moe import SparseMoE
from mllm_kit.config import load_recipe


def test_recipe_carries_the_papers_hyper_parameters():
    recipe = load_recipe("llava_moe")
    align, sft, moe = recipe.stages
    assert [(s.optim.lr, s.optim.global_batch_size) for s in recipe.stages] == [(1e-3, 256), (2e-5, 128), (2e-5, 128)]
    assert align.trainable == ["connector"] and sft.trainable == ["connector", "llm"]
    assert moe.transforms == [{"name": "upcycle_moe", "layers": "every_other", "num_experts": 4, "top_k": 2,
                               "capacity_factor": 1.5, "eval_capacity_factor": 2.0}]
    assert moe.aux_loss_coef == {"llm_moe_balance": 0.01} and moe.trainable == [r"re:^llm\..*\.mlp\."]
    assert all(s.optim.weight_decay == 0.0 and s.optim.warmup_ratio == 0.03 and s.optim.schedule == "cosine" for s in recipe.stages)


def test_smoke_run_trains_only_ffns_and_routers_in_the_moe_stage(tmp_path):
    assert main(["fit", "--recipe", "llava_moe", "--smoke", "--run-dir", str(tmp_path), "trainer.progress=false", "--no-eval"]) == 0
    state = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert sorted(state) == ["align", "moe", "sft"] and all(s["status"] == "done" for s in state.values())

    dense = dict(MLLM.from_pretrained(tmp_path / "sft" / "final").named_parameters())
    moe_model = MLLM.from_pretrained(tmp_path / "moe" / "final")
    upcycled = [i for i, layer in enumerate(moe_model.llm.decoder_layers) if isinstance(layer.mlp, SparseMoE)]
    assert upcycled == list(range(0, len(moe_model.llm.decoder_layers), 2))
    ffn = re.compile(r"^llm\..*\.mlp\.")
    changed_ffn = 0
    for name, param in moe_model.named_parameters():
        if not ffn.search(name):  # attention, norms, embeddings, encoder, projector: untouched
            assert torch.equal(param, dense[name]), f"{name} changed in the MoE stage"
        elif name in dense:  # a dense FFN that stayed dense
            changed_ffn += not torch.equal(param, dense[name])
    for i in upcycled:  # experts started as copies of the dense FFN and then trained
        experts = moe_model.llm.decoder_layers[i].mlp.experts
        w_in, w_out = experts.weights[0], experts.weights[-1]  # gate (or Phi-2's fc1) and down (fc2)
        assert not torch.equal(w_in[0], w_in[1]) or not torch.equal(w_out[0], w_out[1])
    assert changed_ffn > 0

    header = (tmp_path / "moe" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train/llm_moe_load_e{e}" in header for e in range(4)) and "train/llm_moe_balance" in header

    moe_model.eval()
    tok = moe_model.tokenizer
    n = moe_model.tokens_per_image()
    ids = torch.tensor([[tok.bos_token_id or 1, *[moe_model.image_token_id] * n, 5, 6]])
    out = moe_model.generate(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), max_new_tokens=4, stop_token_ids=[-1])
    assert out.shape == (1, 4)
