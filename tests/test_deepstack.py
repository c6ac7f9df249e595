"""DeepStack-L (§3.1): crop grids, polyphase stacks, injection exactly at the image positions of the chosen
layers (several images per sample, padding), prefill-only injection during cached generation."""

import pytest
import torch
from PIL import Image

from mllm_kit import MLLM
from mllm_kit.batch import Batch
from mllm_kit.connectors.base import build_connector
from mllm_kit.connectors.deepstack import build_stacks
from mllm_kit.data.transforms import CropGridTransform, ImageTransform, best_grid, crop_grids
from mllm_kit.errors import ConfigError
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_component, resolve_model


def test_candidate_grids_and_best_fit():
    assert sorted(crop_grids(4)) == [(1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert best_grid(1000, 1000, 336, crop_grids(4)) == (2, 2)
    assert best_grid(1344, 336, 336, crop_grids(4)) == (1, 4)  # wide image → one row of four crops
    assert best_grid(600, 1400, 336, crop_grids(4)) == (3, 1)  # tall image → a column of crops
    # LLaVA-NeXT's rule counts no more pixels than the image has, so a small square image is not blown up to 2×2
    assert best_grid(336, 336, 336, crop_grids(4)) == (1, 2)


def test_crop_transform_cuts_the_resized_image_row_major():
    base = ImageTransform(size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), mode="resize")
    image = Image.new("RGB", (64, 64))
    for x in range(64):
        for y in range(64):
            image.putpixel((x, y), (10 * (x // 32) + 100 * (y // 32), 0, 0))  # a distinct value per quadrant
    views = CropGridTransform(base, tuple(crop_grids(4)))(image)
    assert views.grid == (2, 2) and views.crops.shape == (4, 3, 16, 16) and views.global_view.shape == (3, 16, 16)
    quadrant = (views.crops[:, 0, 4:12, 4:12] * 255).round().flatten(1)  # crop interiors, clear of resampling blur
    assert quadrant.min(1).values.tolist() == quadrant.max(1).values.tolist() == [0.0, 10.0, 100.0, 110.0]


def _crops(rows, cols, side, d=3):
    """Crop tokens whose value encodes their coordinate in the re-assembled high-resolution map."""
    out = torch.zeros(1, rows * cols, side * side, d)
    for a in range(rows):
        for b in range(cols):
            for r in range(side):
                for c in range(side):
                    out[0, a * cols + b, r * side + c] = torch.tensor([a * side + r, b * side + c, 0.0])
    return out


@pytest.mark.parametrize("rows,cols", [(2, 2), (1, 2), (3, 1)])
def test_2d_stacks_are_the_polyphase_components(rows, cols):
    side = 3
    stacks = build_stacks(_crops(rows, cols, side), rows, cols, side, "2d")
    for i in range(rows):
        for j in range(cols):
            coords = stacks[0, i * cols + j, :, :2].view(side, side, 2)
            expected_rows = torch.arange(side).mul(rows).add(i).view(side, 1).expand(side, side)
            expected_cols = torch.arange(side).mul(cols).add(j).view(1, side).expand(side, side)
            assert torch.equal(coords[..., 0], expected_rows.float()) and torch.equal(coords[..., 1], expected_cols.float())


def test_1d_and_grid_sampling():
    rows, cols, side = 2, 2, 2
    crops = _crops(rows, cols, side)
    assert torch.equal(build_stacks(crops, rows, cols, side, "grid"), crops)
    flat = build_stacks(crops, rows, cols, side, "2d")  # any sampling covers every high-res token exactly once
    one_d = build_stacks(crops, rows, cols, side, "1d")
    full = torch.stack([torch.tensor([float(r), float(c)]) for r in range(4) for c in range(4)])  # row-major map
    for k in range(4):
        torch.testing.assert_close(one_d[0, k, :, :2], full[k::4])
    assert sorted(map(tuple, flat[0, :, :, :2].reshape(-1, 2).tolist())) == sorted(map(tuple, full.tolist()))


def test_clip_l336_preset_token_count_layers_and_parameters():
    conn = build_connector(resolve_component("connectors", "deepstack"), [1024], 4096, (24, 24))
    mlp = build_connector(resolve_component("connectors", "mlp2x_gelu"), [1024], 4096, (24, 24))
    assert conn.num_tokens(576, (24, 24)) == 576 and conn.layers == [1, 2, 3, 4] and conn.num_crops == 4
    assert sum(p.numel() for p in conn.parameters()) == sum(p.numel() for p in mlp.parameters())
    with pytest.raises(ConfigError, match="inner connector must keep"):
        build_connector(resolve_component("connectors", {"preset": "deepstack", "inner": "resampler"}), [1024], 4096, (24, 24))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "deepstack", "start": 1, "interval": 2, "num_crops": 2},
                      tiny_llm_spec("llama", num_layers=5))).eval()


def _inputs(model, pad_last: int = 2):
    """Row 0: two images; row 1: one image, then right padding."""
    n, img = model.tokens_per_image(), model.image_token_id
    row0 = [5, *[img] * n, 6, 7, *[img] * n, 8]
    row1 = [9, 10, *[img] * n, 11, 12]
    row1 += [0] * (len(row0) - len(row1))
    mask = torch.ones(2, len(row0), dtype=torch.long)
    mask[1, len(row0) - (n + 3):] = 0
    g = torch.Generator().manual_seed(1)
    return Batch(input_ids=torch.tensor([row0, row1]), attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32, generator=g),
                 images_per_sample=[2, 1], num_image_tokens=3 * n, crop_pixel_values=torch.randn(6, 3, 32, 32, generator=g),
                 crop_grids=[(1, 2), (2, 1), (1, 2)])


