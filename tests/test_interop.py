"""Export to / import from transformers' LLaVA, and mllm-kit bundles.

* export: transformers' ``LlavaForConditionalGeneration`` loaded from an export gives our logits, and greedy generation
  through the exported processor (its chat template, tokenisation and image preprocessing) gives our tokens on the batch
  our own data pipeline builds — CLIP and SigLIP towers, Llama and Qwen2 LLMs, every resize mode, LoRA merged;
* import: a LLaVA-HF checkpoint → run directory → export reproduces every tensor; recipes start from the run;
* the chat template equals each built-in template's prompt text, and with real tokenizers the processor's ids ours;
* bundles hold any architecture and refuse pickles and changed files; clear errors for what cannot be exported.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from mllm_kit import MLLM
from mllm_kit.cli.main import main
from mllm_kit.config import resolve_model
from mllm_kit.config.load import recipe_from_dict
from mllm_kit.config.recipe import DataSpec
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.conversation import ConversationEncoder
from mllm_kit.data.dataset import LlavaDataset
from mllm_kit.data.templates import Turn, get_template
from mllm_kit.errors import ConfigError
from mllm_kit.interop.bundle import load_bundle, read_bundle_settings, save_bundle
from mllm_kit.interop.hf_import import detect_template, import_hf_llava
from mllm_kit.interop.llava import llava_blockers, to_hf_llava
from mllm_kit.interop.processor import PROBES, adds_bos, build_processor, check_processor, prepare_tokenizer, probe_image
from mllm_kit.registry import TRANSFORMS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer
from mllm_kit.training.data import conversation_encoder
from mllm_kit.training.stage import stage_model
from mllm_kit.training.state import RunState, read_run

# LLaVA-1.5-HF's chat template (images first, then text; no system prompt, no stop between turns)
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
RECORDS = [
    {"id": "wide", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "a red one"}]},
    {"id": "tall", "image": "tall.png", "conversations": [
        {"from": "human", "value": "What shape is it?\n<image>"}, {"from": "gpt", "value": "a circle"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]},
]


# -- helpers -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A LLaVA JSON file with two non-square images (every resize mode changes them)."""
    root = tmp_path_factory.mktemp("interop_data")
    probe_image(45, 30, seed=1).save(root / "wide.png")
    probe_image(28, 50, seed=2).save(root / "tall.png")
    (root / "data.json").write_text(json.dumps(RECORDS))
    return root


def _model(encoder="clip", llm="llama", seed=0, **encoder_options) -> MLLM:
    """A tiny model whose every weight is moved off its initialisation."""
    torch.manual_seed(seed)
    model = MLLM.build(resolve_model({**tiny_encoder_spec(encoder), **encoder_options}, "mlp2x_gelu", tiny_llm_spec(llm))).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _messages(turns, as_lists: bool) -> list[dict]:
    """Chat messages from turns: string contents with inline <image>, or transformers' list contents."""
    out = []
    for t in turns:
        if not as_lists:
            out.append({"role": t.role, "content": t.content})
            continue
        items = []
        for k, part in enumerate(t.content.split("<image>")):
            if k:
                items.append({"type": "image"})
            if part.strip("\n"):
                items.append({"type": "text", "text": part.strip("\n")})
        out.append({"role": t.role, "content": items})
    return out


def _dataset(model, data_dir, spec, prompt):
    return LlavaDataset(data_dir / "data.json", data_dir, conversation_encoder(model, spec),
                        model.make_image_transform(spec.image_mode), prompt=prompt)


def _merged(model) -> MLLM:
    """A copy of ``model`` with its LoRA adapters merged (what a merge_lora stage leaves)."""
    merged = copy.deepcopy(model)
    TRANSFORMS.build({"name": "merge_lora"})(merged)
    return merged


