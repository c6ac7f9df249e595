"""Encoder mixtures and their fusions (specs/components.md §5): members, equivalences, errors, saving, stages."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mllm_kit import MLLM
from mllm_kit.config import resolve_component, resolve_model
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import ENCODERS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.training.trainable import apply_trainable

CLIP = {**tiny_encoder_spec("clip"), "select_layer": -2}
DINO = {**tiny_encoder_spec("dinov2", image_size=48), "select_layer": -1}


def mixture(**members):
    return {"name": "mixture", "members": members or {"clip": CLIP, "dino": DINO}}


def build(encoder, connector):
    torch.manual_seed(0)
    return MLLM.build(resolve_model(encoder, connector, tiny_llm_spec("llama")))


def image(w=40, h=30):
    img = Image.new("RGB", (w, h))
    img.putdata([((7 * i) % 256, (3 * i) % 256, (11 * i) % 256) for i in range(w * h)])
    return img


def test_one_member_mixture_gives_exactly_the_single_encoder_s_features():
    single = ENCODERS.build(resolve_component("encoders", CLIP))
    mix = ENCODERS.build(resolve_component("encoders", mixture(clip=CLIP)))
    img = image()
    pixels, flat = single.image_transform(img), mix.image_transform(img)
    assert torch.equal(flat, pixels.flatten())  # the member's transform, flattened
    (got,) = mix.features(flat[None])
    want = single(pixels[None])
    assert got.grid == want.grid and len(got.hidden_states) == len(want.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))


def test_members_keep_their_own_resolution_normalisation_and_layer():
    mix = ENCODERS.build(resolve_component("encoders", mixture()))
    clip, dino = mix.members["clip"], mix.members["dino"]
    assert mix.feature_dims == [64, 64] and mix.feature_grids == [(4, 4), (6, 6)]
    flat = mix.image_transform(image())
    assert flat.numel() == 3 * 32 * 32 + 3 * 48 * 48
    a, b = mix.member_pixels(flat[None])
    assert torch.equal(a[0], clip.image_transform(image())) and torch.equal(b[0], dino.image_transform(image()))
    fa, fb = mix.features(flat[None])
    assert fa.selected_layer == clip.selected_layer == 2 and fb.selected_layer == dino.selected_layer == 3


def test_channel_concat_at_equal_grids_is_exactly_torch_cat():
    model = build(mixture(clip=CLIP, dino={**tiny_encoder_spec("dinov2"), "select_layer": -1}), "channel_concat")
    flat = model.encoder.image_transform(image())[None]
    features = model.encoder.features(flat)
    assert torch.equal(model.connector.fuse(features), torch.cat([f.selected for f in features], dim=-1))
    assert model.connector.fused_dim == 128 and model.tokens_per_image() == 16


def test_channel_concat_resamples_to_the_common_grid_bilinearly_with_aligned_corners():
    model = build(mixture(), {"name": "channel_concat", "target_grid": "dino"})
    assert model.connector.fused_grid == (6, 6) and model.tokens_per_image() == 36
    f = [VisualFeatures((torch.arange(16.0).view(1, 16, 1).expand(1, 16, 64),), (4, 4), 0),
         VisualFeatures((torch.zeros(1, 36, 64),), (6, 6), 0)]
    fused = model.connector.fuse(f)
    grid = fused[0, :, 0].view(6, 6)
    assert grid[0, 0] == 0 and grid[-1, -1] == 15 and torch.allclose(grid[0, -1], torch.tensor(3.0))  # corners kept


def test_sequence_concat_places_members_one_after_another_with_a_separator():
    model = build(mixture(), {"name": "sequence_concat", "separator": True})
    assert model.tokens_per_image() == 16 + 1 + 36
    out = model.encode_images(model.encoder.image_transform(image())[None]).tokens
    assert out.shape == (1, 53, model.llm.hidden_size)
    assert torch.equal(out[0, 16], model.connector.separator.detach())


def test_comm_merges_every_clip_layer_and_dino_s_deeper_layers():
    model = build(mixture(), "comm")
    clip, dino = model.connector.merges
    assert clip.layers == [1, 2, 3] and dino.layers == [1, 2, 3]  # 3-block towers: the "last six" are all three
    deep = build(mixture(), {"name": "comm", "layers": {"dino": [3]}})
    assert deep.connector.merges[1].layers == [3]
    tokens = deep.encode_images(deep.encoder.image_transform(image())[None]).tokens
    assert tokens.shape == (1, 16, deep.llm.hidden_size)
    tokens.sum().backward()
    assert deep.connector.merges[0].weights.grad is not None and deep.connector.align[0][0].weight.grad is not None


@pytest.mark.parametrize("connector, message", [
    ({"name": "comm", "layers": {"sam": [1]}}, "no encoder member named 'sam'"),
    ({"name": "channel_concat", "target_grid": "siglip"}, "no encoder member named 'siglip'"),
    ({"name": "comm", "layers": {"dino": [9]}}, "must be non-empty indices in 0..3"),
    ("mlp2x_gelu", "takes one encoder, got 2; use a fusion connector"),
])
def test_fusion_options_naming_unknown_members_or_layers_fail_with_the_key(connector, message):
    with pytest.raises(ConfigError, match=message):
        build(mixture(), connector)


def test_members_whose_tokens_cannot_be_aligned_are_refused():
    siglip = {**tiny_encoder_spec("siglip"), "drop_first_patch": True}
    with pytest.raises(ConfigError, match="member 'siglip' gives a token list"):
        build(mixture(clip=CLIP, siglip=siglip), "channel_concat")
    with pytest.raises(ConfigError, match="encoder.resample.sam: no member named 'sam'"):
        build({**mixture(), "resample": {"sam": [2, 2]}}, "channel_concat")
    with pytest.raises(ConfigError, match="encoder.members.dino: .*image_size 4 is smaller than patch_size 8"):
        build(mixture(clip=CLIP, dino={**DINO, "image_size": 4}), "channel_concat")


def test_resample_changes_a_member_s_grid_for_every_layer():
    model = build({**mixture(), "resample": {"dino": [2, 2]}}, "sequence_concat")
    assert model.encoder.feature_grids == [(4, 4), (2, 2)] and model.tokens_per_image() == 16 + 4
    dino = model.encoder.features(model.encoder.image_transform(image())[None])[1]
    assert all(h.shape[1] == 4 for h in dino.hidden_states)


def test_members_train_by_name_and_a_mixture_saves_and_reloads(tmp_path):
    model = build(mixture(), "channel_concat")
    counts = apply_trainable(model, ["encoder.members.dino", "connector"])
    assert all(p.requires_grad for p in model.encoder.members["dino"].parameters())
    assert not any(p.requires_grad for p in model.encoder.members["clip"].parameters())
    assert counts["encoder"][0] == sum(p.numel() for p in model.encoder.members["dino"].parameters())
    with torch.no_grad():
        for p in model.encoder.members["dino"].parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    x = model.encoder.image_transform(image())[None]
    torch.testing.assert_close(again.encode_images(x).tokens, model.encode_images(x).tokens, rtol=0, atol=0)


def test_member_order_survives_saving(tmp_path):
    model = build(mixture(dino=DINO, clip=CLIP), "sequence_concat")
    assert model.encoder.feature_names == ["dino", "clip"] and model.tokens_per_image() == 36 + 16
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    assert again.encoder.feature_names == ["dino", "clip"]
    x = model.encoder.image_transform(image())[None]
    assert torch.equal(again.encode_images(x).tokens, model.encode_images(x).tokens)


def test_preset_members_merge_with_overrides():
    spec = resolve_component("encoders", {"preset": "eagle_x2", "members": {"clip": {"image_size": 336}}})
    assert list(spec["members"]) == ["clip", "convnext"]
    assert spec["members"]["clip"]["image_size"] == 336 and spec["members"]["clip"]["name"] == "hf_clip"
    assert spec["members"]["convnext"]["name"] == "timm_convnext"


# Eagle's one input (specs/components.md §5.1; NVlabs/Eagle multi_backbone_channel_concatenation_encoder.py): the
# ConvNeXt tower's CLIPImageProcessor (CLIP mean/std, shortest side to the input size, bicubic, centre crop; the SFT
# pads to a square with the mean colour first), then F.interpolate(x.float(), tower size, bilinear, align_corners=True)
# for every tower whose size differs. Scaled down: a 80 px shared input, CLIP at 32 px (Eagle: 1024 and 336).
EAGLE_LIKE = {"name": "mixture", "normalize": "shared", "members": {
    "clip": CLIP, "convnext": {**tiny_encoder_spec("convnext"), "image_size": 80, "image_mode": "center_crop"}}}


def eagle_official_pixels(img, size=80, tower_sizes=(32, 80), pad=False):
    """Each tower's input as Eagle builds it: one processed image, resized per tower."""
    import torch.nn.functional as F
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mllm_kit.data.transforms import CLIP_MEAN, CLIP_STD

    if pad:  # Eagle's expand2square: the mean colour as int(m·255), the image centred
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    x = processor(img, return_tensors="pt")["pixel_values"]
    return [x if s == size else F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=True).to(x.dtype)
            for s in tower_sizes]


