"""Every connector preset on the real LLaVA-1.5 geometry — CLIP ViT-L/14-336 and Vicuna-7B, built from their
published configs on the meta device (nothing is downloaded or allocated): token counts equal the closed forms of
specs/components.md and parameter counts equal hand-computed formulas."""

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.connectors.base import build_connector
from mllm_kit.registry import ENCODERS
from mllm_kit.config import resolve_component, resolve_model
from mllm_kit.tiny import tiny_tokenizer

# openai/clip-vit-large-patch14-336 vision config and lmsys/vicuna-7b-v1.5 (Llama-2-7B) config, as published.
CLIP_L_336 = {"name": "hf_clip", "select_layer": -2, "config": {
    "image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "projection_dim": 768}}
VICUNA_7B = {"name": "hf_causal_lm", "tokenizer": None, "config": {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}}
C, D = 1024, 4096
MLP = (C * D + D) + (D * D + D)  # mlp2x_gelu: Linear(C→D) · GELU · Linear(D→D)


@pytest.fixture(scope="module")
def encoder_and_llm():
    with torch.device("meta"):
        model = MLLM.build(resolve_model(CLIP_L_336, "mlp2x_gelu", {**VICUNA_7B, "tokenizer": str(tiny_tokenizer())}))
    return model


def _build(model, connector, encoder=None):
    with torch.device("meta"):
        enc = model.encoder if encoder is None else encoder
        return MLLM(enc, build_connector(resolve_component("connectors", connector), [enc.embed_dim], model.llm.hidden_size, enc.grid), model.llm)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_backbones_have_the_published_shapes(encoder_and_llm):
    m = encoder_and_llm
    assert m.encoder.grid == (24, 24) and m.encoder.num_tokens == 576 and m.encoder.selected_layer == 23
    assert m.llm.hidden_size == 4096 and len(m.llm.decoder_layers) == 32
    assert 6.6e9 < _params(m.llm) < 6.8e9  # Vicuna-7B: 6.74B
    assert m.tokens_per_image() == 576 and _params(m.connector) == MLP == 20_979_712


@pytest.mark.parametrize("preset, tokens, params", [
    ("mlp2x_gelu", 576, MLP),
    ("linear", 576, C * D + D),
    ("dense_dci", 576, (3 * C * D + D) + (D * D + D)),   # input width 3C = 3072
    ("dense_sci", 576, (3 * C * D + D) + (D * D + D)),
    ("dense_sti", 576 + 72 + 72, MLP),                   # + two 1-D pools (kernel 8) of layers 7 and 15
    ("moe_mlp", 576, 4 * MLP + C * 4),                   # 4 experts + router, no bias
    ("deepstack", 576, MLP),                             # no parameters of its own
    ("deepstack_vit", 576, MLP),
    ("matryoshka", 576, MLP),                            # largest scale by default
    ("resampler", 64, None),
    ("qformer", 32, None),
    ("qformer_light", 64, None),
])
def test_connector_presets_on_clip_l_336_and_vicuna_7b(encoder_and_llm, preset, tokens, params):
    model = _build(encoder_and_llm, preset)
    assert model.tokens_per_image() == tokens
    if params is not None:
        assert _params(model.connector) == params


def test_c_abstractor_on_the_last_layer_gives_144_tokens(encoder_and_llm):
    with torch.device("meta"):
        honeybee_encoder = ENCODERS.build({**CLIP_L_336, "select_layer": -1})
    model = _build(encoder_and_llm, "c_abstractor", honeybee_encoder)
    assert model.tokens_per_image() == 144 and model.connector.grid == (24, 24)


def test_matryoshka_scales_and_deepstack_layers(encoder_and_llm):
    m3 = _build(encoder_and_llm, "matryoshka")
    assert m3.connector.scales == (576, 144, 36, 9, 1)
    assert [_build(encoder_and_llm, {"preset": "matryoshka", "scale": s}).tokens_per_image() for s in (144, 36, 9, 1)] == [144, 36, 9, 1]
    deepstack = _build(encoder_and_llm, "deepstack")
    assert deepstack.connector.layers == [1, 2, 3, 4] and max(deepstack.connector.layers) < len(deepstack.llm.decoder_layers)


def test_clip_convnext_xxl_at_1024_gives_eagle_s_32x32_grid_of_3072_channels():
    """Eagle's ConvNeXt member (specs/components.md §5.1): stride 32 at 1024 px."""
    with torch.device("meta"):
        encoder = ENCODERS.build(resolve_component("encoders", "clip_convnext_xxl_1024"))
    assert (encoder.embed_dim, encoder.patch_size, encoder.grid, encoder.num_tokens) == (3072, 32, (32, 32), 1024)
    assert _params(encoder) > 800e6  # the XXL trunk: 843M parameters


# -- encoder mixtures (specs/components.md §5) and AnyRes (§3.2) ------------------------------------------
def _mixture_model(encoder, connector):
    with torch.device("meta"):
        return MLLM.build(resolve_model(encoder, connector, {**VICUNA_7B, "tokenizer": str(tiny_tokenizer())}))


@pytest.mark.parametrize("size, tokens", [(384, 729), (224, 256)])
def test_prismatic_fused_dinosiglip_has_2176_channels(size, tokens):
    """DINOv2-L/14-reg4 + SigLIP-so400m/14 at the same resolution (§5.5), FusedMLPProjector."""
    siglip = "timm_siglip_so400m_384" if size == 384 else "timm_siglip_so400m_224"
    m = _mixture_model({"preset": "prismatic_dinosiglip_384", "members": {"dino": {"image_size": size}, "siglip": siglip}},
                       "prismatic_fused_mlp")
    assert m.encoder.feature_dims == [1024, 1152] and m.connector.fused_dim == 2176 and m.tokens_per_image() == tokens
    assert [mem.selected_layer for mem in m.encoder.members.values()] == [23, 26]  # second-to-last blocks
    fused = 2176 * 8704 + 8704 + 8704 * D + D + D * D + D
    assert _params(m.connector) == fused


def test_eagle_x2_gives_1024_tokens_of_the_summed_channels():
    """CLIP-L/14 at 448 (32×32×1024) + CLIP-ConvNeXt-XXL at 1024 (32×32×3072), channels concatenated (§5.1)."""
    m = _mixture_model({"preset": "eagle_x2", "members": {"clip": {**CLIP_L_336, "image_size": 448}}}, "eagle_channel_concat")
    assert m.encoder.feature_grids == [(32, 32), (32, 32)] and m.encoder.feature_dims == [1024, 3072]
    assert m.connector.fused_dim == 4096 and m.tokens_per_image() == 1024
    assert _params(m.connector) == (4096 * D + D) + (D * D + D)


def test_cambrian_sva_gives_576_tokens_from_its_four_towers():
    """SigLIP/CLIP/DINOv2-g at 24×24 and ConvNeXt-XXL at 96×96 (§5.4): windows of 1 and 16 tokens."""
    siglip = {"name": "hf_siglip", "select_layer": -2, "config": {"image_size": 384, "patch_size": 14, "hidden_size": 1152,
              "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}}
    dino = {"name": "hf_dinov2", "select_layer": -1, "config": {"image_size": 378, "patch_size": 14, "hidden_size": 1536,
            "num_hidden_layers": 40, "num_attention_heads": 24, "mlp_ratio": 4}}
    m = _mixture_model({"preset": "cambrian_towers", "members": {"siglip": siglip, "clip": CLIP_L_336, "dino": dino}}, "sva")
    assert m.encoder.feature_grids == [(24, 24), (24, 24), (24, 24), (96, 96)]
    assert m.encoder.feature_dims == [1152, 1024, 1536, 768] and m.tokens_per_image() == 576
    assert m.connector.window_sizes == [1, 1, 1, 16]


def test_mova_pools_its_48x48_base_to_576_tokens():
    m = _mixture_model({"preset": "mova_experts", "members": {
        "clip": {**CLIP_L_336, "image_size": 672},
        "dino": {"name": "hf_dinov2", "select_layer": -1, "image_size": 448, "config": {"image_size": 518, "patch_size": 14,
                 "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4}},
        "siglip": {"name": "hf_siglip", "select_layer": -2, "config": {"image_size": 384, "patch_size": 14, "hidden_size": 1152,
                   "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}}}}, "mova")
    assert m.encoder.feature_grids == [(48, 48), (32, 32), (27, 27)] and m.tokens_per_image() == 576
    assert len(m.connector.blocks) == 3 and m.connector.blocks[0].top_k == 2