def _check_export(model, out, data_dir, spec):
    """Logits on a padded training batch, prompt ids, pixels and greedy tokens through the processor: all ours.

    A model with LoRA adapters generates merged: W₀x + B(Ax)·s and (W₀ + s·BA)x differ in the last bits, which can flip
    a near-tie of a tiny random model's greedy choice; its logits are compared unmerged (≤ 1e-4) and merged."""
    lora = any(t["name"] == "add_lora" for t in model.transforms)
    generator = _merged(model).eval() if lora else model
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    default_backend = AutoProcessor.from_pretrained(out)  # transformers' default (torchvision) backend
    train = _dataset(model, data_dir, spec, prompt=False)
    batch = PadCollator(model.tokenizer.pad_token_id)([train[0], train[1]])
    with torch.no_grad():
        ours = model(batch).logits
        theirs = llava(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[valid], ours[valid], atol=1e-4, rtol=0)
    if lora:
        with torch.no_grad():
            torch.testing.assert_close(theirs[valid], generator(batch).logits[valid], atol=1e-5, rtol=0)

    prompts = _dataset(model, data_dir, spec, prompt=True)
    stops = conversation_encoder(model, spec).stop_token_ids()
    for k, record in enumerate(RECORDS):
        sample = PadCollator(model.tokenizer.pad_token_id, padding_side="left")([prompts[k]])
        turns = [Turn("user" if c["from"] == "human" else "assistant", c["value"]) for c in record["conversations"][:-1]]
        text = processor.apply_chat_template(_messages(turns, as_lists=k == 0), add_generation_prompt=True)
        image = Image.open(data_dir / record["image"])
        inputs = processor(text=text, images=[image], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == sample.input_ids[0].tolist()  # template + tokenisation + <image> expansion
        assert torch.equal(inputs["pixel_values"], sample.pixel_values)  # preprocessing, pixel for pixel
        approx = default_backend(text=text, images=[image], return_tensors="pt")["pixel_values"]
        assert (approx - sample.pixel_values).abs().max() < 0.5  # the torchvision backend: close, not identical
        ours_new = generator.generate(sample.input_ids, sample.attention_mask, sample.pixel_values, max_new_tokens=6,
                                      stop_token_ids=stops)[0].tolist()
        with torch.no_grad():
            generated = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert generated[0, inputs["input_ids"].shape[1]:].tolist() == ours_new and ours_new


# -- export ----------------------------------------------------------------------------------------------------
EXPORTS = [  # encoder, LLM, encoder options, template, image mode, system prompt
    ("clip", "llama", {}, "vicuna_v1", "pad", None),
    ("clip", "qwen2", {"select_feature": "cls_patch"}, "llama3", "center_crop", "Answer briefly."),
    ("siglip", "qwen2", {"drop_first_patch": True}, "chatml", None, ""),
    ("siglip", "llama", {}, "phi3", "pad", None),
]


@pytest.mark.parametrize(("encoder", "llm", "options", "template", "mode", "system"), EXPORTS,
                         ids=[f"{e}-{l}-{t}" for e, l, _, t, _, _ in EXPORTS])
def test_export_matches_logits_and_generation(tmp_path, data_dir, encoder, llm, options, template, mode, system):
    model = _model(encoder, llm, **options)
    spec = DataSpec(template=template, image_mode=mode, system_prompt=system)
    out = to_hf_llava(model, tmp_path / "llava", template=template, image_mode=mode, system_prompt=system)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["image_seq_length"] == model.tokens_per_image()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    _check_export(model, out, data_dir, spec)


def test_export_folds_lora_without_changing_the_model(tmp_path, data_dir):
    model = _model("clip", "llama")
    targets = r"(encoder|llm)\..*\.(q_proj|v_proj)|connector\.mlp\.2"  # the vision tower, the LLM and the projector
    TRANSFORMS.build({"name": "add_lora", "target_modules": targets, "r": 4, "alpha": 8, "on": ["encoder", "connector", "llm"]})(model)
    assert {n.split(".")[0] for n, _ in model.named_parameters() if "lora_B" in n} == {"encoder", "connector", "llm"}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    spec = DataSpec(template="chatml")
    batch = PadCollator(model.tokenizer.pad_token_id)([_dataset(model, data_dir, spec, prompt=False)[0]])
    with torch.no_grad():
        before = model(batch).logits
    out = to_hf_llava(model, tmp_path / "llava", template="chatml")
    assert [t["name"] for t in model.transforms] == ["add_lora"]  # the caller's model keeps its adapters
    assert any("lora_B" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(batch).logits, before)
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    _check_export(model, out, data_dir, spec)


# -- the chat template ------------------------------------------------------------------------------------------
CONVERSATIONS = [*PROBES, (Turn("user", "<image>\n<image>\nCompare the two images."),)]


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "llama3", "phi3", "plain", "hf"])
@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_chat_template_renders_our_prompt_text(name, system):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    template = get_template(name)
    exported = prepare_tokenizer(tok, template, system)
    bos = tok.bos_token if template.add_bos and not adds_bos(exported) else ""
    encoder = ConversationEncoder(tok, template, tok.convert_tokens_to_ids("<image>"), 1, system_prompt=system)
    for turns in CONVERSATIONS[:1] if name == "plain" else CONVERSATIONS:
        ours = "".join(s.text for s in template.render_prompt(list(encoder._with_system(turns)), tok))
        for as_lists in (False, True):
            text = exported.apply_chat_template(_messages(turns, as_lists), add_generation_prompt=True, tokenize=False)
            assert text == bos + ours, (turns, as_lists)
    if name != "plain":  # a finished conversation renders the training text
        turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a circle"), Turn("user", "And?"), Turn("assistant", "red")]
        ours = "".join(s.text for s in template.render(list(encoder._with_system(turns)), tok))
        assert exported.apply_chat_template(_messages(turns, False), tokenize=False) == bos + ours


