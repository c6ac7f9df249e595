"""Honeybee C-Abstractor (§2.3): token count, shapes and parameter count for the real CLIP-L/336 geometry."""

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.connectors.abstractor import CAbstractor
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import CONNECTORS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model


def regstage_params(depth: int, c_in: int, c_out: int) -> int:
    """timm RegStage of Bottleneck blocks (bottle ratio 1, group size 1, SE 0.25 of the block input, LayerNorm2d)."""
    total = 0
    for i in range(depth):
        cin = c_in if i == 0 else c_out
        se = int(round(cin * 0.25))
        total += cin * c_out + 2 * c_out  # 1×1 conv + norm
        total += c_out * 9 + 2 * c_out  # 3×3 depthwise conv + norm
        total += (c_out * se + se) + (se * c_out + c_out)  # squeeze-excite
        total += c_out * c_out + 2 * c_out  # 1×1 conv + norm
        if cin != c_out:
            total += cin * c_out + 2 * c_out  # projection shortcut + norm
    return total


def test_clip_l_336_gives_144_tokens_and_the_expected_parameters():
    c, d = 1024, 64
    conn = CONNECTORS.build(resolve_component("connectors", "c_abstractor"), in_dims=[c], out_dim=d, grid=(24, 24))
    assert conn.num_tokens(576, (24, 24)) == 144
    expected = 576 * c + 2 * regstage_params(3, c, 1024) + (1024 * d + d) + (d * d + d)
    assert sum(p.numel() for p in conn.parameters()) == expected
    feats = VisualFeatures(hidden_states=(torch.randn(2, 576, c),), grid=(24, 24), selected_layer=0)
    assert conn([feats]).tokens.shape == (2, 144, d)


def test_depth_zero_is_pooling_plus_readout():
    conn = CAbstractor([8], 6, grid=(4, 4), num_queries=4, depth=0, pos_emb=False)
    x = torch.randn(1, 16, 8)
    pooled = x.transpose(1, 2).reshape(1, 8, 4, 4).unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).flatten(2).transpose(1, 2)
    feats = VisualFeatures(hidden_states=(x,), grid=(4, 4), selected_layer=0)
    torch.testing.assert_close(conn([feats]).tokens, conn.readout(pooled))
    x = torch.randn(5)
    assert torch.equal(conn.readout[1](x), torch.nn.functional.silu(x))  # the readout's activation is SiLU


def test_errors():
    with pytest.raises(ConfigError, match="square number"):
        CAbstractor([8], 6, grid=(4, 4), num_queries=10)
    conn = CAbstractor([8], 6, grid=(4, 4), num_queries=4, depth=1, hidden=8)
    with pytest.raises(ConfigError, match="expects 4×4 = 16 patch tokens, got 17"):
        conn([VisualFeatures(hidden_states=(torch.randn(1, 17, 8),), grid=(4, 4), selected_layer=0)])


def test_model_supplies_the_grid_and_reloads(tmp_path):
    spec = {"preset": "c_abstractor", "num_queries": 4, "depth": 1, "hidden": 32}
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), spec, tiny_llm_spec("llama")))
    assert model.tokens_per_image() == 4 and model.connector.grid == (4, 4)
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval().encode_images(x).tokens, model.eval().encode_images(x).tokens)
