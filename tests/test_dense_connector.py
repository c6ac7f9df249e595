"""Dense Connector (§4): token counts, widths, layer choices and parameter counts for the real CLIP-L geometry."""

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.connectors.dense import DenseConnector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import CONNECTORS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model

C, D, N = 1024, 32, 576  # CLIP-L/336 width and tokens; a small LLM width keeps the test light


def clip_l_features(n_img: int = 1) -> VisualFeatures:
    """25 hidden states (embeddings + 24 blocks) of CLIP-L/336, patches only, selected layer −2 = 23."""
    torch.manual_seed(0)
    states = tuple(torch.randn(n_img, N, C) for _ in range(25))
    return VisualFeatures(hidden_states=states, grid=(24, 24), selected_layer=23)


def build(preset: str) -> DenseConnector:
    return CONNECTORS.build(resolve_component("connectors", preset), in_dims=[C], out_dim=D)


def test_dci_concatenates_two_group_means_with_the_final_feature():
    conn = build("dense_dci")
    assert conn.mlp[0].in_features == 3 * C == 3072
    assert sum(p.numel() for p in conn.parameters()) == (3 * C * D + D) + (D * D + D)
    feats = clip_l_features()
    s = feats.hidden_states
    expected_input = torch.cat([s[23], torch.stack(s[0:12]).mean(0), torch.stack(s[12:24]).mean(0)], dim=-1)
    torch.testing.assert_close(conn([feats]).tokens, conn.mlp(expected_input))
    assert conn.num_tokens(N, (24, 24)) == 576


def test_sti_adds_pooled_tokens_of_layers_7_and_15():
    conn = build("dense_sti")
    assert conn.num_tokens(N, (24, 24)) == 576 + 72 + 72
    feats = clip_l_features()
    s = feats.hidden_states
    out = conn([feats]).tokens
    assert out.shape == (1, 720, D)
    pooled = s[7].reshape(1, 72, 8, C).mean(2)  # kernel = stride = 8 along the flattened token axis
    torch.testing.assert_close(out[:, 576:648], conn.mlp(pooled))
    torch.testing.assert_close(out[:, 648:], conn.mlp(s[15].reshape(1, 72, 8, C).mean(2)))
    assert sum(p.numel() for p in conn.parameters()) == (C * D + D) + (D * D + D)


def test_sci_concatenates_layers_7_and_15_on_channels():
    conn = build("dense_sci")
    feats = clip_l_features()
    s = feats.hidden_states
    torch.testing.assert_close(conn([feats]).tokens, conn.mlp(torch.cat([s[23], s[7], s[15]], dim=-1)))


def test_siglip_preset_groups():
    conn = build("dense_dci_siglip")
    assert conn.groups == ((0, 13), (13, 26))


def test_bad_options():
    with pytest.raises(ConfigError, match="mode must be one of"):
        DenseConnector([8], 4, mode="xyz")
    conn = DenseConnector([8], 4, mode="sci", layers=[3, 40])
    feats = VisualFeatures(hidden_states=tuple(torch.randn(1, 4, 8) for _ in range(5)), grid=(2, 2), selected_layer=3)
    with pytest.raises(ConfigError, match=r"layers \[3, 40\] are outside the encoder's 0..4"):
        conn([feats])


@pytest.mark.parametrize("preset", ["dense_dci", "dense_sti", "dense_sci"])
def test_dense_presets_run_in_a_model_with_a_shallow_encoder(preset):
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), preset, tiny_llm_spec("llama")))
    n = model.tokens_per_image()
    assert n == (16 + 2 * (16 // 8) if preset == "dense_sti" else 16)
    out = model.encode_images(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, n, 64)
