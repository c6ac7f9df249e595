"""Matryoshka (M3, §8.1): pooled token counts and values, span shortening, the scale-averaged objective."""

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch, keep_image_prefix
from mllm_kit.connectors.base import build_connector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.objectives.matryoshka import MatryoshkaObjective
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model
from mllm_kit.training.module import score


def test_clip_l336_scales_pool_the_projected_grid():
    conn = build_connector(resolve_component("connectors", "matryoshka"), [1024], 64, (24, 24))
    assert conn.scales == (576, 144, 36, 9, 1) and conn.num_tokens(576, (24, 24)) == 576
    x = torch.randn(2, 576, 1024)
    feats = [VisualFeatures(hidden_states=(x,), grid=(24, 24), selected_layer=0)]
    projected = conn.inner(feats).tokens  # [2, 576, 64]
    grid = projected.view(2, 24, 24, 64)
    for scale, kernel in [(576, 1), (144, 2), (36, 4), (9, 8), (1, 24)]:
        conn.scale = scale
        assert conn.num_tokens(576, (24, 24)) == scale
        out = conn(feats).tokens
        side = 24 // kernel
        expected = grid.view(2, side, kernel, side, kernel, 64).mean(dim=(2, 4)).reshape(2, scale, 64)
        assert out.shape == (2, scale, 64)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"scale 16 is not one of scales \[576, 144, 36, 9, 1\]"):
        conn.scale = 16


def test_no_parameters_beyond_the_inner_connector():
    conn = build_connector(resolve_component("connectors", "matryoshka"), [1024], 4096, (24, 24))
    inner = build_connector(resolve_component("connectors", "mlp2x_gelu"), [1024], 4096, (24, 24))
    assert sum(p.numel() for p in conn.parameters()) == sum(p.numel() for p in inner.parameters()) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


def test_scales_default_to_every_divisor_of_the_grid_and_bad_scales_are_rejected():
    assert build_connector(resolve_component("connectors", {"preset": "matryoshka", "scales": None}), [8], 8, (8, 8)).scales == (64, 16, 4, 1)
    with pytest.raises(ConfigError, match="divisible by 3"):
        build_connector(resolve_component("connectors", {"preset": "matryoshka", "scales": [64, 9]}), [8], 8, (8, 8))
    with pytest.raises(ConfigError, match="not a square"):
        build_connector(resolve_component("connectors", {"preset": "matryoshka", "scales": [64, 8]}), [8], 8, (8, 8))
    with pytest.raises(ConfigError, match="not one of scales"):
        build_connector(resolve_component("connectors", {"preset": "matryoshka", "scales": [64, 16], "scale": 4}), [8], 8, (8, 8))


def test_keep_image_prefix_shortens_every_span_and_repads():
    I, P = 99, 0  # image token, pad
    n, keep = 4, 1
    row0 = [5, I, I, I, I, 6, 7, I, I, I, I, 8]          # two images
    row1 = [5, 6, I, I, I, I, 7, P, P, P, P, P]           # one image, right padded
    lab0 = [-100] * 11 + [8]
    lab1 = [-100] * 6 + [7] + [-100] * 5
    batch = Batch(input_ids=torch.tensor([row0, row1]), labels=torch.tensor([lab0, lab1]),
                  attention_mask=torch.tensor([[1] * 12, [1] * 7 + [0] * 5]), images_per_sample=[2, 1], num_image_tokens=12)
    out = keep_image_prefix(batch, I, n, keep, pad_token_id=P)
    # the new width comes from host counts (12 - 3 removed in row 1), so row 0 gains padding
    assert out.input_ids.tolist() == [[5, I, 6, 7, I, 8, P, P, P], [5, 6, I, 7, P, P, P, P, P]]
    assert out.labels.tolist() == [[-100] * 5 + [8] + [IGNORE_INDEX] * 3, [-100, -100, -100, 7] + [IGNORE_INDEX] * 5]
    assert out.attention_mask.tolist() == [[1] * 6 + [0] * 3, [1] * 4 + [0] * 5]
    assert out.num_image_tokens == 3
    assert keep_image_prefix(batch, I, n, n, P) is batch


def _batch(model, n_rows=2):
    n = model.tokens_per_image()
    img = model.image_token_id
    rows = [[11, *[img] * n, 12, 13, 14, 15], [11, 12, *[img] * n, 16, 17, 0]]
    labels = [[IGNORE_INDEX] * (n + 3) + [14, 15], [IGNORE_INDEX] * (n + 2) + [16, 17, IGNORE_INDEX]]
    return Batch(input_ids=torch.tensor(rows), labels=torch.tensor(labels), attention_mask=torch.tensor([[1] * (n + 5), [1] * (n + 4) + [0]]),
                 pixel_values=torch.randn(2, 3, 32, 32), images_per_sample=[1, 1], num_image_tokens=2 * n)


def test_objective_is_the_mean_of_per_scale_lm_losses_and_trains_every_scale():
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "matryoshka", "scales": None}, tiny_llm_spec("llama")))
    conn = model.connector
    assert conn.scales == (16, 4, 1) and model.tokens_per_image() == 16  # 32 px / 8 px patches = 4×4 grid
    batch = _batch(model)
    parts, _, _ = score(model, MatryoshkaObjective(), batch, None)  # what the trainer runs for each batch
    assert conn.scale == 16  # a pass's scale is an argument of its forward; the connector keeps the data's
    lm = LMObjective()
    expected = []
    for s in conn.scales:
        shrunk = keep_image_prefix(batch, model.image_token_id, 16, s, model.tokenizer.pad_token_id)
        assert shrunk.input_ids.shape[1] == batch.input_ids.shape[1] - (16 - s)
        expected.append(lm(model(shrunk, connector_options={"scale": s}), shrunk, None)["loss"])
        torch.testing.assert_close(parts[f"lm_loss_{s}"], expected[-1].detach())
    torch.testing.assert_close(parts["loss"], torch.stack(expected).mean())
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.inner.parameters())


def test_objective_needs_the_matryoshka_connector():
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama")))
    with pytest.raises(ConfigError, match=r"needs a connector with token scales \(the 'matryoshka' connector\)"):
        MatryoshkaObjective().passes(_batch(model), model)


def test_inference_scale_sets_tokens_per_image_and_saves(tmp_path):
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "matryoshka", "scales": None, "scale": 4}, tiny_llm_spec("llama")))
    assert model.tokens_per_image() == 4
    assert model.encode_images(torch.randn(1, 3, 32, 32)).tokens.shape[1] == 4
    model.save_pretrained(tmp_path / "m")
    reloaded = MLLM.from_pretrained(tmp_path / "m")
    assert reloaded.tokens_per_image() == 4
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(reloaded.encode_images(x).tokens, model.encode_images(x).tokens)
