"""Vision encoders: layer selection, CLS handling, token counts, freezing, loading and the image transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_kit.encoders.hf import CLIPEncoder, DINOv2Encoder, SigLIPEncoder
from mllm_kit.data.transforms import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from mllm_kit.encoders.timm_vit import TimmVisionEncoder
from mllm_kit.errors import ConfigError
from mllm_kit.registry import ENCODERS
from mllm_kit.tiny import tiny_encoder, tiny_encoder_spec

FAMILIES = ("clip", "siglip", "dinov2", "timm_vit")
WITH_CLS = ("clip", "dinov2", "timm_vit")
# tiny_encoder defaults: 32 px images, 8 px patches → 4×4 grid, 3 blocks, width 64.
NUM_LAYERS, GRID, WIDTH = 3, (4, 4), 64
EXPECTED_CLASS = {"clip": CLIPEncoder, "siglip": SigLIPEncoder, "dinov2": DINOv2Encoder, "timm_vit": TimmVisionEncoder}
EXPECTED_STATS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (HALF, HALF),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "timm_vit": (HALF, HALF),
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build(family: str, **options) -> torch.nn.Module:
    return ENCODERS.build({**tiny_encoder_spec(family), **options}).eval()


@pytest.fixture(scope="module")
def encoders():
    return {f: build(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def raw_hidden_states(family: str, encoder, pixels) -> tuple[torch.Tensor, ...]:
    """All hidden states from the backbone library itself, prefix tokens included."""
    with torch.no_grad():
        if family == "timm_vit":
            m = encoder.model
            # timm reports block outputs only; the embedding output (index 0) is rebuilt from its parts.
            _, inter = m.forward_intermediates(pixels, norm=False, output_fmt="NLC", return_prefix_tokens=True)
            embedded = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
            return (embedded, *(torch.cat([prefix, patches], dim=1) for patches, prefix in inter))
        return tuple(encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states)


# -- structure and layer selection --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_structure(encoders, family):
    enc = encoders[family]
    assert type(enc) is EXPECTED_CLASS[family]
    assert (enc.embed_dim, enc.num_layers, enc.patch_size, enc.image_size) == (WIDTH, NUM_LAYERS, 8, 32)
    assert enc.num_prefix_tokens == (1 if family in WITH_CLS else 0)
    assert enc.grid == GRID and enc.num_tokens == 16
    assert enc.selected_layer == NUM_LAYERS - 1, "default select_layer -2 is the penultimate block"


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_count_and_shapes(encoders, pixels, family):
    feats = encoders[family](pixels)
    assert len(feats.hidden_states) == NUM_LAYERS + 1
    for k, h in enumerate(feats.hidden_states):
        assert h.shape == (2, 16, WIDTH), f"hidden_states[{k}] has shape {tuple(h.shape)}"
    assert feats.grid == GRID
    assert feats.selected_layer == NUM_LAYERS - 1
    assert feats.selected is feats.hidden_states[-2]


@pytest.mark.parametrize(
    ("family", "select_layer", "index"),
    [(f, -1, 3) for f in FAMILIES] + [(f, 0, 0) for f in FAMILIES] + [("clip", 1, 1), ("clip", -4, 0)],
)
def test_select_layer_picks_that_hidden_state(encoders, pixels, family, select_layer, index):
    enc = build(family, select_layer=select_layer)
    assert enc.selected_layer == index
    with torch.no_grad():
        feats = enc(pixels)
        reference = encoders[family](pixels)  # same weights, default layer
    assert feats.selected is feats.hidden_states[index]
    torch.testing.assert_close(feats.selected, reference.hidden_states[select_layer])
    if index != NUM_LAYERS - 1:
        assert not torch.allclose(feats.selected, reference.selected), "a different layer must give different features"


@pytest.mark.parametrize(
    ("family", "select_layer"), [(f, 4) for f in FAMILIES] + [(f, -5) for f in FAMILIES] + [("clip", 100)]
)
def test_select_layer_out_of_range(family, select_layer):
    with pytest.raises(ConfigError) as info:
        build(family, select_layer=select_layer)
    msg = str(info.value)
    assert f"select_layer={select_layer} is out of range for 3 blocks" in msg
    assert "valid: -4..3" in msg


def test_select_feature_must_be_known():
    with pytest.raises(ConfigError, match=r"select_feature must be one of \('patch', 'cls_patch'\), got 'cls'"):
        build("clip", select_feature="cls")


# -- agreement with the raw backbone --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_tokens_equal_raw_backbone_without_prefix(encoders, pixels, family):
    enc = encoders[family]
    raw = raw_hidden_states(family, enc, pixels)
    prefix = 1 if family in WITH_CLS else 0
    assert raw[-2].shape[1] == 16 + prefix
    with torch.no_grad():
        feats = enc(pixels)
    for k in range(NUM_LAYERS + 1):
        torch.testing.assert_close(feats.hidden_states[k], raw[k][:, prefix:], msg=f"layer {k} differs from the backbone")


def test_clip_selected_is_hf_penultimate_without_cls(encoders, pixels):
    enc = encoders["clip"]
    with torch.no_grad():
        expected = enc.model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = enc(pixels).selected
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family", WITH_CLS)
def test_cls_patch_keeps_cls_first(encoders, pixels, family):
    enc = build(family, select_feature="cls_patch")
    assert enc.num_tokens == 17
    raw = raw_hidden_states(family, encoders[family], pixels)
    with torch.no_grad():
        feats = enc(pixels)
        patch_only = encoders[family](pixels)
    assert feats.selected.shape == (2, 17, WIDTH)
    torch.testing.assert_close(feats.selected, raw[-2])
    torch.testing.assert_close(feats.selected[:, 1:], patch_only.selected)


def test_siglip_cls_patch_is_rejected():
    with pytest.raises(ConfigError, match="SigLIPEncoder has no CLS token; use select_feature: patch"):
        build("siglip", select_feature="cls_patch")


# -- real-size configs without downloads ----------------------------------------------------------
def test_clip_336_patch14_gives_576_tokens():
    enc = CLIPEncoder(config=dict(image_size=336, patch_size=14, **SMALL))
    assert enc.grid == (24, 24) and enc.num_tokens == 576 and enc.num_prefix_tokens == 1
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, 336, 336))
    assert feats.selected.shape == (1, 576, 32)


def test_clip_336_cls_patch_gives_577_tokens():
    enc = CLIPEncoder(config=dict(image_size=336, patch_size=14, **SMALL), select_feature="cls_patch")
    assert enc.num_tokens == 577


def test_siglip_224_patch14_has_no_cls():
    enc = SigLIPEncoder(config=dict(image_size=224, patch_size=14, **SMALL))
    assert enc.grid == (16, 16) and enc.num_tokens == 256 and enc.num_prefix_tokens == 0
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 224, 224)).selected.shape == (1, 256, 32)


def test_siglip_384_patch14_gives_729_tokens():
    enc = SigLIPEncoder(config=dict(image_size=384, patch_size=14, **SMALL))
    assert enc.grid == (27, 27) and enc.num_tokens == 729 and enc.num_prefix_tokens == 0
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 384, 384)).selected.shape == (1, 729, 32)


def test_image_size_override_interpolates_positions():
    enc = build("clip", image_size=48)
    assert enc.grid == (6, 6) and enc.num_tokens == 36
    assert enc.image_transform.size == 48
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 48, 48)).selected.shape == (1, 36, WIDTH)


def test_image_size_smaller_than_patch_is_rejected():
    with pytest.raises(ConfigError, match="image_size 4 is smaller than patch_size 8"):
        build("clip", image_size=4)


# -- freezing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_encoder_has_no_trainable_params_and_no_graph(encoders, pixels, family):
    enc = encoders[family]
    assert enc.frozen
    assert not any(p.requires_grad for p in enc.parameters())
    x = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        feats = enc(x)
    assert all(h.grad_fn is None and not h.requires_grad for h in feats.hidden_states)


@pytest.mark.parametrize("family", ["clip", "timm_vit"])
def test_unfrozen_encoder_trains(pixels, family):
    enc = build(family, frozen=False).train()
    params = list(enc.parameters())
    assert params and all(p.requires_grad for p in params)
    feats = enc(pixels)
    assert feats.selected.grad_fn is not None
    feats.selected.square().mean().backward()
    patch_embed = [p for n, p in enc.named_parameters() if "patch" in n and n.endswith("weight")][0]
    assert patch_embed.grad is not None and patch_embed.grad.abs().sum() > 0


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_stats_come_from_the_checkpoint(encoders, family):
    mean, std = EXPECTED_STATS[family]
    t = encoders[family].image_transform
    np.testing.assert_allclose(t.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(t.std, std, rtol=1e-6)
    assert t.size == 32


def test_config_built_encoder_matches_spec():
    config = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96)
    enc = CLIPEncoder(config=config)
    assert (enc.embed_dim, enc.num_layers, enc.grid, enc.num_tokens) == (48, 4, (4, 4), 16)
    assert enc.image_transform == ImageTransform(size=32, mean=CLIP_MEAN, std=CLIP_STD, mode="center_crop")
    with torch.no_grad():
        feats = enc(torch.zeros(2, 3, 32, 32))
    assert len(feats.hidden_states) == 5 and feats.selected.shape == (2, 16, 48)


def test_path_loaded_encoder_has_saved_weights(encoders):
    from transformers import CLIPVisionModel

    reference = CLIPVisionModel.from_pretrained(tiny_encoder("clip"))
    ours = encoders["clip"].model.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, msg=f"{name} differs from the saved checkpoint")


@pytest.mark.parametrize("cls", [CLIPEncoder, SigLIPEncoder, DINOv2Encoder])
def test_missing_dir_is_a_config_error_naming_the_path(tmp_path, cls):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(ConfigError) as info:
        cls(path=str(missing))
    assert str(missing) in str(info.value)
    assert not isinstance(info.value, OSError)


def test_empty_dir_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot load encoder from") as info:
        CLIPEncoder(path=str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_timm_missing_dir_is_a_config_error_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_timm"
    with pytest.raises(ConfigError, match="has no config.json") as info:
        TimmVisionEncoder(path=str(missing))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("kwargs", [{}, {"path": "x", "config": {"image_size": 32}}])
def test_exactly_one_of_path_or_config(kwargs):
    with pytest.raises(ConfigError, match="give exactly one of 'path'"):
        CLIPEncoder(**kwargs)


# -- image transform ------------------------------------------------------------------------------
def solid(size: tuple[int, int], rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, rgb)


def normalised(rgb, mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


@pytest.mark.parametrize("mode", ["resize", "center_crop", "pad"])
def test_mean_coloured_image_normalises_to_zero(encoders, mode):
    base = encoders["clip"].image_transform
    t = ImageTransform(size=base.size, mean=base.mean, std=base.std, mode=mode)
    colour = tuple(int(m * 255) for m in t.mean)
    out = t(solid((45, 30), colour))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Truncating the mean to 8 bits (the pad colour, as LLaVA's expand2square) leaves at most 1/255/std ≈ 0.015.
    assert out.abs().max() < 0.015


def test_normalisation_uses_mean_and_std(encoders):
    t = encoders["dinov2"].image_transform
    out = t(solid((32, 32), (255, 0, 128)))
    expected = normalised((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out[:, 5, 7], expected)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32))


def test_pad_mode_pads_wide_image_with_mean_colour():
    t = ImageTransform(size=32, mean=CLIP_MEAN, std=CLIP_STD, mode="pad")
    red = (255, 0, 0)
    out = t(solid((64, 32), red))  # padded to 64×64: rows 16..47 are the image → rows 8..23 after resizing
    assert out.shape == (3, 32, 32)
    border = torch.cat([out[:, :5], out[:, -5:]], dim=1)
    for c in range(3):  # the pad colour is int(mean · 255), as LLaVA's expand2square: within 1/255/std ≈ 0.015 of 0
        assert border[c].abs().max() < 0.015, f"padding of channel {c} is not the mean colour"
    torch.testing.assert_close(border[:, 0, 0], normalised((122, 116, 104), CLIP_MEAN, CLIP_STD), atol=1e-6, rtol=0)
    inside = normalised(red, CLIP_MEAN, CLIP_STD).view(3, 1, 1).expand(3, 8, 32)
    torch.testing.assert_close(out[:, 12:20, :], inside, atol=0.02, rtol=0)


def test_pad_mode_pads_tall_image_left_and_right():
    t = ImageTransform(size=32, mean=HALF, std=HALF, mode="pad")
    out = t(solid((16, 48), (255, 255, 255)))
    assert out[:, :, :4].abs().max() < 0.01 and out[:, :, -4:].abs().max() < 0.01
    torch.testing.assert_close(out[:, :, 14:18], torch.ones(3, 32, 4), atol=0.02, rtol=0)


def test_center_crop_keeps_the_centre():
    t = ImageTransform(size=32, mean=HALF, std=HALF, mode="center_crop")
    image = solid((96, 32), (255, 0, 0))
    image.paste(solid((32, 32), (0, 255, 0)), (32, 0))  # the middle third is green
    out = t(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, normalised((0, 255, 0), HALF, HALF).view(3, 1, 1).expand(3, 32, 32))


@pytest.mark.parametrize("size", [(50, 30), (30, 50), (17, 200), (32, 32)])
def test_center_crop_output_size(size):
    assert ImageTransform(size=24, mode="center_crop")(solid(size, (10, 20, 30))).shape == (3, 24, 24)


def test_resize_mode_stretches():
    t = ImageTransform(size=32, mean=HALF, std=HALF, mode="resize")
    image = solid((96, 32), (255, 0, 0))
    image.paste(solid((48, 32), (0, 0, 255)), (48, 0))
    out = t(image)
    assert out.shape == (3, 32, 32)
    left = normalised((255, 0, 0), HALF, HALF).view(3, 1, 1).expand(3, 32, 12)
    right = normalised((0, 0, 255), HALF, HALF).view(3, 1, 1).expand(3, 32, 12)
    torch.testing.assert_close(out[:, :, :12], left, atol=0.02, rtol=0)
    torch.testing.assert_close(out[:, :, -12:], right, atol=0.02, rtol=0)


def test_transform_converts_grayscale_and_rgba():
    t = ImageTransform(size=8, mean=HALF, std=HALF, mode="resize")
    assert t(Image.new("L", (8, 8), 255)).shape == (3, 8, 8)
    torch.testing.assert_close(t(Image.new("RGBA", (8, 8), (255, 255, 255, 0))), torch.ones(3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"size": 32, "mode": "squash"}, "mode 'squash' is not one of"), ({"size": 0}, "must be positive")]
)
def test_transform_rejects_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ImageTransform(**kwargs)


# -- ConvNeXt (a stage's feature map as a patch grid) --------------------------------------------------


def test_convnext_stages_are_timm_s_feature_maps_as_patch_grids(tmp_path):
    from mllm_kit.encoders.timm_convnext import TimmConvNeXtEncoder

    spec = tiny_encoder_spec("convnext", image_size=64)
    last, third = ENCODERS.build(spec), ENCODERS.build({**spec, "select_layer": -2})
    assert isinstance(last, TimmConvNeXtEncoder)
    assert (last.embed_dim, last.patch_size, last.grid, third.embed_dim, third.patch_size, third.grid) == (64, 32, (2, 2), 48, 16, (4, 4))
    x = torch.randn(2, 3, 64, 64)
    feats = third(x)
    m = third.model
    stage3 = m.stages[:3](m.stem(x))
    torch.testing.assert_close(feats.selected, stage3.flatten(2).transpose(1, 2))
    torch.testing.assert_close(last(x).selected, m.forward_features(x).flatten(2).transpose(1, 2))
    assert [h.shape[1:] for h in feats.hidden_states] == [(256, 16), (256, 16), (64, 32), (16, 48), (4, 64)]
    saved = third.save_pretrained(tmp_path / "convnext")
    again = ENCODERS.build({"name": "timm_convnext", **saved, "select_layer": -2})
    torch.testing.assert_close(again(x).selected, feats.selected)


def test_convnext_options_fail_clearly(tmp_path):
    spec = tiny_encoder_spec("convnext", image_size=64)
    with pytest.raises(ConfigError, match="select_layer=5 is out of range for 4 blocks"):
        ENCODERS.build({**spec, "select_layer": 5})
    with pytest.raises(ConfigError, match="image_size 16 is smaller than the stride 32"):
        ENCODERS.build({**spec, "image_size": 16})
    with pytest.raises(ConfigError, match="is not a ConvNeXt; use the 'timm' encoder"):
        ENCODERS.build({"name": "timm_convnext", "model_name": "vit_tiny_patch16_224"})


def test_a_convnext_llava_trains_and_reloads(tmp_path):
    from mllm_kit import MLLM, Batch
    from mllm_kit.config import resolve_model
    from mllm_kit.tiny import tiny_llm_spec

    model = MLLM.build(resolve_model({**tiny_encoder_spec("convnext", image_size=64), "select_layer": -2}, "mlp2x_gelu",
                                     tiny_llm_spec("llama")))
    n = model.tokens_per_image()
    assert n == 16
    ids = torch.cat([torch.randint(10, 300, (2, 3)), torch.full((2, n), model.image_token_id), torch.randint(10, 300, (2, 4))], 1)
    batch = Batch(input_ids=ids, labels=ids.clone(), pixel_values=torch.randn(2, 3, 64, 64), num_image_tokens=2 * n)
    model(batch).logits.mean().backward()
    assert model.connector.mlp[0].weight.grad is not None and all(p.grad is None for p in model.encoder.parameters())
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(MLLM.from_pretrained(tmp_path / "m")(batch).logits, model(batch).logits)


@pytest.mark.parametrize("family", ["timm_vit", "clip"])
def test_activation_checkpointing_recomputes_a_trainable_encoder_with_equal_gradients(family):
    from mllm_kit import MLLM
    from mllm_kit.config import resolve_model
    from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

    model = MLLM.build(resolve_model(tiny_encoder_spec(family), "mlp2x_gelu", tiny_llm_spec("llama"))).train()
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    pixels = torch.randn(model.encoder.dummy_pixels("cpu").shape, generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model.encode_images(pixels).tokens.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_activation_checkpointing()
    assert model.encoder.checkpoint_blocks and (family != "clip" or model.encoder.model.is_activation_checkpointing)
    recomputed = grads()
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_features_cast_to_another_dtype_layer_by_layer_when_read():
    """VisualFeatures.to (a bf16 tower feeding an fp32 connector): every way of reading a layer gives it in the new
    dtype, equal to casting it, and a layer nobody reads is never copied."""
    from mllm_kit.encoders.base import VisualFeatures

    states = tuple(torch.randn(2, 4, 8, dtype=torch.bfloat16) for _ in range(4))
    f = VisualFeatures(hidden_states=states, grid=(2, 2), selected_layer=2)
    assert f.to(torch.bfloat16) is f
    up = f.to(torch.float32)
    assert torch.equal(up.selected, states[2].float()) and up.selected.dtype == torch.float32
    assert up.selected is up.hidden_states[-2]  # cast once, then reused
    assert set(up.hidden_states._cast) == {2}  # layers 0, 1, 3 not copied
    assert [h.dtype for h in up.hidden_states] == [torch.float32] * 4
    assert all(torch.equal(a, b.float()) for a, b in zip(up.hidden_states[1:3], states[1:3]))
    with pytest.raises(IndexError):
        up.hidden_states[4]
