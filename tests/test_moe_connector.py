"""The MLP-MoE connector (CuMo §6.5): dispatch, aux losses, and upcycling from a dense MLP."""

import math

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.connectors.mlp import MLPConnector
from mllm_kit.connectors.moe import MoEMLPConnector, UpcycleConnector, balance_loss, z_loss
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_model


def _features(x: torch.Tensor) -> list[VisualFeatures]:
    return [VisualFeatures(hidden_states=(x,), grid=(1, x.shape[1]), selected_layer=0)]


def _reference(moe: MoEMLPConnector, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the vectorised dispatch must match."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = moe.router(tokens).float().softmax(-1)
    out = []
    for t in range(tokens.shape[0]):
        gates, experts = probs[t].topk(moe.top_k)
        gates = gates / gates.sum()
        y = 0
        for g, e in zip(gates, experts.tolist()):
            h = tokens[t]
            for i, (w, b) in enumerate(zip(moe.experts.weights, moe.experts.biases)):
                h = moe.experts.act(h) if i else h
                h = h @ w[e] + b[e]
            y = y + g * h
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dispatch_matches_the_per_token_definition(top_k):
    torch.manual_seed(0)
    moe = MoEMLPConnector([12], 10, num_experts=4, top_k=top_k)
    x = torch.randn(3, 7, 12)
    out = moe(_features(x))
    assert out.tokens.shape == (3, 7, 10)
    torch.testing.assert_close(out.tokens, _reference(moe, x), atol=1e-5, rtol=1e-5)


def test_upcycled_connector_equals_the_dense_mlp():
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama")))
    dense = model.connector
    x = torch.randn(2, 16, 64)
    expected = dense(_features(x)).tokens
    UpcycleConnector(num_experts=4, top_k=2)(model)
    moe = model.connector
    assert isinstance(moe, MoEMLPConnector) and moe is not dense
    for e in range(4):  # every expert is an exact copy
        assert torch.equal(moe.experts.weights[0][e], dense.mlp[0].weight.t())
        assert torch.equal(moe.experts.biases[1][e], dense.mlp[2].bias)
    torch.testing.assert_close(moe(_features(x)).tokens, expected, atol=1e-6, rtol=1e-6)
    assert moe.build_spec == {"name": "moe_mlp", "num_experts": 4, "top_k": 2, "depth": 2, "act": "gelu", "static_capacity": False}


def test_upcycled_model_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama")))
    UpcycleConnector()(model)
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    assert isinstance(again.connector, MoEMLPConnector)
    x = torch.randn(1, 16, 64)
    torch.testing.assert_close(again.connector(_features(x)).tokens, model.connector(_features(x)).tokens)


def test_aux_losses_match_hand_computed_values():
    # 4 tokens, 2 experts, router logits chosen by hand.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    probs = logits.softmax(-1)
    top1 = probs.argmax(-1)  # experts 0, 1, 0 (tie → first), 0
    assert top1.tolist() == [0, 1, 0, 0]
    p0 = (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1)) + 0.5 + 1 / (1 + math.exp(-4))) / 4
    expected_balance = 2 * (0.75 * p0 + 0.25 * (1 - p0))
    assert balance_loss(probs, top1, 2).item() == pytest.approx(expected_balance, rel=1e-6)
    lse = [math.log(math.exp(2) + 1), math.log(1 + math.e), math.log(2 * math.e), math.log(math.exp(3) + math.exp(-1))]
    assert z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)


def test_connector_reports_aux_losses_and_trains_the_router():
    torch.manual_seed(0)
    moe = MoEMLPConnector([8], 6)
    out = moe(_features(torch.randn(2, 5, 8)))
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}
    (out.tokens.sum() + out.aux_losses["moe_balance"] + out.aux_losses["moe_z"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(w.grad is not None for w in moe.experts.weights)


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="top_k"):
        MoEMLPConnector([8], 6, num_experts=2, top_k=3)
    identity = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "identity", tiny_llm_spec("llama")))
    with pytest.raises(ConfigError, match="upcycle needs an 'mlp' connector, found IdentityConnector"):
        UpcycleConnector()(identity)
    linear = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "linear", tiny_llm_spec("llama")))
    assert isinstance(linear.connector, MLPConnector)
    UpcycleConnector(num_experts=2, top_k=1)(linear)  # a linear connector is a depth-1 MLP and upcycles too
    assert linear.connector.depth == 1


@pytest.mark.parametrize("capacity", [None, 5, 40])
def test_static_capacity_routes_without_reading_the_device_and_gives_the_same_outputs(capacity):
    """A static buffer (C from shapes) changes no output or gradient; it needs no device value: routing runs on the meta
    device, where the dynamic buffer's size (the largest load) cannot be read."""
    from mllm_kit.layers.experts import ExpertMLP
    from mllm_kit.layers.routing import dispatch, route

    torch.manual_seed(0)
    experts = ExpertMLP(4, [8, 16, 8])
    tokens, logits = torch.randn(24, 8, requires_grad=True), torch.randn(24, 4)
    outs, grads = [], []
    for static in (False, True):
        routing = route(logits, 2, capacity, static=static)
        out = dispatch(tokens, routing, 4, experts)
        (grad,) = torch.autograd.grad(out.square().sum(), tokens)
        outs.append(out)
        grads.append(grad)
        assert routing.capacity == (min(capacity or 24, 24) if static else routing.capacity)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
    meta = torch.empty(24, 4, device="meta")
    assert route(meta, 2, capacity, static=True).slots.shape == (24, 2)
    with pytest.raises(Exception):  # the dynamic buffer must read the largest load back from the device
        route(meta, 2, capacity, static=False)
