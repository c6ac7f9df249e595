"""LLaVA-NeXT AnyRes (specs/components.md §3.2): per-image token counts from the size alone, equal to the official
formula and to what the model produces; the views' pixels and the packed tokens equal transformers' LLaVA-NeXT
(image processor and ``LlavaNextModel``); mixed sizes through the data pipeline."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from test_real_geometry import CLIP_L_336, VICUNA_7B
from transformers import AutoTokenizer, LlamaConfig, LlavaNextConfig, LlavaNextModel, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from mllm_kit import MLLM
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.conversation import ConversationEncoder, truncate
from mllm_kit.data.dataset import LlavaDataset
from mllm_kit.data.templates import get_template
from mllm_kit.data.transforms import best_grid, crop_grids, fit_size
from mllm_kit.errors import ConfigError
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def official_tokens(width: int, height: int, pinpoints=PINPOINTS, crop=336, side=24) -> int:
    """transformers' LlavaNext: base s² + the unpadded tiled crop map with one newline per row."""
    rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, crop)
    unpadded = unpad_image(torch.zeros(1, rows * side, cols * side), (height, width))
    return side * side + unpadded.shape[1] * (unpadded.shape[2] + 1)


@pytest.fixture(scope="module")
def llava_next():
    with torch.device("meta"):
        return MLLM.build(resolve_model(CLIP_L_336, "anyres", {**VICUNA_7B, "tokenizer": str(tiny_tokenizer())}))


@pytest.mark.parametrize("width, height", [(672, 672), (336, 1008), (1000, 300)])
def test_llava_next_token_counts_equal_the_official_formula(llava_next, width, height):
    assert llava_next.tokens_per_image((width, height)) == official_tokens(width, height)


def test_the_published_sizes_give_the_known_counts(llava_next):
    assert llava_next.tokens_per_image((672, 672)) == 576 + 48 * 49 == 2928
    assert llava_next.tokens_per_image((336, 1008)) == 576 + 72 * 25


