"""Q-Former (§2.1–2.2): token counts, cross-attention placement, parameter counts, loading a Blip2QFormerModel."""

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm_kit import MLLM
from mllm_kit.connectors.qformer import QFormerConnector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import CONNECTORS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model


def _features(x):
    return [VisualFeatures(hidden_states=(x,), grid=(16, 16), selected_layer=0)]


def _n(module):
    return sum(p.numel() for p in module.parameters())


def _linear(i, o):
    return i * o + o


def test_blip2_preset_shapes_and_cross_attention_layers():
    """EVA ViT-g width 1408 → 32 tokens; cross-attention on layers 0, 2, ..., 10 (layer_idx % 2 == 0)."""
    conn = CONNECTORS.build(resolve_component("connectors", "qformer"), in_dims=[1408], out_dim=4096)
    assert conn.num_tokens(257, (16, 16)) == 32
    layers = conn.qformer.encoder.layer
    assert [i for i, layer in enumerate(layers) if layer.has_cross_attention] == [0, 2, 4, 6, 8, 10]
    cross = layers[0].crossattention.attention
    assert tuple(cross.key.weight.shape) == (768, 1408) and tuple(cross.value.weight.shape) == (768, 1408)
    assert tuple(conn.queries.shape) == (1, 32, 768)
    assert tuple(conn.post_proj[0].weight.shape) == (4096, 768)
    # the BLIP-2 Q-Former has only the query FFN (no text input)
    assert not hasattr(layers[0], "intermediate") and hasattr(layers[0], "intermediate_query")


def test_blip2_parameter_count_matches_the_formula():
    c, h, ffn, layers, q, d = 1408, 768, 3072, 12, 32, 4096
    conn = CONNECTORS.build(resolve_component("connectors", "qformer"), in_dims=[c], out_dim=d)
    ln = 2 * h
    self_attn = 3 * _linear(h, h) + _linear(h, h) + ln
    cross_attn = _linear(h, h) + 2 * _linear(c, h) + _linear(h, h) + ln
    query_ffn = _linear(h, ffn) + _linear(ffn, h) + ln
    expected = 2 * c + q * h + ln + layers * (self_attn + query_ffn) + (layers // 2) * cross_attn + _linear(h, d)
    assert _n(conn) == expected


def test_light_preset_runs_at_llm_width_with_pre_and_post_mlps():
    c, d = 1024, 4096
    conn = CONNECTORS.build(resolve_component("connectors", "qformer_light"), in_dims=[c], out_dim=d)
    cfg = conn.qformer.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.cross_attention_frequency) == (d, 32, 11008, 1)
    assert cfg.encoder_hidden_size == d and cfg.layer_norm_eps == 1e-12
    assert all(layer.has_cross_attention for layer in conn.qformer.encoder.layer)
    assert [tuple(m.weight.shape) for m in conn.pre_proj if isinstance(m, torch.nn.Linear)] == [(d, c), (d, d)]
    assert [tuple(m.weight.shape) for m in conn.post_proj if isinstance(m, torch.nn.Linear)] == [(d, d), (d, d)]
    assert isinstance(conn.vision_norm, torch.nn.Identity) and conn.num_tokens(576, (24, 24)) == 64


def test_forward_shape_and_queries_read_the_image():
    torch.manual_seed(0)
    conn = QFormerConnector([48], 32, num_queries=5, num_layers=2, hidden=16, heads=2, intermediate_size=24)
    x = torch.randn(3, 20, 48)
    out = conn(_features(x)).tokens
    assert out.shape == (3, 5, 32)
    other = conn(_features(torch.randn(3, 20, 48))).tokens
    assert (out - other).abs().max() > 1e-4
    # each image is read independently of the others in the batch
    torch.testing.assert_close(conn(_features(x[1:2])).tokens, out[1:2], atol=1e-5, rtol=1e-5)


def test_init_from_a_local_blip2_qformer_directory(tmp_path):
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                             cross_attention_frequency=2, encoder_hidden_size=48)
    reference = Blip2QFormerModel(cfg).eval()
    reference.save_pretrained(tmp_path / "qf")
    conn = QFormerConnector([48], 32, num_queries=4, num_layers=2, hidden=16, heads=2, intermediate_size=24,
                            vision_norm=False, init_from=str(tmp_path / "qf")).eval()
    x = torch.randn(2, 10, 48)
    expected = reference(query_embeds=conn.queries.expand(2, -1, -1), encoder_hidden_states=x).last_hidden_state
    torch.testing.assert_close(conn(_features(x)).tokens, conn.post_proj(expected))
    with pytest.raises(ConfigError, match="hidden_size=16 differs"):
        QFormerConnector([48], 32, num_layers=2, hidden=32, heads=2, intermediate_size=24, init_from=str(tmp_path / "qf"))


def test_bad_widths_are_rejected():
    with pytest.raises(ConfigError, match="not divisible by heads"):
        QFormerConnector([48], 32, hidden=30, heads=4)
    with pytest.raises(ConfigError, match="pre_proj"):
        QFormerConnector([48], 32, hidden=16, heads=2, pre_proj="conv")


def test_qformer_model_trains_end_to_end():
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "qformer", "num_queries": 6, "num_layers": 2, "hidden": 32,
                                                   "heads": 4, "intermediate_size": 64}, tiny_llm_spec("llama")))
    assert model.tokens_per_image() == 6
    tokens = model.encode_images(torch.randn(2, 3, 32, 32)).tokens
    assert tokens.shape == (2, 6, model.llm.hidden_size)
    tokens.square().mean().backward()
    assert model.connector.queries.grad is not None and model.connector.queries.grad.abs().sum() > 0


def test_init_std_sets_the_scale_of_queries_and_weights():
    torch.manual_seed(0)
    for std in (0.02, 0.3):
        conn = QFormerConnector([64], 128, num_layers=2, hidden=128, heads=4, intermediate_size=512, init_std=std)
        key = conn.qformer.encoder.layer[0].crossattention.attention.key.weight
        assert abs(key.std().item() - std) < 0.1 * std and abs(conn.queries.std().item() - std) < 0.1 * std
