"""Data pipeline: LLaVA files → dataset (images, truncation) → collator → sampler → the model's image positions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from mllm_kit import MLLM, Batch
from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data import LlavaDataset, PadCollator, Sample, grouped_indices, load_records
from mllm_kit.data.templates import Turn, get_template
from mllm_kit.data.conversation import ConversationEncoder
from mllm_kit.data.transforms import HALF, ImageTransform
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.model import ImageTokenMismatch
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer
from mllm_kit.config import resolve_model

N = 4  # tokens per image for the model-free tests
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer())


@pytest.fixture(scope="module")
def encoder(tok):
    return ConversationEncoder(tok, get_template("chatml"), tok.convert_tokens_to_ids("<image>"), N)


@pytest.fixture(scope="module")
def transform():
    return ImageTransform(size=16, mean=HALF, std=HALF, mode="resize")


def pixel(rgb) -> torch.Tensor:
    """What a solid ``rgb`` image becomes under ``transform`` (mean = std = 0.5)."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - 0.5) / 0.5


def save_image(path: Path, rgb=RED, size=(20, 12)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path.name


def conv(*pairs: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns."""
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(pairs)]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def dataset(path, encoder, transform, **kwargs) -> LlavaDataset:
    return LlavaDataset(path, None, encoder, transform, **kwargs)


def image_runs(ids: torch.Tensor, image_id: int) -> list[tuple[int, int]]:
    """(start, end) of each contiguous run of image-token ids in a 1-D tensor."""
    runs, start = [], None
    flags = (ids == image_id).tolist() + [False]
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


RECORDS = [
    {"id": "one", "image": "red.png", "conversations": conv("<image>\nWhat color?", "red")},
    {"id": "two", "image": ["blue.png", "green.png"], "conversations": conv("<image> and <image>?", "blue then green")},
    {"id": "txt", "conversations": conv("How many?", "three")},
]


@pytest.fixture
def llava_dir(tmp_path):
    save_image(tmp_path / "red.png", RED)
    save_image(tmp_path / "blue.png", BLUE, size=(9, 30))
    save_image(tmp_path / "green.png", GREEN)
    return tmp_path


# -- loading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", [write_json, write_jsonl], ids=["json", "jsonl"])
def test_load_records(tmp_path, writer):
    path = writer(tmp_path / ("data.json" if writer is write_json else "data.jsonl"), RECORDS)
    records = load_records(path)
    assert [r.id for r in records] == ["one", "two", "txt"]
    assert [r.index for r in records] == [0, 1, 2]
    assert [r.images for r in records] == [("red.png",), ("blue.png", "green.png"), ()]
    assert records[1].turns == (Turn("user", "<image> and <image>?"), Turn("assistant", "blue then green"))
    assert all(r.source == str(path) for r in records)
    assert records[0].ref == f"{path}, sample 0 (id 'one')"


def test_role_aliases_ids_and_extra_fields(tmp_path):
    raw = [{"id": 7, "images": ["a.png"], "source": "coco", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "user", "value": "<image>"}, {"from": "assistant", "value": "ok"}]}]
    (record,) = load_records(write_json(tmp_path / "d.json", raw))
    assert record.id == "7"
    assert record.images == ("a.png",)
    assert [t.role for t in record.turns] == ["system", "user", "assistant"]
    assert record.extra == {"source": "coco"}


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[2]) + "\n\n" + json.dumps(RECORDS[0]) + "\n")
    assert [r.id for r in load_records(path)] == ["txt", "one"]


@pytest.mark.parametrize("writer", [write_json, write_jsonl], ids=["json", "jsonl"])
def test_dataset_items(llava_dir, encoder, transform, tok, writer):
    path = writer(llava_dir / ("d.json" if writer is write_json else "d.jsonl"), RECORDS)
    ds = dataset(path, encoder, transform)
    assert len(ds) == 3
    records = load_records(path)

    one = ds[0]
    expected = encoder.encode(records[0].turns)
    assert one.id == "one"
    assert one.input_ids.tolist() == expected.input_ids and one.labels.tolist() == expected.labels
    assert one.num_image_tokens == N
    assert one.pixel_values.shape == (1, 3, 16, 16)
    torch.testing.assert_close(one.pixel_values[0], pixel(RED).view(3, 1, 1).expand(3, 16, 16))
    assert tok.decode([t for t in one.labels.tolist() if t != IGNORE_INDEX]) == "red<|im_end|>"

    two = ds[1]
    assert two.pixel_values.shape == (2, 3, 16, 16) and two.num_image_tokens == 2 * N
    torch.testing.assert_close(two.pixel_values[0], pixel(BLUE).view(3, 1, 1).expand(3, 16, 16))
    torch.testing.assert_close(two.pixel_values[1], pixel(GREEN).view(3, 1, 1).expand(3, 16, 16))
    assert len(image_runs(two.input_ids, encoder.image_token_id)) == 2

    txt = ds[2]
    assert txt.pixel_values is None and txt.num_image_tokens == 0 and txt.id == "txt"
    assert encoder.image_token_id not in txt.input_ids.tolist()


def test_dataset_image_root(tmp_path, encoder, transform):
    save_image(tmp_path / "imgs" / "sub" / "x.png", GREEN)
    path = write_json(tmp_path / "d.json", [{"id": "r", "image": "sub/x.png", "conversations": conv("<image>", "green")}])
    ds = LlavaDataset(path, tmp_path / "imgs", encoder, transform)
    torch.testing.assert_close(ds[0].pixel_values[0, :, 0, 0], pixel(GREEN))


def test_modality_lengths(llava_dir, encoder, transform):
    ds = dataset(write_json(llava_dir / "d.json", RECORDS), encoder, transform)
    chars = [sum(len(t["value"]) for t in r["conversations"]) for r in RECORDS]
    assert ds.modality_lengths() == [chars[0] // 4 + N, chars[1] // 4 + 2 * N, -(chars[2] // 4)]


def test_prompt_mode_and_left_padding(llava_dir, encoder, transform, tok):
    records = [RECORDS[0], {"id": "mt", "image": "red.png", "conversations": conv("<image>\nWhat?", "red", "Sure?", "yes")}]
    ds = dataset(write_json(llava_dir / "d.json", records), encoder, transform, prompt=True)
    first, second = ds[0], ds[1]
    assert first.target == "red" and second.target == "yes"
    assert tok.decode(first.input_ids.tolist()).endswith("<|im_start|>assistant\n")
    assert first.input_ids.tolist() == encoder.encode_prompt([Turn("user", "<image>\nWhat color?")]).input_ids
    assert set(first.labels.tolist()) == {IGNORE_INDEX}
    batch = PadCollator(tok.pad_token_id, padding_side="left")([first, second])
    short, long_ = len(first.input_ids), len(second.input_ids)
    assert short < long_
    assert batch.input_ids[0, : long_ - short].eq(tok.pad_token_id).all()
    assert batch.input_ids[0, long_ - short :].tolist() == first.input_ids.tolist()
    assert batch.attention_mask[0].tolist() == [0] * (long_ - short) + [1] * short
    assert batch.attention_mask[:, -1].eq(1).all(), "left padding must end every row with a real token"


# -- errors ------------------------------------------------------------------------------------------
def assert_names_sample(err: Exception, path: Path, index: int, sample_id: str) -> str:
    msg = str(err)
    assert f"{path}, sample {index} (id {sample_id!r})" in msg, msg
    return msg


def test_missing_image_file(llava_dir, encoder, transform):
    records = [RECORDS[0], {"id": "gone", "image": "missing.png", "conversations": conv("<image>", "x")}]
    path = write_json(llava_dir / "d.json", records)
    ds = dataset(path, encoder, transform)  # validated lazily: the file is only opened when read
    ds[0]
    with pytest.raises(DataError) as info:
        ds[1]
    msg = assert_names_sample(info.value, path, 1, "gone")
    assert str(llava_dir / "missing.png") in msg and "not found" in msg


def test_unreadable_image_file(llava_dir, encoder, transform):
    (llava_dir / "broken.png").write_bytes(b"\x89PNG not really an image at all" * 4)
    path = write_jsonl(llava_dir / "d.jsonl", [{"id": "bad", "image": "broken.png", "conversations": conv("<image>", "x")}])
    with pytest.raises(DataError) as info:
        dataset(path, encoder, transform)[0]
    msg = assert_names_sample(info.value, path, 0, "bad")
    assert str(llava_dir / "broken.png") in msg and "cannot be read as an image" in msg


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"image": ["a.png", "b.png"], "conversations": conv("<image>", "x")}, "1 <image> placeholder(s) but 2 image(s)"),
        ({"image": "a.png", "conversations": conv("no placeholder", "x")}, "0 <image> placeholder(s) but 1 image(s)"),
        ({"image": "a.png", "conversations": conv("<image><image>", "x")}, "2 <image> placeholder(s) but 1 image(s)"),
        ({"conversations": conv("<image>", "x")}, "1 <image> placeholder(s) but 0 image(s)"),
        ({"conversations": conv("only a question")}, "no assistant (gpt) turn"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "turn 1 has from='bot'; expected one of",
        ),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "turns must alternate human/gpt"),
        ({"conversations": conv("q", "a <image>"), "image": "a.png"}, "<image> may only appear in human turns (turn 1)"),
        ({"conversations": conv("q", "a") + [{"from": "system", "value": "s"}]}, "a system turn may only come first (turn 2)"),
        ({"conversations": [{"from": "human"}]}, "turn 0 must be an object with 'from' and 'value'"),
        ({"conversations": []}, "'conversations' must be a non-empty list"),
        ({"image": 3, "conversations": conv("q", "a")}, "'image' must be a path or a list of paths"),
    ],
)
@pytest.mark.parametrize("writer", [write_json, write_jsonl], ids=["json", "jsonl"])
def test_invalid_sample_names_file_and_sample(tmp_path, record, message, writer):
    path = writer(tmp_path / ("d.json" if writer is write_json else "d.jsonl"), [RECORDS[2], {"id": "bad-1", **record}])
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = assert_names_sample(info.value, path, 1, "bad-1")
    assert message in msg


def test_sample_without_id_is_named_by_index(tmp_path):
    path = write_json(tmp_path / "d.json", [RECORDS[2], RECORDS[2], {"conversations": conv("q")}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"{path}, sample 2:" in str(info.value)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": oops}\n]\n')
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert str(path) in msg and "invalid JSON at line 3" in msg


def test_jsonl_bad_line_names_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"id": "x", "conversations": [\n' + json.dumps(RECORDS[2]) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"{path}, line 3: invalid JSON" in str(info.value)


def test_json_must_be_a_list(tmp_path):
    path = write_json(tmp_path / "d.json", {"data": RECORDS})
    with pytest.raises(DataError, match="expected a JSON list of samples"):
        load_records(path)


def test_non_object_sample(tmp_path):
    path = write_json(tmp_path / "d.json", [RECORDS[2], "oops"])
    with pytest.raises(DataError, match=r"sample 1: a sample must be a JSON object, got str"):
        load_records(path)


def test_missing_data_file_and_empty_data(tmp_path, encoder, transform):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="holds no samples"):
        dataset(write_json(tmp_path / "empty.json", []), encoder, transform)


# -- collation ---------------------------------------------------------------------------------------
def fake_sample(ids, labels, n_images, sid, fill=0.0) -> Sample:
    pv = None if n_images == 0 else torch.full((n_images, 3, 4, 4), fill) + torch.arange(n_images).view(-1, 1, 1, 1)
    return Sample(torch.tensor(ids), torch.tensor(labels), pv, n_images * 2, sid)


@pytest.fixture
def samples():
    return [
        fake_sample([10, 4, 4, 11, 12], [-100, -100, -100, 11, 12], 1, "a", fill=100.0),
        fake_sample([20, 21, 22], [-100, 21, 22], 0, "b"),
        fake_sample([4, 4, 4, 4], [-100, -100, -100, -100], 2, "c", fill=200.0),
    ]


def test_right_padding(samples):
    batch = PadCollator(pad_token_id=3)(samples)
    assert isinstance(batch, Batch)
    assert batch.input_ids.tolist() == [[10, 4, 4, 11, 12], [20, 21, 22, 3, 3], [4, 4, 4, 4, 3]]
    assert batch.labels.tolist() == [[-100, -100, -100, 11, 12], [-100, 21, 22, -100, -100], [-100, -100, -100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch.images_per_sample == [1, 0, 2]
    assert batch.num_images == 3 and batch.num_image_tokens == 6
    assert batch.sample_ids == ["a", "b", "c"]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [100.0, 200.0, 201.0], "images must be concatenated in sample order"
    assert batch.position_ids is None and batch.seq_lens is None


def test_left_padding(samples):
    batch = PadCollator(pad_token_id=3, padding_side="left")(samples)
    assert batch.input_ids.tolist() == [[10, 4, 4, 11, 12], [3, 3, 20, 21, 22], [3, 4, 4, 4, 4]]
    assert batch.labels.tolist()[1] == [-100, -100, -100, 21, 22]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]


def test_pad_to_multiple_of(samples):
    batch = PadCollator(pad_token_id=3, pad_to_multiple_of=8)(samples)
    assert batch.input_ids.shape == (3, 8)
    assert batch.attention_mask.sum(1).tolist() == [5, 3, 4]
    assert batch.labels[:, 5:].eq(IGNORE_INDEX).all()


def test_text_only_batch_has_no_pixels(samples):
    batch = PadCollator(pad_token_id=3)([samples[1]])
    assert batch.pixel_values is None and batch.images_per_sample == [0] and batch.num_image_tokens == 0


def test_bad_padding_side():
    with pytest.raises(ConfigError, match="padding_side must be 'right' or 'left', got 'top'"):
        PadCollator(0, padding_side="top")


# -- truncation inside the dataset -------------------------------------------------------------------
TWO_IMAGE = {
    "id": "t",
    "image": ["red.png", "blue.png"],
    "conversations": conv("<image>\nfirst?", "red", "<image>\nsecond?", "blue"),
}


def test_trim_keeps_complete_image_spans_and_matching_images(llava_dir, encoder, transform, caplog):
    path = write_json(llava_dir / "d.json", [TWO_IMAGE])
    full = encoder.encode(load_records(path)[0].turns)
    second = full.image_spans[1]
    ds = dataset(path, encoder, transform, max_length=second.start + 2)  # the cut falls inside the 2nd image
    with caplog.at_level(logging.WARNING, logger="mllm_kit"):
        sample = ds[0]
    assert sample.input_ids.tolist() == full.input_ids[: second.start]
    assert sample.num_image_tokens == N
    assert sample.pixel_values.shape[0] == 1
    torch.testing.assert_close(sample.pixel_values[0, :, 0, 0], pixel(RED))
    assert len(image_runs(sample.input_ids, encoder.image_token_id)) == 1
    assert (ds.num_trimmed, ds.num_dropped) == (1, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("mllm_kit")]
    assert any(f"{path}, sample 0 (id 't'): trimmed from {len(full)} to {second.start} tokens" in m for m in warnings), warnings
    ds[0]
    assert ds.num_trimmed == 2


def test_drop_skips_to_next_sample(llava_dir, encoder, transform, caplog):
    short = {"id": "short", "conversations": conv("q", "a")}
    path = write_json(llava_dir / "d.json", [TWO_IMAGE, short])
    limit = len(encoder.encode(load_records(path)[1].turns))
    ds = dataset(path, encoder, transform, max_length=limit, truncation="drop")
    with caplog.at_level(logging.WARNING, logger="mllm_kit"):
        sample = ds[0]
    assert sample.id == "short"
    assert (ds.num_dropped, ds.num_trimmed) == (1, 0)
    assert any("sample 0 (id 't'): dropped" in r.getMessage() for r in caplog.records)
    assert ds[1].id == "short" and ds.num_dropped == 1


def test_trim_with_nothing_supervised_left_is_dropped(llava_dir, encoder, transform):
    path = write_json(llava_dir / "d.json", [TWO_IMAGE, {"id": "short", "conversations": conv("q", "a")}])
    ds = dataset(path, encoder, transform, max_length=len(encoder.encode(load_records(path)[1].turns)))
    full = encoder.encode(load_records(path)[0].turns)
    assert set(full.labels[: ds.max_length]) == {IGNORE_INDEX}, "test setup: the cut must fall before the first reply"
    assert ds[0].id == "short"
    assert (ds.num_trimmed, ds.num_dropped) == (0, 1)


def test_every_sample_too_long_raises(llava_dir, encoder, transform):
    path = write_json(llava_dir / "d.json", [TWO_IMAGE])
    ds = dataset(path, encoder, transform, max_length=3, truncation="drop")
    logging.getLogger("mllm_kit").disabled = True
    try:
        with pytest.raises(DataError, match=r"consecutive samples from index 0 exceed max_length=3"):
            ds[0]
    finally:
        logging.getLogger("mllm_kit").disabled = False


# -- the model side ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"name": "mlp", "depth": 2}, tiny_llm_spec("llama"))).eval()


@pytest.fixture(scope="module")
def model_encoder(model):
    return ConversationEncoder(model.tokenizer, get_template("chatml"), model.image_token_id, model.tokens_per_image())


@pytest.fixture
def model_dataset(llava_dir, model, model_encoder):
    return LlavaDataset(write_json(llava_dir / "d.json", RECORDS), None, model_encoder, model.make_image_transform())


def test_mixed_text_and_image_batch_forward(model, model_dataset):
    samples = [model_dataset[2], model_dataset[0], model_dataset[1]]  # text-only first
    batch = PadCollator(model.tokenizer.pad_token_id)(samples)
    assert batch.images_per_sample == [0, 1, 2] and batch.num_images == 3
    assert batch.num_image_tokens == 3 * model.tokens_per_image() == int((batch.input_ids == model.image_token_id).sum())
    with torch.no_grad():
        out = model(batch)
        alone = model(PadCollator(model.tokenizer.pad_token_id)([samples[0]]))
    vocab = model.llm.model.get_output_embeddings().weight.shape[0]
    assert out.logits.shape == (3, batch.input_ids.shape[1], vocab)
    n = len(samples[0].input_ids)
    torch.testing.assert_close(out.logits[0, :n], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_text_only_training_batch_still_touches_the_vision_path(model_dataset):
    torch.manual_seed(0)
    fresh = MLLM.build(resolve_model(tiny_encoder_spec("clip"), {"name": "mlp"}, tiny_llm_spec("llama"))).train()
    batch = PadCollator(fresh.tokenizer.pad_token_id)([model_dataset[2]])
    fresh(batch).logits.float().mean().backward()
    grads = [p.grad for p in fresh.connector.parameters()]
    assert all(g is not None for g in grads), "text-only batches must still give the connector a (zero) gradient"
    assert all(g.abs().sum() == 0 for g in grads)


def test_embed_inputs_wrong_number_of_image_positions(model):
    n = model.tokens_per_image()
    ids = torch.cat([torch.tensor([[20, 21]]), torch.full((1, n - 1), model.image_token_id)], dim=1)
    with pytest.raises(ImageTokenMismatch) as info:
        model.embed_inputs(Batch(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32)))
    msg = str(info.value)
    assert f"{n - 1} image-token positions" in msg and f"1 images × {n} tokens = {n}" in msg
    assert f"tokens_per_image() = {n}" in msg


def test_embed_inputs_declared_count_is_checked(model):
    n = model.tokens_per_image()
    ids = torch.full((1, n), model.image_token_id)
    with pytest.raises(ImageTokenMismatch, match="tokens_per_image"):
        model.embed_inputs(Batch(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), num_image_tokens=n + 1))


def test_embed_inputs_image_tokens_without_images(model):
    with pytest.raises(ImageTokenMismatch, match="has 16 image-token positions but no images"):
        model.embed_inputs(Batch(input_ids=torch.full((1, 16), model.image_token_id), num_image_tokens=16))


def test_visual_tokens_written_exactly_at_image_positions(model, model_dataset):
    batch = PadCollator(model.tokenizer.pad_token_id)([model_dataset[0], model_dataset[2], model_dataset[1]])
    captured = []
    handle = model.connector.register_forward_hook(lambda mod, args, out: captured.append(out.tokens.detach().clone()))
    try:
        with torch.no_grad():
            embeds, ctx = model.embed_inputs(batch)
            plain = model.llm.embed(batch.input_ids)
    finally:
        handle.remove()
    assert len(captured) == 1 and captured[0].shape == (3, model.tokens_per_image(), model.llm.hidden_size)
    torch.testing.assert_close(ctx.visual.tokens, captured[0])
    mask = batch.input_ids == model.image_token_id
    assert torch.equal(embeds[mask], captured[0].reshape(-1, captured[0].shape[-1]))
    assert torch.equal(embeds[~mask], plain[~mask])


def test_images_land_in_their_own_spans(model, model_dataset):
    """Sample 'two' has blue then green; images of every row must fill that row's spans in order."""
    batch = PadCollator(model.tokenizer.pad_token_id)([model_dataset[1], model_dataset[0]])
    t = model.make_image_transform()
    colours = {"blue": BLUE, "green": GREEN, "red": RED}
    expected_rows = [["blue", "green"], ["red"]]
    with torch.no_grad():
        embeds, _ = model.embed_inputs(batch)
        single = {name: model.encode_images(t(Image.new("RGB", (20, 20), rgb))[None]).tokens[0] for name, rgb in colours.items()}
    assert not torch.allclose(single["blue"], single["green"], atol=1e-3), "test setup: colours must give different tokens"
    for row, names in enumerate(expected_rows):
        runs = image_runs(batch.input_ids[row], model.image_token_id)
        assert len(runs) == len(names)
        for (start, end), name in zip(runs, names, strict=True):
            torch.testing.assert_close(
                embeds[row, start:end], single[name], atol=1e-4, rtol=1e-4, msg=f"row {row} span {start}:{end} is not {name}"
            )


# -- sampler -----------------------------------------------------------------------------------------
LENGTHS = [(-1 if i % 3 == 0 else 1) * (5 + (i * 37) % 91) for i in range(53)]


def order_of(lengths, batch_size=4, world_size=2, seed=0, epoch=0, **kwargs) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return grouped_indices(lengths, batch_size, world_size, g, **kwargs)


def check_grouping(lengths, order, mega) -> None:
    assert sorted(order) == list(range(len(lengths))), "the sampler must yield a permutation of all indices"
    n_img = sum(1 for n in lengths if n > 0)
    n_full = n_img // mega + (len(lengths) - n_img) // mega
    for k in range(n_full):
        chunk = order[k * mega : (k + 1) * mega]
        signs = {lengths[i] > 0 for i in chunk}
        assert len(signs) == 1, f"mega-batch {k} mixes modalities: {[lengths[i] for i in chunk]}"
        sizes = [abs(lengths[i]) for i in chunk]
        assert sizes == sorted(sizes, reverse=True), f"mega-batch {k} is not sorted by length: {sizes}"


def test_sampler_groups_by_modality_and_length():
    order = order_of(LENGTHS)
    assert len(order) == len(LENGTHS)
    check_grouping(LENGTHS, order, 8)


def test_sampler_is_deterministic_per_seed_and_epoch():
    assert order_of(LENGTHS, epoch=0) == order_of(LENGTHS, epoch=0)
    assert order_of(LENGTHS, epoch=3) == order_of(LENGTHS, epoch=3)
    assert order_of(LENGTHS, epoch=0) != order_of(LENGTHS, epoch=1)
    assert order_of(LENGTHS, seed=0) != order_of(LENGTHS, seed=5)


def test_sampler_without_modality_grouping_sorts_by_length():
    order = order_of(LENGTHS, batch_size=5, world_size=1, group_by_modality=False)
    assert sorted(order) == list(range(len(LENGTHS)))
    for k in range(len(LENGTHS) // 5):
        sizes = [abs(LENGTHS[i]) for i in order[5 * k : 5 * k + 5]]
        assert sizes == sorted(sizes, reverse=True)


@settings(deadline=None, max_examples=50)
@given(
    lengths=st.lists(st.integers(-300, 300).filter(bool), min_size=1, max_size=80),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_property_sampler(lengths, batch_size, world_size, seed):
    order = order_of(lengths, batch_size, world_size, seed)
    check_grouping(lengths, order, batch_size * world_size)
    assert order == order_of(lengths, batch_size, world_size, seed)