@pytest.mark.parametrize(("tokenizer", "template"), [("mistral_v1", "vicuna_v1"), ("mistral_v1", "chatml"),
                                                     ("qwen", "chatml"), ("qwen", "hf"), ("tekken", "llama3")])
def test_processor_ids_equal_ours_with_real_tokenizers(real_tokenizer, tokenizer, template):
    """SentencePiece (the ▁ after <image>, BOS from the tokenizer) and byte-level BPE tokenizers."""
    tok = real_tokenizer(tokenizer)
    chat = get_template(template)
    image_id = tok.convert_tokens_to_ids("<image>")
    exported = prepare_tokenizer(tok, chat)
    ip = LlavaImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=ip, tokenizer=exported, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=exported.chat_template, num_additional_image_tokens=1)
    encoder = ConversationEncoder(tok, chat, image_id, 16)
    for turns in CONVERSATIONS:
        ours = encoder.encode_prompt(list(turns)).input_ids
        text = processor.apply_chat_template(_messages(turns, True), add_generation_prompt=True)
        n = text.count("<image>")
        assert processor(text=text, images=[probe_image()] * n)["input_ids"][0] == ours, turns
        tokenized = processor.apply_chat_template(_messages(turns, True), add_generation_prompt=True, tokenize=True,
                                                  processor_kwargs={"images": [probe_image()] * n})
        assert list(tokenized[0]) == ours


def test_check_processor_reports_what_differs():
    model = _model("clip", "llama")
    chatml = get_template("chatml")
    processor, stops = build_processor(model, chatml, image_mode="pad")
    assert check_processor(model, processor, chatml, image_mode="pad") == []
    assert stops == [model.tokenizer.convert_tokens_to_ids("<|im_end|>"), model.tokenizer.eos_token_id]
    problems = check_processor(model, processor, get_template("vicuna_v1"), image_mode="center_crop")
    assert len([p for p in problems if p.startswith("prompt ids differ")]) == len(PROBES)
    assert problems[-1].startswith("pixel values differ")