def test_best_grid_is_select_best_resolution_for_every_size():
    g = torch.Generator().manual_seed(0)
    for w, h in torch.randint(1, 2000, (300, 2), generator=g).tolist():
        rows, cols = best_grid(w, h, 336, [(p[0] // 336, p[1] // 336) for p in PINPOINTS])
        assert (rows * 336, cols * 336) == tuple(select_best_resolution((h, w), PINPOINTS))
        assert best_grid(w, h, 336, crop_grids(4)) in crop_grids(4)


def test_counts_match_the_official_formula_for_odd_sizes(llava_next):
    g = torch.Generator().manual_seed(1)
    sizes = [(1, 1), (337, 335), (2000, 7), (7, 2000), *torch.randint(1, 1500, (200, 2), generator=g).tolist()]
    for w, h in sizes:
        assert llava_next.tokens_per_image((w, h)) == official_tokens(w, h), (w, h)


# Landscape, portrait and odd sizes; all but the last two are sizes where the resized side (h·scale or w·scale) is
# not an integer and LLaVA-NeXT's ceil differs from round: (1000, 300) → 1008×303, not 302; (640, 481) → 672×506.
PIXEL_SIZES = [(1000, 300), (300, 1000), (640, 481), (481, 640), (1001, 337), (337, 1001), (799, 601), (500, 333), (37, 23)]


def processor(cls, size: int, pinpoints, mean, std):
    """transformers' LLaVA-NeXT image processor as llava-hf/llava-v1.6-* configure it (shortest edge = crop = the
    tower's size), with the tower's mean/std."""
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints,
               image_mean=list(mean), image_std=list(std))


def views(transform, image):
    """Base view then the crops, row-major: ``[1 + rows·cols, 3, S, S]``, the order transformers' processor returns."""
    v = transform(image)
    return torch.cat([v.global_view[None], v.crops])


def test_fit_size_rounds_up_as_llava_next():
    # resize_and_pad_image / get_patch_output_size: the filled side is exact, the other is ceil'd (capped), equal scales fill the height
    assert fit_size(1000, 300, 1008, 336) == (1008, 303) and fit_size(300, 1000, 336, 1008) == (303, 1008)
    assert fit_size(640, 481, 672, 672) == (672, 506) and fit_size(336, 336, 672, 672) == (672, 672)
    assert fit_size(1, 1000, 1008, 336) == (1, 336)  # never 0 px


@pytest.mark.parametrize("width, height", PIXEL_SIZES)
def test_views_equal_the_llava_next_processor_pixel_for_pixel(llava_next, width, height):
    """Base view (the image stretched to 336², bicubic) and every crop of the resized, black-padded image equal
    transformers' PIL ``LlavaNextImageProcessorPil`` (LLaVA-NeXT's own pipeline: PIL bicubic resize, ceil'd size,
    ``(canvas − resized) // 2`` offset, CLIP normalisation). Tolerance 1e-6: both normalise the same uint8 pixels in
    float32, (x/255 − mean)/std, and may order the float ops differently."""
    transform = llava_next.make_image_transform("resize")
    image = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = processor(LlavaNextImageProcessorPil, 336, PINPOINTS, transform.base.mean, transform.base.std)
    out = reference(image, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[height, width]]
    torch.testing.assert_close(views(transform, image), out["pixel_values"][0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("width, height", PIXEL_SIZES)
def test_crop_geometry_equals_the_default_torchvision_processor(llava_next, width, height):
    """transformers 5's default ``LlavaNextImageProcessor`` (torchvision backend) computes the same resized size and
    offset but resamples with torch's antialiased bicubic, which differs from PIL's by up to 1 level on smooth images
    and more on noise; on a one-colour image resampling is exact in both, so the padding edges — where round vs ceil
    showed as a 1 px shift — are compared alone. Tolerance 1e-5: the torchvision path fuses rescale and normalise."""
    transform = llava_next.make_image_transform("resize")
    image = Image.new("RGB", (width, height), (201, 77, 140))
    reference = processor(LlavaNextImageProcessor, 336, PINPOINTS, transform.base.mean, transform.base.std)
    torch.testing.assert_close(views(transform, image), reference(image, return_tensors="pt")["pixel_values"][0], rtol=0, atol=1e-5)


def test_packed_tokens_equal_llava_next_model():
    """End to end against transformers: the same tiny CLIP tower, mlp2x_gelu and image_newline loaded into
    ``LlavaNextModel``; its ``get_image_features`` on the PIL processor's pixels (base, then the unpadded crop map row by
    row, each row ended by the newline — ``pack_image_features``) equals mllm-kit's ``encode_images`` on its own views,
    token for token and in order; the count also equals the processor's ``image_sizes``-based count. Tolerance 1e-5:
    the same float32 weights on the same pixels, batched differently."""
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "anyres", "pinpoints": TINY_PINPOINTS},
                                     tiny_llm_spec("llama"))).eval()
    tower, mlp, d = model.encoder.model, model.connector.inner.mlp, model.llm.hidden_size
    text = LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    config = LlavaNextConfig(vision_config=tower.config.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=TINY_PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    reference = LlavaNextModel(config).eval()
    reference.vision_tower.load_state_dict(tower.state_dict())
    reference.multi_modal_projector.linear_1.load_state_dict(mlp[0].state_dict())
    reference.multi_modal_projector.linear_2.load_state_dict(mlp[2].state_dict())
    with torch.no_grad():
        reference.image_newline.copy_(model.connector.image_newline)
    transform = model.make_image_transform("resize")
    pixels = processor(LlavaNextImageProcessorPil, 32, TINY_PINPOINTS, transform.base.mean, transform.base.std)
    counts = LlavaNextProcessor(image_processor=pixels, tokenizer=AutoTokenizer.from_pretrained(str(tiny_tokenizer())), patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(3)
    # (61, 47) → 64×50 in a 2×2 grid (round gave 49), (20, 13) → 50×32, (95, 33) → 93×32; the rest: landscape/portrait
    for width, height in [(61, 47), (47, 61), (20, 13), (95, 33), (100, 30), (30, 100), (64, 32)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        inputs = pixels(image, return_tensors="pt")
        v = transform(image)
        with torch.no_grad():
            expected = reference.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output[0]
            tokens = model.encode_images(v.global_view[None], crop_pixel_values=v.crops, crop_grids=[v.grid],
                                         image_sizes=[(width, height)]).tokens
        assert tokens.shape[0] == model.tokens_per_image((width, height)), (width, height)
        assert counts._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens == [tokens.shape[0]]
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5, msg=f"image {(width, height)}: tokens differ")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"preset": "anyres", "pinpoints": TINY_PINPOINTS},
                                    tiny_llm_spec("llama"))).eval()


