"""LLM-side MoE (MoE-LLaVA, §6.1): exact upcycling on four architectures, routing/capacity rules, aux losses,
saving and reloading an upcycled model."""

import math

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.batch import Batch
from mllm_kit.errors import ConfigError
from mllm_kit.llm.moe import SparseMoE, UpcycleMoE, moe_layer_indices
from mllm_kit.layers.routing import balance_loss, dispatch, route, z_loss
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_model


def _batch(model, rows=2):
    n, img = model.tokens_per_image(), model.image_token_id
    ids = torch.tensor([[5, *[img] * n, 6, 7, 8, 9], [10, 11, *[img] * n, 12, 13, 0]])[:rows]
    mask = torch.ones_like(ids)
    mask[1:, -1] = 0
    g = torch.Generator().manual_seed(0)
    return Batch(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(rows, 3, 32, 32, generator=g),
                 images_per_sample=[1] * rows, num_image_tokens=rows * n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "phi"])
def test_upcycled_model_gives_the_dense_logits(family):
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec(family, num_layers=4))).eval()
    batch = _batch(model)
    with torch.no_grad():
        dense = model(batch).logits
    UpcycleMoE(layers="every_other", num_experts=4, top_k=2)(model)
    layers = model.llm.decoder_layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [True, False, True, False]
    with torch.no_grad():
        out = model(batch)
    assert (out.logits - dense).abs().max() <= 1e-5
    assert set(out.aux_losses) == {"llm_moe_balance"} and out.metrics["llm_moe_dropped"] == 0
    assert sum(out.metrics[f"llm_moe_load_e{i}"] for i in range(4)).item() == pytest.approx(1.0)


def test_layer_choices():
    assert moe_layer_indices("every_other", 6) == [0, 2, 4]
    assert moe_layer_indices("first_half", 6) == [0, 1, 2] and moe_layer_indices("second_half", 6) == [3, 4, 5]
    assert moe_layer_indices("all", 3) == [0, 1, 2] and moe_layer_indices([4, 1], 6) == [1, 4]
    with pytest.raises(ConfigError, match="must be indices in 0..5"):
        moe_layer_indices([6], 6)
    with pytest.raises(ConfigError, match="is not one of"):
        moe_layer_indices("sparse", 6)


def test_routing_order_capacity_and_renormalised_gates():
    # 4 tokens, 2 experts, top-2, capacity 3: first choices fill slots first (token order), then second choices.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [4.0, 1.0]])
    r = route(logits, top_k=2, capacity=3)
    assert r.experts.tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]
    # expert 0 gets tokens 0, 1, 3 (first choices) → full; token 2's second choice (expert 0) is dropped.
    # expert 1 gets token 2 (first), then second choices of tokens 0, 1 → full; token 3's second choice is dropped.
    assert r.kept.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert r.capacity == 3 and r.slots.tolist() == [[0, 4], [1, 5], [3, 6], [2, 6]]  # expert·capacity + position; 6 = dropped
    probs = logits.softmax(-1)
    expected = torch.stack([probs[0], probs[1], torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])
    expected_gates = torch.stack([expected[t, r.experts[t]] for t in range(4)])
    torch.testing.assert_close(r.gates, expected_gates)
    # dispatch = Σ_k gate_k · expert_k(token) with the dropped assignments left out
    tokens = torch.randn(4, 3)
    scale = torch.tensor([2.0, -1.0])
    out = dispatch(tokens, r, 2, lambda x: x * scale.view(2, 1, 1))
    reference = torch.stack([sum(r.gates[t, j] * scale[r.experts[t, j]] * tokens[t] for j in range(2)) for t in range(4)])
    torch.testing.assert_close(out, reference)


def test_aux_losses_match_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0]])
    r = route(logits, top_k=1, capacity=4)
    probs = logits.softmax(-1)
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])  # first choices: 0, 1, 2, 0
    assert balance_loss(r.probs, r.experts[:, 0], 3).item() == pytest.approx(3 * (f * probs.mean(0)).sum().item(), rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert z_loss(r.logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    assert r.gates.squeeze(1).tolist() == [1.0, 1.0, 1.0, 1.0]  # top-1 gates renormalise to 1


def test_capacity_uses_the_train_and_eval_factors():
    ffn = torch.nn.Module()
    ffn.fc1, ffn.fc2, ffn.activation_fn = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.GELU()
    moe = SparseMoE(ffn, num_experts=4, top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=4)
    assert moe.capacity(10) == math.ceil(10 / 4 * 2 * 1.5) == 8
    moe.eval()
    assert moe.capacity(10) == 10 and moe.capacity(1) == 4
    x = torch.randn(2, 5, 4)
    dense = ffn.fc2(ffn.activation_fn(ffn.fc1(x)))
    torch.testing.assert_close(moe(x), dense, atol=1e-6, rtol=1e-5)  # plain fc1/fc2 FFNs (Phi-2) upcycle exactly


def test_training_drops_overflow_and_reports_it():
    torch.manual_seed(0)
    ffn = torch.nn.Module()
    ffn.fc1, ffn.fc2, ffn.activation_fn = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.GELU()
    moe = SparseMoE(ffn, num_experts=4, top_k=1, capacity_factor=0.5, noisy_gate=False)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # everything prefers expert 0
    x = torch.ones(1, 8, 4)
    reported = {}
    out = moe(x, report=lambda aux, metrics: reported.update(metrics))
    capacity = moe.capacity(8)  # ⌈8/4·1·0.5⌉ = 1
    assert capacity == 1 and reported["moe_dropped"].item() == pytest.approx(7 / 8)
    assert out[0, 1:].abs().max() == 0 and out[0, 0].abs().max() > 0  # only the first token in routing order is kept


def test_upcycle_rejects_what_it_cannot_do():
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama")))
    UpcycleMoE(layers=[0])(model)
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        UpcycleMoE(layers=[0])(model)
    with pytest.raises(ConfigError, match="1 ≤ top_k ≤ num_experts"):
        UpcycleMoE(layers=[1], num_experts=2, top_k=3)(model)


def test_upcycled_model_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("qwen2", num_layers=2)))
    UpcycleMoE(layers="all", num_experts=3, top_k=2)(model)
    with torch.no_grad():  # make the experts differ, as training would
        for p in model.llm.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    batch = _batch(model)
    with torch.no_grad():
        expected = model(batch).logits
    model.save_pretrained(tmp_path / "m")
    reloaded = MLLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.transforms == model.transforms and isinstance(reloaded.llm.decoder_layers[1].mlp, SparseMoE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, expected)
    prompt = batch.input_ids[:1]
    out = reloaded.generate(prompt, torch.ones_like(prompt), batch.pixel_values[:1], max_new_tokens=3)
    assert out.shape == (1, 3)
