"""mllm-kit assembled from the same weights as transformers' LLaVA gives the same logits."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from mllm_kit import MLLM, Batch
from mllm_kit.encoders.hf import SigLIPEncoder
from mllm_kit.errors import ConfigError
from mllm_kit.interop.llava import from_hf_llava
from mllm_kit.registry import ENCODERS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer
from mllm_kit.config import resolve_model


def _clip_llama_llava(tok, strategy: str) -> LlavaForConditionalGeneration:
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    llava = _clip_llama_llava(tok, "default")
    ours = from_hf_llava(llava, tok, tmp_path_factory.mktemp("llava")).eval()
    return llava, ours, llava.config.image_token_id


def test_logits_match_transformers_llava(llava_pair):
    llava, ours, image_token_id = llava_pair
    n = ours.tokens_per_image()
    assert n == 16  # 32/8 = 4×4 patches, CLS dropped
    torch.manual_seed(1)
    text = torch.randint(10, 300, (2, 12))
    ids = torch.cat([text[:, :3], torch.full((2, n), image_token_id), text[:, 3:]], dim=1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels).logits
        got = ours(Batch(input_ids=ids, pixel_values=pixels, num_image_tokens=2 * n)).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_image_changes_logits(llava_pair):
    """Guard against a vacuous parity: the image must influence the text positions."""
    _, ours, image_token_id = llava_pair
    n = ours.tokens_per_image()
    ids = torch.cat([torch.full((1, n), image_token_id), torch.randint(10, 300, (1, 5))], dim=1)
    with torch.no_grad():
        a = ours.llm(inputs_embeds=ours.embed_inputs(Batch(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)))[0]).logits[:, -1]
        b = ours.llm(inputs_embeds=ours.embed_inputs(Batch(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)))[0]).logits[:, -1]
    assert (a - b).abs().max() > 1e-4


# -- a tiny SigLIP + Qwen2 LLaVA; batches built as the data pipeline does (each <image> → N image-token ids) --
def _siglip_qwen2_llava(tok, strategy: str, **options) -> LlavaForConditionalGeneration:
    """A tiny random SigLIP + Qwen2 LLaVA; ``options`` override LlavaConfig fields."""
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4)
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        **{"projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": strategy, **options},
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["default", "full"])
def siglip_pair(request, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    llava = _siglip_qwen2_llava(tok, request.param)
    ours = from_hf_llava(llava, tok, tmp_path_factory.mktemp(f"llava_siglip_{request.param}")).eval()
    return llava, ours, tok, request.param


def _sample(segments: list[int | str], n: int, image_token_id: int, generator: torch.Generator) -> torch.Tensor:
    """Ids for one sample: an int k is k random text ids, "img" is n image-token ids (an expanded <image>)."""
    parts = [torch.full((n,), image_token_id) if s == "img" else torch.randint(14, 300, (s,), generator=generator)
             for s in segments]
    return torch.cat(parts)


def _right_padded(samples: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and attention mask, each sample left-aligned and padded on the right."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def _both_logits(llava, ours, ids, pixels, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    n_tokens = int((ids == llava.config.image_token_id).sum())
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = ours(Batch(input_ids=ids, pixel_values=pixels, attention_mask=mask, num_image_tokens=n_tokens)).logits
    assert got.shape == expected.shape
    return got, expected


def test_clip_full_keeps_the_cls_token(tmp_path):
    """CLIP `full` keeps CLS + patches (cls_patch): 17 tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    llava = _clip_llama_llava(tok, "full")
    ours = from_hf_llava(llava, tok, tmp_path).eval()
    assert ours.tokens_per_image() == 17 and ours.encoder.select_feature == "cls_patch"
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([_sample([3, "img", 9], 17, ours.image_token_id, g) for _ in range(2)])
    got, expected = _both_logits(llava, ours, ids, torch.randn(2, 3, 32, 32, generator=g))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- SigLIP tower (no CLS): transformers' `default` drops the first *patch*, `full` keeps all ------------------
SIGLIP_TOKENS = {"default": 15, "full": 16}  # 32/8 = 4×4 patches