def test_predicted_count_equals_what_the_model_produces(tiny):
    transform = tiny.make_image_transform()
    g = torch.Generator().manual_seed(2)
    sizes = [(p[1], p[0]) for p in TINY_PINPOINTS] + [(1, 1), (33, 31), (200, 9), *torch.randint(1, 150, (20, 2), generator=g).tolist()]
    for w, h in sizes:
        views = transform(Image.new("RGB", (w, h), (90, 20, 200)))
        out = tiny.encode_images(views.global_view[None], crop_pixel_values=views.crops, crop_grids=[views.grid],
                                 image_sizes=[(w, h)])
        assert out.tokens.shape == (tiny.tokens_per_image((w, h)), tiny.llm.hidden_size), (w, h)
        assert out.tokens.shape[0] == official_tokens(w, h, TINY_PINPOINTS, 32, 4)


def test_a_static_count_is_refused_and_a_wrong_grid_is_caught(tiny):
    with pytest.raises(ConfigError, match="depends on its size"):
        tiny.tokens_per_image()
    views = tiny.make_image_transform()(Image.new("RGB", (64, 32)))
    with pytest.raises(ConfigError, match="crop grid"):
        tiny.encode_images(views.global_view[None], crop_pixel_values=views.crops, crop_grids=[views.grid], image_sizes=[(32, 64)])


def test_mixed_sizes_batch_through_the_data_pipeline(tiny, tmp_path):
    sizes = [(64, 32), (32, 96), (50, 50), (90, 20)]
    records = []
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * k, 100, 30)).save(tmp_path / f"{k}.png")
        records.append({"id": f"s{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": f"colour {k}"}]})
    (tmp_path / "d.json").write_text(json.dumps(records))
    encoder = ConversationEncoder(tiny.tokenizer, get_template("chatml"), tiny.image_token_id, tiny.image_token_count())
    ds = LlavaDataset(tmp_path / "d.json", None, encoder, tiny.make_image_transform())
    samples = [ds[k] for k in range(len(sizes))]
    for s, size in zip(samples, sizes):
        assert s.num_image_tokens == tiny.tokens_per_image(size) and s.image_sizes == [size]
    batch = PadCollator(tiny.tokenizer.pad_token_id)(samples)
    # crops are concatenated per image (Σ rows·cols), never padded to the largest grid
    assert batch.crop_pixel_values.shape[0] == sum(r * c for r, c in batch.crop_grids) < len(sizes) * max(r * c for r, c in batch.crop_grids)
    out = tiny(batch)
    assert out.hidden.shape[:2] == batch.input_ids.shape
    # each image's span has its own length, and truncation moves a cut inside a span to the span's start
    encoded = encoder.encode_text("a <image> b <image> c" * 1, supervised=[(0, 1), (len("a <image> b <image> "), 21)],
                                  image_sizes=[(64, 32), (32, 96)])
    assert [span.length for span in encoded.image_spans] == [tiny.tokens_per_image((64, 32)), tiny.tokens_per_image((32, 96))]
    second = encoded.image_spans[1]
    cut = truncate(encoded, second.start + 3, "trim")
    assert len(cut) == second.start and len(cut.image_spans) == 1
    with pytest.raises(ConfigError, match="2 <image> placeholders came with 1 image sizes"):
        encoder.encode_text("<image><image>", image_sizes=[(5, 5)])
