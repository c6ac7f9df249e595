"""HF causal LMs as backbones: loading, special tokens, pad handling and the full MLLM forward per family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mllm_kit import MLLM, Batch
from mllm_kit.errors import ConfigError
from mllm_kit.llm.hf import HFCausalLM
from mllm_kit.tiny import LLM_FAMILIES, tiny_encoder_spec, tiny_llm, tiny_tokenizer
from mllm_kit.config import resolve_model

VOCAB = 384  # the tiny tokenizer's size; <image> and every template control token are already in it
LAYER_CLS = {
    "llama": "LlamaDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "mistral": "MistralDecoderLayer",
    "phi3": "Phi3DecoderLayer",
    "phi": "PhiDecoderLayer",
}


@pytest.fixture(scope="module")
def llms():
    return {f: HFCausalLM(path=str(tiny_llm(f))).eval() for f in LLM_FAMILIES}


@pytest.fixture(scope="module")
def base_tokenizer():
    return AutoTokenizer.from_pretrained(tiny_tokenizer())


def test_all_families_are_covered():
    assert set(LLM_FAMILIES) == set(LAYER_CLS)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_loads_with_correct_structure(llms, family):
    llm = llms[family]
    assert llm.model.config.model_type == family
    assert llm.hidden_size == 64
    assert len(llm.decoder_layers) == 2
    assert llm.decoder_layers is llm.model.model.layers
    assert llm.layer_cls.__name__ == LAYER_CLS[family]
    assert all(type(layer) is llm.layer_cls for layer in llm.decoder_layers)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_image_token_present_without_resizing(llms, base_tokenizer, family):
    llm = llms[family]
    tok = llm.tokenizer
    assert llm.image_token == "<image>"
    assert llm.image_token_id == base_tokenizer.convert_tokens_to_ids("<image>")
    assert tok.decode([llm.image_token_id]) == "<image>"
    ids = tok.encode("a<image>b", add_special_tokens=False)
    assert ids.count(llm.image_token_id) == 1
    assert ids == tok.encode("a", add_special_tokens=False) + [llm.image_token_id] + tok.encode("b", add_special_tokens=False)
    assert len(tok) == VOCAB
    assert llm.model.get_input_embeddings().num_embeddings == VOCAB, "a present token must not resize embeddings"


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_embed_is_the_input_embedding_table(llms, family):
    llm = llms[family]
    ids = torch.tensor([[0, 4, 17, 383]])
    with torch.no_grad():
        out = llm.embed(ids)
    assert out.shape == (1, 4, 64)
    torch.testing.assert_close(out[0], llm.model.get_input_embeddings().weight[ids[0]])


# -- added special tokens ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_with_new_token():
    return HFCausalLM(path=str(tiny_llm("llama")), special_tokens=["<new_tok>"]).eval()


def test_absent_special_token_is_added_and_embeddings_resized(llms, llm_with_new_token):
    llm = llm_with_new_token
    tok = llm.tokenizer
    assert len(tok) == VOCAB + 1
    assert llm.model.get_input_embeddings().num_embeddings == VOCAB + 1
    assert llm.model.get_output_embeddings().weight.shape[0] == VOCAB + 1
    new_id = tok.convert_tokens_to_ids("<new_tok>")
    assert new_id == VOCAB
    assert tok.encode("<new_tok>", add_special_tokens=False) == [new_id]
    assert tok.encode("x<new_tok>y", add_special_tokens=False).count(new_id) == 1
    assert tok.decode([new_id]) == "<new_tok>"
    # Existing rows are kept.
    old = llms["llama"].model.get_input_embeddings().weight
    torch.testing.assert_close(llm.model.get_input_embeddings().weight[:VOCAB], old)
    with torch.no_grad():
        logits = llm(inputs_embeds=llm.embed(torch.tensor([[5, new_id]]))).logits
    assert logits.shape == (1, 2, VOCAB + 1)


def test_new_special_token_does_not_leak_into_other_instances(llms):
    assert "<new_tok>" not in llms["llama"].tokenizer.get_vocab()


def test_present_template_tokens_do_not_resize():
    llm = HFCausalLM(path=str(tiny_llm("qwen2")), special_tokens=["<|im_start|>", "<|im_end|>"])
    assert len(llm.tokenizer) == VOCAB
    assert llm.model.get_input_embeddings().num_embeddings == VOCAB
    assert llm.tokenizer.encode("<|im_end|>", add_special_tokens=False) == [llm.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_custom_image_token_is_added():
    llm = HFCausalLM(path=str(tiny_llm("mistral")), image_token="<img_patch>")
    assert llm.image_token == "<img_patch>"
    assert llm.image_token_id == VOCAB
    assert llm.tokenizer.encode("<img_patch>", add_special_tokens=False) == [VOCAB]
    assert llm.model.get_input_embeddings().num_embeddings == VOCAB + 1


# -- pad token -----------------------------------------------------------------------------------
def _tokenizer_copy(tmp_path, *, remove: tuple[str, ...]) -> str:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    for attr in remove:
        setattr(tok, attr, None)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for attr in remove:
        assert getattr(reloaded, attr) is None, f"test setup: {attr} survived saving"
    return str(tmp_path)


def test_pad_token_kept_when_present(llms, base_tokenizer):
    llm = llms["llama"]
    assert llm.tokenizer.pad_token == "<pad>"
    assert llm.tokenizer.pad_token_id == base_tokenizer.pad_token_id == llm.model.config.pad_token_id


def test_missing_pad_token_falls_back_to_unk(tmp_path):
    llm = HFCausalLM(path=str(tiny_llm("llama")), tokenizer=_tokenizer_copy(tmp_path, remove=("pad_token",)))
    tok = llm.tokenizer
    assert tok.pad_token == "<unk>"
    assert tok.pad_token_id == tok.unk_token_id == 2
    assert llm.model.config.pad_token_id == 2
    assert llm.model.generation_config.pad_token_id == 2


def test_missing_pad_and_unk_falls_back_to_eos(tmp_path):
    llm = HFCausalLM(path=str(tiny_llm("qwen2")), tokenizer=_tokenizer_copy(tmp_path, remove=("pad_token", "unk_token")))
    tok = llm.tokenizer
    assert tok.pad_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id == 1
    assert llm.model.config.pad_token_id == 1


def test_no_pad_unk_or_eos_is_a_config_error(tmp_path):
    tok_dir = _tokenizer_copy(tmp_path, remove=("pad_token", "unk_token", "eos_token"))
    with pytest.raises(ConfigError, match="no pad, unk or eos token"):
        HFCausalLM(path=str(tiny_llm("llama")), tokenizer=tok_dir)


# -- construction errors / config-built ----------------------------------------------------------
def test_build_from_config_with_tokenizer():
    config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    llm = HFCausalLM(config=config, tokenizer=str(tiny_tokenizer()))
    assert llm.hidden_size == 32 and len(llm.decoder_layers) == 3
    assert llm.layer_cls.__name__ == "LlamaDecoderLayer"
    assert llm.image_token_id == 4
    assert llm.model.config.pad_token_id == llm.tokenizer.pad_token_id == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of 'path'"),
        ({"path": "a", "config": {"model_type": "llama"}}, "give exactly one of 'path'"),
        ({"config": {"model_type": "llama"}}, "needs 'tokenizer'"),
        ({"config": {"hidden_size": 8}, "tokenizer": "TOKENIZER"}, "needs 'model_type'"),
    ],
)
def test_construction_errors(kwargs, message):
    kwargs = {k: (str(tiny_tokenizer()) if v == "TOKENIZER" else v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=message):
        HFCausalLM(**kwargs)


def test_missing_path_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(ConfigError) as info:
        HFCausalLM(path=str(missing))
    assert str(missing) in str(info.value)


# -- the full model, per family ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mllms():
    enc = tiny_encoder_spec("clip")
    out = {}
    for family in LLM_FAMILIES:
        torch.manual_seed(0)
        out[family] = MLLM.build(resolve_model(enc, {"name": "mlp", "depth": 2}, {"name": "hf_causal_lm", "path": str(tiny_llm(family))})).eval()
    return out


def _batch(model: MLLM, pixels: torch.Tensor) -> Batch:
    n = model.tokens_per_image()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(20, 300, (2, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, n), model.image_token_id), text[:, 2:]], dim=1)
    return Batch(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, images_per_sample=[1, 1], num_image_tokens=2 * n
    )


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_mllm_forward_logits_per_family(mllms, family):
    model = mllms[family]
    assert model.tokens_per_image() == 16
    assert model.connector.out_dim == model.llm.hidden_size == 64
    g = torch.Generator().manual_seed(2)
    batch = _batch(model, torch.randn(2, 3, 32, 32, generator=g))
    with torch.no_grad():
        out = model(batch)
        other = model(_batch(model, torch.randn(2, 3, 32, 32, generator=g)))
        text_only = model.llm.model(input_ids=batch.input_ids[:, :2]).logits
    assert out.logits.shape == (2, 2 + 16 + 4, VOCAB)
    assert torch.isfinite(out.logits).all()
    # Positions before the image equal the plain LM on the same ids; positions after it depend on the image.
    torch.testing.assert_close(out.logits[:, :2], text_only, atol=1e-5, rtol=1e-5)
    assert (out.logits[:, -1] - other.logits[:, -1]).abs().max() > 1e-4