def test_stacks_are_added_exactly_at_the_image_positions_of_their_layers(model):
    batch = _inputs(model)
    layers = model.llm.decoder_layers
    before, after = {}, {}
    handles = []
    for i, layer in enumerate(layers):  # a layer's input before every hook, and what its first sublayer reads
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: before.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()),
                                                       with_kwargs=True, prepend=True))
        handles.append(layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: after.__setitem__(i, a[0].clone())))
    try:
        with torch.no_grad():
            model(batch)
            out = model.encode_images(batch.pixel_values, crop_pixel_values=batch.crop_pixel_values, crop_grids=batch.crop_grids)
            expected = {s.layer: s.values for s in out.steps}
    finally:
        for h in handles:
            h.remove()
    assert sorted(expected) == [1, 3]
    image = batch.input_ids == model.image_token_id
    for i in range(len(layers)):
        delta = after[i] - before[i]
        if i not in expected:
            assert delta.abs().max() == 0, f"layer {i} got an injection"
            continue
        assert delta[~image].abs().max() == 0, f"layer {i}: something was added outside the image positions"
        torch.testing.assert_close(delta[image], expected[i].reshape(-1, delta.shape[-1]), atol=1e-5, rtol=1e-5)
    # the padded row-1 image has a (2, 1) grid: 2 real stacks; the row-0 images have (1, 2): stacks are not zero
    assert expected[1].abs().sum() > 0 and expected[3].abs().sum() > 0


