"""Perceiver resampler (§2.2): shapes, token count, the attention it computes, and its parameter count."""

import math

import torch

from mllm_kit import MLLM
from mllm_kit.connectors.resampler import PerceiverAttention, PerceiverResampler
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.registry import CONNECTORS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model


def _features(x):
    return [VisualFeatures(hidden_states=(x,), grid=(24, 24), selected_layer=0)]


def test_resampler_emits_num_latents_tokens_for_any_input():
    conn = CONNECTORS.build(resolve_component("connectors", "resampler"), in_dims=[48], out_dim=32)
    assert conn.num_tokens(576, (24, 24)) == 64 and conn.num_tokens(729, (27, 27)) == 64
    out = conn(_features(torch.randn(3, 100, 48))).tokens
    assert out.shape == (3, 64, 32)


def test_parameter_count_matches_the_formula():
    c, d, q, layers, heads, hd, mult = 48, 32, 16, 3, 4, 8, 4
    conn = PerceiverResampler([c], d, num_latents=q, num_layers=layers, heads=heads, head_dim=hd, ff_mult=mult)
    inner = heads * hd
    per_layer = (2 * 2 * d + d * inner + d * 2 * inner + inner * d) + (2 * d + d * mult * d + mult * d * d)
    expected = (c * d + d) + q * d + layers * per_layer + 2 * d
    assert sum(p.numel() for p in conn.parameters()) == expected


def test_attention_keys_are_media_and_latents():
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=8, heads=2, head_dim=4)
    media, latents = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    got = attn(media, latents)
    ln = attn.norm_latents(latents)
    ctx = torch.cat([attn.norm_media(media), ln], dim=1)
    q = attn.to_q(ln).view(1, 3, 2, 4).transpose(1, 2)
    k, v = attn.to_kv(ctx).chunk(2, dim=-1)
    k, v = (t.view(1, 8, 2, 4).transpose(1, 2) for t in (k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(1, 3, 8))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_resampler_in_a_model_reads_the_image():
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "resampler", "num_latents": 8, "num_layers": 2}, tiny_llm_spec("llama")))
    assert model.tokens_per_image() == 8
    a = model.encode_images(torch.randn(1, 3, 32, 32)).tokens
    b = model.encode_images(torch.randn(1, 3, 32, 32)).tokens
    assert a.shape == (1, 8, 64) and (a - b).abs().max() > 1e-4