def test_siglip_strategy_maps_to_the_token_count_transformers_uses(siglip_pair):
    llava, ours, _, strategy = siglip_pair
    assert ours.tokens_per_image() == SIGLIP_TOKENS[strategy]
    assert ours.encoder.drop_first_patch == (strategy == "default") and ours.encoder.select_feature == "patch"
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                  vision_feature_select_strategy=strategy).pooler_output
        got = ours.encode_images(pixels).tokens
    torch.testing.assert_close(got, torch.stack(list(expected)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("images_per_sample", [1, 2])
def test_siglip_logits_match_transformers_llava(siglip_pair, images_per_sample):
    llava, ours, _, strategy = siglip_pair
    n, image_id, g = SIGLIP_TOKENS[strategy], ours.image_token_id, torch.Generator().manual_seed(1)
    segments = [3, "img", 9] if images_per_sample == 1 else [2, "img", 4, "img", 6]
    ids = torch.stack([_sample(segments, n, image_id, g) for _ in range(2)])
    pixels = torch.randn(2 * images_per_sample, 3, 32, 32, generator=g)
    got, expected = _both_logits(llava, ours, ids, pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_siglip_logits_match_transformers_llava_right_padded(siglip_pair):
    llava, ours, tok, strategy = siglip_pair
    n, image_id, g = SIGLIP_TOKENS[strategy], ours.image_token_id, torch.Generator().manual_seed(3)
    samples = [_sample([3, "img", 4], n, image_id, g), _sample([2, "img", 3, "img", 8], n, image_id, g)]
    ids, mask = _right_padded(samples, tok.pad_token_id)
    assert mask[0].sum() < mask[1].sum() and mask[0, -1] == 0
    pixels = torch.randn(3, 3, 32, 32, generator=g)  # sample 0's image, then sample 1's two
    got, expected = _both_logits(llava, ours, ids, pixels, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_siglip_image_changes_logits(siglip_pair):
    _, ours, _, _ = siglip_pair
    ids = _sample(["img", 5], ours.tokens_per_image(), ours.image_token_id, torch.Generator().manual_seed(4))[None]
    with torch.no_grad():
        a = ours(Batch(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))).logits[:, -1]
        b = ours(Batch(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))).logits[:, -1]
    assert (a - b).abs().max() > 1e-4


def test_projector_activation_and_bias_follow_the_config(tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    llava = _siglip_qwen2_llava(tok, "full", multimodal_projector_bias=False, projector_hidden_act="silu")
    ours = from_hf_llava(llava, tok, tmp_path).eval()
    assert ours.connector.mlp[0].bias is None and ours.connector.mlp[2].bias is None
    assert type(ours.connector.mlp[1]) is type(llava.model.multi_modal_projector.act)
    n, g = ours.tokens_per_image(), torch.Generator().manual_seed(5)
    ids = _sample([2, "img", 5], n, ours.image_token_id, g)[None]
    got, expected = _both_logits(llava, ours, ids, torch.randn(1, 3, 32, 32, generator=g))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _unsupported(**changes) -> str:
    """The ConfigError message for a tiny SigLIP LLaVA config with ``changes`` (nothing is built or written)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    config = _siglip_qwen2_llava(tok, "default").config
    for key, value in changes.items():
        target = config.vision_config if key == "model_type" else config
        object.__setattr__(target, key, value)
    with pytest.raises(ConfigError) as info:
        from_hf_llava(SimpleNamespace(config=config), tok, "/nonexistent/never-written")
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer [-2, -1] is unsupported"),
        ({"vision_feature_layer": 3}, "vision_feature_layer 3 is out of range for the vision tower's 2 layers"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls' is unsupported"),
        ({"model_type": "dinov2"}, "vision_config.model_type 'dinov2' is unsupported"),
    ],
)
def test_unsupported_llava_configs_name_the_llava_field(changes, expected):
    msg = _unsupported(**changes)
    assert expected in msg
    assert "select_feature:" not in msg and "drop_first_patch" not in msg and "select_layer" not in msg


# -- the encoder option behind SigLIP `default` ------------------------------------------------------------
def _siglip(**options):
    return ENCODERS.build({**tiny_encoder_spec("siglip"), **options}).eval()


def test_drop_first_patch_drops_the_first_patch_of_every_layer():
    enc, full = _siglip(drop_first_patch=True), _siglip()
    assert enc.patch_grid == (4, 4) and enc.grid == (1, 15) and enc.num_tokens == 15
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        feats, reference = enc(pixels), full(pixels)
    assert feats.grid == (1, 15)
    for got, ref in zip(feats.hidden_states, reference.hidden_states, strict=True):
        assert got.shape[1] == 15
        torch.testing.assert_close(got, ref[:, 1:], atol=0, rtol=0)


def test_drop_first_patch_is_rejected_on_towers_with_a_cls_token():
    with pytest.raises(ConfigError, match="drop_first_patch is for towers without prefix tokens.*CLIPEncoder has 1"):
        ENCODERS.build({**tiny_encoder_spec("clip"), "drop_first_patch": True})


def test_drop_first_patch_must_be_a_bool():
    with pytest.raises(ConfigError, match="drop_first_patch must be true or false, got 1"):
        _siglip(drop_first_patch=1)


def test_drop_first_patch_is_rejected_by_an_encoder_that_defines_its_own_grid():
    class OwnGrid(SigLIPEncoder):
        @property
        def grid(self):
            return (4, 4)

    with pytest.raises(ConfigError, match="OwnGrid does not support drop_first_patch"):
        OwnGrid(path=tiny_encoder_spec("siglip")["path"], drop_first_patch=True)


def test_drop_first_patch_token_count_reaches_the_model_and_square_grid_connectors_refuse_it():
    encoder, llm = {**tiny_encoder_spec("siglip"), "drop_first_patch": True}, tiny_llm_spec("qwen2")
    assert MLLM.build(resolve_model(encoder, {"name": "mlp", "depth": 2}, llm)).tokens_per_image() == 15
    for connector in ({"name": "matryoshka", "scales": None}, {"name": "deepstack"}, {"name": "deepstack_vit"}):
        with pytest.raises(ConfigError, match="1×15|15 is not a square"):
            MLLM.build(resolve_model(encoder, connector, llm))