def test_cached_generation_equals_decoding_without_a_cache(model):
    n, img = model.tokens_per_image(), model.image_token_id
    ids = torch.tensor([[5, *[img] * n, 6, 7], [8, *[img] * n, 9, 10]])
    g = torch.Generator().manual_seed(2)
    images = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g), crop_pixel_values=torch.randn(4, 3, 32, 32, generator=g),
                  crop_grids=[(1, 2), (2, 1)])
    generated = model.generate(ids, torch.ones_like(ids), max_new_tokens=6, stop_token_ids=[-1], **images)
    assert not any(layer._forward_pre_hooks for layer in model.llm.decoder_layers)  # nothing left hooked after generation
    seq = ids
    with torch.no_grad():
        for _ in range(6):  # prefill-then-decode without a cache: the whole sequence, injected, every step
            batch = Batch(input_ids=seq, attention_mask=torch.ones_like(seq), images_per_sample=[1, 1], num_image_tokens=2 * n, **images)
            seq = torch.cat([seq, model(batch).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq[:, ids.shape[1]:])
    # and the stacks matter: without them the logits differ
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), images_per_sample=[1, 1], num_image_tokens=2 * n, **images)
    with torch.no_grad():
        injected = model(batch).logits
        plain = model(Batch(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images["pixel_values"],
                            images_per_sample=[1, 1], num_image_tokens=2 * n)).logits
    assert (injected - plain).abs().max() > 1e-4


def test_injection_into_a_missing_layer_is_a_clear_error():
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "deepstack", tiny_llm_spec("llama")))  # 2 layers; stacks go to 1..4
    batch = _inputs(model)
    with pytest.raises(ConfigError, match="LLM has 2 decoder layers"):
        model(batch)


def test_gradients_reach_the_projector_through_the_stacks_with_activation_checkpointing(model):
    model.train()
    model.llm.model.activation_checkpointing_enable()
    try:
        batch = _inputs(model)
        batch.pixel_values = torch.zeros_like(batch.pixel_values)  # only the stacks carry image information
        model(batch).logits.square().mean().backward()
        grads = [p.grad for p in model.connector.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        model.llm.model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


def test_deepstack_v_adds_crop_stacks_to_global_patch_tokens_inside_the_encoder():
    """DeepStack-V (§3.3): at block start+k the global views' patch tokens (not CLS, not the crops) get stack k,
    taken from the crops' patch tokens at the input of block start."""
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip", num_layers=4), {"name": "deepstack_vit", "num_crops": 2, "start": 1},
                       tiny_llm_spec("llama"))).eval()
    assert model.tokens_per_image() == 16 and model.connector.num_crops == 2
    g = torch.Generator().manual_seed(3)
    pixels, crops, grids = torch.randn(2, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g), [(1, 2), (2, 1)]
    blocks = model.encoder.blocks
    before, after, handles = {}, {}, []
    for i, block in enumerate(blocks):  # a block's input before every hook, and what its first sublayer reads
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: before.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()),
                                                       with_kwargs=True, prepend=True))
        handles.append(block.layer_norm1.register_forward_pre_hook(lambda m, a, i=i: after.__setitem__(i, a[0].clone())))
    try:
        with torch.no_grad():
            out = model.encode_images(pixels, crop_pixel_values=crops, crop_grids=grids)
    finally:
        for h in handles:
            h.remove()
    from mllm_kit.connectors.deepstack import stacks_from_crops

    stacks = stacks_from_crops(before[1][2:, 1:], grids, 2, 4, "2d")  # crops' patch tokens at block 1's input
    for i in range(len(blocks)):
        delta = after[i] - before[i]
        if i not in (1, 2):
            assert delta.abs().max() == 0
            continue
        assert delta[2:].abs().max() == 0 and delta[:2, 0].abs().max() == 0  # crops and CLS untouched
        torch.testing.assert_close(delta[:2, 1:], stacks[:, i - 1])
    assert out.tokens.shape == (2, 16, model.llm.hidden_size) and out.steps == ()
    assert not any(block._forward_pre_hooks for block in blocks)  # the stacking hooks lived for that pass only
    plain = model.connector.inner([model.encoder(pixels)]).tokens
    assert (plain - out.tokens).abs().max() > 1e-4  # the stacks changed what the LLM sees
    with pytest.raises(ConfigError, match="encoder has 4 blocks"):
        bad = MLLM.build(resolve_model(tiny_encoder_spec("clip", num_layers=4), {"name": "deepstack_vit", "num_crops": 4, "start": 2}, tiny_llm_spec("llama")))
        bad.encode_images(pixels, crop_pixel_values=crops, crop_grids=grids)
