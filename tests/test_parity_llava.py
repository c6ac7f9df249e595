"""mllm-kit assembled from the same weights as transformers' LLaVA gives the same logits."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mllm_kit import Batch
from mllm_kit.hf_llava import from_hf_llava
from mllm_kit.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()

    ours = from_hf_llava(llava, tok, root).eval()
    return llava, ours, image_token_id


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
        a = ours.llm(inputs_embeds=ours.embed_inputs(ids, torch.randn(1, 3, 32, 32))[0]).logits[:, -1]
        b = ours.llm(inputs_embeds=ours.embed_inputs(ids, torch.randn(1, 3, 32, 32))[0]).logits[:, -1]
    assert (a - b).abs().max() > 1e-4