@pytest.mark.parametrize("mode", ["center_crop", "pad"])
@pytest.mark.parametrize("w, h", [(120, 70), (50, 97), (80, 80)])
def test_shared_normalisation_gives_every_member_eagle_s_pixels(mode, w, h):
    """``normalize: shared``: the image is processed once, by the highest-resolution member's transform, and every
    other member reads that tensor resized bilinearly with aligned corners — Eagle's pipeline, pixel for pixel.
    Tolerance 1e-6: float32 normalisation of the same uint8 pixels; the interpolation is the same torch call."""
    mix = ENCODERS.build(resolve_component("encoders", EAGLE_LIKE))
    transform = mix.image_transform.with_mode(mode)
    pixels = transform(image(w, h))[None]
    assert pixels.shape == (1, 3, 80, 80) and transform.mean == mix.members["convnext"].image_transform.mean
    got = mix.member_pixels(pixels)
    want = eagle_official_pixels(image(w, h), pad=mode == "pad")
    assert [tuple(x.shape) for x in got] == [(1, 3, 32, 32), (1, 3, 80, 80)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    clip, _ = mix.features(pixels)  # the members run on exactly those inputs
    assert torch.equal(clip.selected, mix.members["clip"](want[0]).selected)
    assert mix.dummy_pixels("cpu").shape == (1, 3, 80, 80)


def test_per_member_normalisation_stays_the_default_and_an_option():
    per_member = ENCODERS.build(resolve_component("encoders", {**EAGLE_LIKE, "normalize": "per_member"}))
    assert per_member.normalize == ENCODERS.build(resolve_component("encoders", mixture())).normalize == "per_member"
    a, _ = per_member.member_pixels(per_member.image_transform(image())[None])
    assert torch.equal(a[0], per_member.members["clip"].image_transform(image()))  # CLIP's own resize from the image
    assert not torch.allclose(a, eagle_official_pixels(image())[0], atol=1e-3)
    with pytest.raises(ConfigError, match=r"encoder.normalize: 'mean' is not one of per_member, shared"):
        ENCODERS.build(resolve_component("encoders", {**EAGLE_LIKE, "normalize": "mean"}))
    shared = ENCODERS.build(resolve_component("encoders", EAGLE_LIKE))
    with pytest.raises(ConfigError, match=r"not the shared input \[n_img, 3, 80, 80\]"):
        shared.member_pixels(per_member.image_transform(image())[None])


def test_eagle_preset_and_recipe_use_eagle_s_one_input():
    """eagle_x2: shared input from the ConvNeXt member (1024 px, CLIP mean/std, centre crop), CLIP at 336 px as
    Eagle's clip-448 tower is built (input_image_size 336); the recipe's SFT pads to a square (image_aspect_ratio pad)
    and its alignment keeps the processor's centre crop (the pretrain script sets no image_aspect_ratio)."""
    from mllm_kit.config import load_recipe

    spec = resolve_component("encoders", "eagle_x2")
    assert spec["normalize"] == "shared" and spec["members"]["clip"]["image_size"] == 336
    assert spec["members"]["convnext"]["image_size"] == 1024 and spec["members"]["convnext"]["image_mode"] == "center_crop"
    recipe = load_recipe("eagle")
    assert recipe.model.encoder["normalize"] == "shared"
    assert recipe.stage("align").data.image_mode is None and recipe.stage("sft").data.image_mode == "pad"


def _recipe(stages):
    from mllm_kit.config.load import recipe_from_dict

    return recipe_from_dict({"name": "r", "model": {"encoder": mixture(), "connector": "channel_concat", "llm": tiny_llm_spec("llama")},
                             "stages": stages})


def test_pre_align_stages_are_checked_at_recipe_load():
    recipe = _recipe([{"name": "pre", "pre_align": "dino", "trainable": ["encoder", "connector"]},
                      {"name": "joint", "model": {}, "init_members": {"dino": "pre"}, "trainable": ["connector"]}])
    pre, joint = recipe.stages
    assert pre.model.encoder["name"] == "hf_dinov2" and pre.model.connector["name"] == "mlp"
    assert joint.init_members == {"dino": "pre"}
    with pytest.raises(ConfigError, match=r"stages\[0\].pre_align: the encoder mixture has no member 'sam'"):
        _recipe([{"name": "pre", "pre_align": "sam", "trainable": ["connector"]}])
    with pytest.raises(ConfigError, match=r"init_members.dino: stage 'a' does not pre-align member 'dino'"):
        _recipe([{"name": "a", "trainable": ["connector"]}, {"name": "b", "init_members": {"dino": "a"}, "trainable": ["connector"]}])
    with pytest.raises(ConfigError, match=r"init_members.dino: 'later' is not an earlier stage"):
        _recipe([{"name": "b", "init_members": {"dino": "later"}, "trainable": ["connector"]},
                 {"name": "later", "pre_align": "dino", "trainable": ["connector"]}])
