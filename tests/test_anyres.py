"""LLaVA-NeXT AnyRes (specs/components.md §3.2): per-image token counts from the size alone, equal to the official
formula and to what the model produces; mixed sizes through the data pipeline."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from mllm_kit import MLLM
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.conversation import ConversationEncoder, truncate
from mllm_kit.data.dataset import LlavaDataset
from mllm_kit.data.templates import get_template
from mllm_kit.data.transforms import best_grid, crop_grids
from mllm_kit.errors import ConfigError
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer
from test_real_geometry import CLIP_L_336, VICUNA_7B

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