# -- import ----------------------------------------------------------------------------------------------------
def _llava_checkpoint(directory: Path, tower: str) -> Path:
    """A tiny random LLaVA-HF checkpoint with a LLaVA-1.5-style processor, saved as transformers saves one."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    common = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    vision = CLIPVisionConfig(**common) if tower == "clip" else SiglipVisionConfig(**common)
    text_cls = LlamaConfig if tower == "clip" else Qwen2Config
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    strategy = "default"
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    mean, std = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]) if tower == "clip" else ([0.5] * 3, [0.5] * 3)
    ip = (LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                                 image_mean=mean, image_std=std) if tower == "clip" else
          LlavaImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False,
                                 do_pad=True, image_mean=mean, image_std=std))
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                   chat_template=LLAVA15_TEMPLATE, num_additional_image_tokens=1 if tower == "clip" else 0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["clip", "siglip"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"import_{request.param}")
    src = _llava_checkpoint(root / "src", request.param)
    return src, import_hf_llava(src, root / "run"), request.param


def test_import_writes_a_run_that_exports_back_to_the_same_tensors(imported, tmp_path):
    src, run, tower = imported
    recipe, state = read_run(run)
    assert state.done("imported") and [s.name for s in recipe.stages] == ["imported"]
    assert recipe.stages[0].data.template == "vicuna_v1" and recipe.stages[0].data.system_prompt == ""  # LLaVA-1.5's prompt
    model = MLLM.from_pretrained(state.final_dir("imported"))
    assert model.encoder.image_transform.mode == ("center_crop" if tower == "clip" else "pad")
    data = recipe.stages[0].data
    out = to_hf_llava(model, tmp_path / "back", template=data.template, system_prompt=data.system_prompt)
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        assert a[key] == b[key], key
    ours, theirs = (json.loads((d / "processor_config.json").read_text())["image_processor"] for d in (src, out))
    for key in ("size", "crop_size", "do_center_crop", "do_pad", "image_mean", "image_std", "resample"):
        assert ours.get(key) == theirs.get(key), key


def test_a_recipe_stage_starts_from_an_imported_run(imported, tmp_path):
    _, run, _ = imported
    recipe = recipe_from_dict({"name": "ft", "stages": [{"name": "sft", "init_from": str(run), "trainable": ["connector"],
                                                         "data": {"train": "synthetic:sft", "template": "vicuna_v1"}}]})
    assert recipe.stages[0].init_from == f"{run}:imported"  # recorded as checked
    assert recipe.model.llm["path"].endswith("imported/final/llm")  # no model in the recipe: the run's
    model = stage_model(recipe, 0, RunState.load(tmp_path / "new-run"))
    reference = MLLM.from_pretrained(RunState.load(run).final_dir("imported"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_init_from_errors_name_what_is_wrong(tmp_path, imported):
    _, run, _ = imported

    def load(init_from):
        with pytest.raises(ConfigError) as info:
            recipe_from_dict({"name": "x", "model": {"encoder": tiny_encoder_spec("clip"), "llm": tiny_llm_spec("llama")},
                              "stages": [{"name": "a", "trainable": ["connector"]},
                                         {"name": "b", "trainable": ["connector"], "init_from": init_from}]})
        return str(info.value)

    assert "neither an earlier stage of this recipe (earlier stages: a) nor a run directory" in load(str(tmp_path / "nope"))
    assert "stage 'sft' of run" in load(f"{run}:sft") and "finished stages: imported" in load(f"{run}:sft")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "state.json").write_text(json.dumps({"stages": {"sft": {"status": "running"}}}))
    assert "has no finished stage" in load(str(unfinished)) and "has not finished (running)" in load(f"{unfinished}:sft")


def test_template_detection():
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    assert detect_template(tok, LLAVA15_TEMPLATE) == ("vicuna_v1", "", False)  # single-turn prompt only
    for name in ("vicuna_v1", "chatml", "llama3", "phi3"):
        assert detect_template(tok, prepare_tokenizer(tok, get_template(name)).chat_template) == (name, None, True)
    assert detect_template(tok, "{{ 'nothing like it' }}") == (None, None, False)


def test_import_refuses_what_is_not_a_llava_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        import_hf_llava(tmp_path / "missing", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        import_hf_llava(tmp_path / "empty", tmp_path / "run")
    for model_type, hint in (("llama", "model_type 'llama', not 'llava'"), ("llava_next", "LLaVA-NeXT")):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ConfigError, match=hint):
            import_hf_llava(tmp_path / model_type, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- what LLaVA-HF cannot express ------------------------------------------------------------------------------
@pytest.mark.parametrize(("connector", "expected"), [
    ({"name": "qformer", "num_queries": 4, "num_layers": 1, "hidden": 32, "heads": 2, "intermediate_size": 32}, "a Q-Former"),
    ({"name": "moe_mlp", "num_experts": 2, "top_k": 1}, "an MoE connector"),
    ({"name": "mlp", "depth": 3}, "connector mlp depth 3"),
])
def test_unexpressible_connectors_are_named_and_sent_to_bundles(tmp_path, connector, expected):
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), connector, tiny_llm_spec("llama")))
    with pytest.raises(ConfigError) as info:
        to_hf_llava(model, tmp_path / "out")
    assert expected in str(info.value) and "--to bundle" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unexpressible_encoders_and_llm_layers():
    dino = MLLM.build(resolve_model(tiny_encoder_spec("dinov2"), "mlp2x_gelu", tiny_llm_spec("llama")))
    assert any("'hf_dinov2'" in b for b in llava_blockers(dino))
    resized = MLLM.build(resolve_model({**tiny_encoder_spec("clip"), "image_size": 48, "grayscale": True}, "mlp2x_gelu",
                                       tiny_llm_spec("llama")))
    blockers = llava_blockers(resized)
    assert any("image_size 48" in b for b in blockers) and any("grayscale" in b for b in blockers)
    moe = _model()
    TRANSFORMS.build({"name": "upcycle_moe", "num_experts": 2, "top_k": 1})(moe)
    assert llava_blockers(moe) == ["MoE FFN layers in the LLM (upcycle_moe): LLaVA-HF layers are plain transformers layers"]
    assert llava_blockers(_model()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = _model()
    out = to_hf_llava(model, tmp_path / "llava")
    (out / "marker").write_text("old")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        to_hf_llava(model, out)
    assert (out / "marker").exists()
    to_hf_llava(model, out, overwrite=True)
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


# -- bundles -----------------------------------------------------------------------------------------------------
def test_bundle_holds_any_architecture_and_refuses_pickles(tmp_path, data_dir):
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"name": "qformer", "num_queries": 4, "num_layers": 1, "hidden": 32,
                                                                  "heads": 2, "intermediate_size": 32}, tiny_llm_spec("qwen2"))).eval()
    spec = DataSpec(template="chatml", image_mode="pad")
    out = save_bundle(model, tmp_path / "bundle", template="chatml", image_mode="pad")
    settings = read_bundle_settings(out)
    assert settings["template"] == "chatml" and settings["tokens_per_image"] == 4 and settings["image"][0]["mode"] == "pad"
    assert all(p.suffix in (".json", ".safetensors", ".jinja", ".txt") for p in out.rglob("*") if p.is_file())
    loaded = load_bundle(out).eval()
    batch = PadCollator(model.tokenizer.pad_token_id)([_dataset(model, data_dir, spec, prompt=False)[0]])
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    with pytest.raises(ConfigError, match="already exists"):
        save_bundle(model, out)
    (out / "llm" / "extra.bin").write_bytes(b"\x80\x04not a model")
    with pytest.raises(ConfigError, match=r"pickle files \['llm/extra.bin'\]"):
        load_bundle(out)
    (out / "llm" / "extra.bin").unlink()
    (out / "mllm.json").write_text((out / "mllm.json").read_text() + " ")
    with pytest.raises(ConfigError, match=r"SHA-256 differs\): \['mllm.json'\]"):
        load_bundle(out)


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_export_and_import(imported, tmp_path, capsys):
    src, run, _ = imported
    assert main(["export", "--run", str(run), "--to", "bundle", str(tmp_path / "b")]) == 0
    assert load_bundle(tmp_path / "b").tokens_per_image() == MLLM.from_pretrained(run / "imported" / "final").tokens_per_image()
    assert main(["export", "--run", str(run), "--to", "hf-llava", str(tmp_path / "b")]) == 2
    assert "mllm-kit: error:" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--stage", "sft", "--to", "hf-llava", str(tmp_path / "h")]) == 2
    assert "no stage 'sft'" in capsys.readouterr().err
    assert main(["import", "--from", "hf-llava", str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 2
    assert "not a transformers checkpoint (no config.json)" in capsys.readouterr().err
    assert main(["import", "--from", "hf-llava", str(src), "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", "--from", "hf-llava", str(src), "--out", str(tmp_path / "again")]) == 0
    assert "init_from:" in capsys.readouterr().out and RunState.load(tmp_path / "again").done("imported")


@pytest.mark.slow
def test_fit_with_lora_export_import_and_continue(tmp_path, tiny_recipe, data_dir):
    """End to end: align → LoRA SFT (fit) → `mllm-kit export` (LoRA merged) → transformers reproduces the run's model →
    `mllm-kit import` → a stage continues from the imported run."""
    from mllm_kit.training.runner import fit

    raw = tiny_recipe()
    raw["stages"][1]["transforms"] = [{"name": "add_lora", "target_modules": ["q_proj", "v_proj"], "r": 4}]
    raw["stages"][1]["trainable"] = ["re:lora_", "connector"]
    raw["stages"][1]["optim"] = {"lr": 5e-2}
    raw["data"]["eval"] = None
    fit(recipe_from_dict(raw), tmp_path / "run")
    assert main(["export", "--run", str(tmp_path / "run"), "--to", "hf-llava", str(tmp_path / "llava")]) == 0
    model = MLLM.from_pretrained(tmp_path / "run" / "sft" / "final").eval()
    assert [t["name"] for t in model.transforms] == ["add_lora"]
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the adapters trained
    _check_export(model, tmp_path / "llava", data_dir, DataSpec(template="chatml"))
    assert main(["import", "--from", "hf-llava", str(tmp_path / "llava"), "--out", str(tmp_path / "imported")]) == 0
    recipe = recipe_from_dict({"name": "ft", "data": {"max_length": 256, "synthetic": raw["data"]["synthetic"]},
                               "optim": raw["optim"], "trainer": raw["trainer"],
                               "stages": [{"name": "more", "init_from": str(tmp_path / "imported"), "trainable": ["connector"],
                                           "data": {"train": "synthetic:sft", "template": "chatml"}}]})
    state = fit(recipe, tmp_path / "continued")
    assert state.done("more")
