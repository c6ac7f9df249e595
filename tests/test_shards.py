"""WebDataset shards: conversion, training from them (the same samples as the JSON source), bad input."""

import json
import subprocess
import sys
import tarfile

import pytest
import torch

from mllm_kit.config import recipe_from_dict
from mllm_kit.data.shards import check_urls, convert, expand_urls, read_shards
from mllm_kit.data.synthetic import SynthConfig, generate
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.training.runner import RunState, prepare_stage


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate(root, SynthConfig(num_align=4, num_sft=30, num_eval=4, tasks=("color", "shape", "count")))


def test_brace_patterns_expand_like_webdataset():
    assert expand_urls("s/train-{000..002}.tar") == ["s/train-000.tar", "s/train-001.tar", "s/train-002.tar"]
    assert expand_urls("a-{8..10}.tar::b.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b.tar"]


def test_convert_writes_shards_in_webdataset_layout_with_a_manifest(source, tmp_path):
    manifest = json.loads(convert(source.sft, source.image_root, tmp_path / "wds", samples_per_shard=8).read_text())
    assert manifest["samples"] == 30 and [s["samples"] for s in manifest["shards"]] == [8, 8, 8, 6]
    with tarfile.open(tmp_path / "wds" / "train-000000.tar") as tar:
        names = tar.getnames()
        first = json.loads(tar.extractfile("000000000.json").read())
    assert names[:2] == ["000000000.json", "000000000.0.png"] and first["image"] == "000000000.0.png"
    again = tmp_path / "again"
    convert(source.sft, source.image_root, again, samples_per_shard=8)
    assert (again / "train-000003.tar").read_bytes() == (tmp_path / "wds" / "train-000003.tar").read_bytes()
    assert not list((tmp_path / "wds").glob(".*"))  # no temporary files left


def _stage(tmp_path, tiny_recipe, train):
    recipe = tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=2)
    recipe["data"]["synthetic"].update(num_sft=30, tasks=["color", "shape", "count"])
    recipe["stages"] = recipe["stages"][1:]
    recipe["stages"][0]["data"]["train"] = train
    return prepare_stage(recipe_from_dict(recipe), 0, tmp_path, RunState.load(tmp_path))


def test_training_from_shards_reads_the_same_samples_as_the_json_source(tmp_path, tiny_recipe):
    json_stage = _stage(tmp_path / "json", tiny_recipe, "synthetic:sft")
    synthetic = next((tmp_path / "json" / "data").glob("synthetic-*"))
    convert(synthetic / "sft.json", synthetic, tmp_path / "wds", samples_per_shard=7)
    urls = str(tmp_path / "wds" / "train-{000000..000004}.tar")
    shard_stage = _stage(tmp_path / "shards", tiny_recipe, {"format": "wds", "urls": urls})
    a, b = json_stage.data.dataset, shard_stage.data.dataset
    assert len(a) == len(b) == 30
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.pixel_values, y.pixel_values) and x.id == y.id
    shard_stage.model.train()
    shard_stage.trainer.fit(shard_stage.module, datamodule=shard_stage.data)
    assert shard_stage.trainer.global_step == 2


def test_bad_shard_sources_fail_with_the_url_or_the_shard(source, tmp_path, tiny_recipe):
    with pytest.raises(DataError, match="is a pipe URL, which runs a shell command; set data.allow_pipe: true"):
        check_urls("pipe:curl -s http://x/train-{0..3}.tar", "data.train.urls")
    with pytest.raises(DataError, match="is a remote URL.*pipe:curl -sfL https://x/train-0.tar"):
        check_urls("https://x/train-{0..3}.tar", "data.train.urls", allow_pipe=True)
    with pytest.raises(DataError, match=r"2 of the 2 shards .* do not exist"):
        check_urls(str(tmp_path / "none-{0..1}.tar"), "data.train.urls")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="bad.tar' is not a readable tar of samples"):
        read_shards([bad])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data\.train\.urls|data\.train\.urls"):
        _stage(tmp_path / "run", tiny_recipe, {"format": "wds", "urls": str(tmp_path / "missing-{0..2}.tar")}).data.dataset


def test_cli_converts(source, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mllm_kit.cli", "data", "convert", "--to", "wds", "--data", str(source.sft),
                          "--out", str(tmp_path / "cli"), "--samples-per-shard", "16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["samples"] == 30
    missing = subprocess.run([sys.executable, "-m", "mllm_kit.cli", "data", "convert", "--to", "wds", "--data",
                              str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.json' does not exist" in missing.stderr


def test_unreadable_images_are_skipped_and_counted_up_to_max_bad_fraction(tmp_path, tiny_recipe, caplog):
    stage = _stage(tmp_path / "run", tiny_recipe, "synthetic:sft")
    dataset = stage.data.dataset
    dataset.max_bad_fraction = 0.05  # 1.5 of 30 samples
    for k in (3, 5):
        (dataset.image_root / dataset.records[k].images[0]).write_bytes(b"\x89PNG garbage")
    assert dataset.get(3) is None and dataset.num_bad == 1
    assert "sample 3" in caplog.text and "skipped" in caplog.text
    assert dataset[3].id == dataset.records[4].id  # the next sample stands in
    with pytest.raises(DataError, match=r"2 samples with unreadable images, more than data.max_bad_fraction=0.05 of 30"):
        dataset[5]


def test_pipe_shards_train_with_allow_pipe_from_a_local_cache(source, tmp_path, tiny_recipe):
    convert(source.sft, source.image_root, tmp_path / "wds", samples_per_shard=16)
    urls = f"pipe:cat {tmp_path / 'wds'}/train-{{000000..000001}}.tar"
    recipe = tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=2)
    recipe["stages"] = recipe["stages"][1:]
    recipe["stages"][0]["data"]["train"] = {"format": "wds", "urls": urls}
    recipe["stages"][0]["data"]["allow_pipe"] = True
    stage = prepare_stage(recipe_from_dict(recipe), 0, tmp_path / "run", RunState.load(tmp_path / "run"))
    assert len(stage.data.dataset) == 30
    cached = sorted((tmp_path / "run" / "data" / "shards").glob("*.tar"))
    assert len(cached) == 2
    assert {p.read_bytes() for p in cached} == {(tmp_path / "wds" / f"train-00000{i}.tar").read_bytes() for i in (0, 1)}
    failing = {"format": "wds", "urls": "pipe:exit 3"}
    recipe["stages"][0]["data"]["train"] = failing
    with pytest.raises(DataError, match="'pipe:exit 3' exited with status 3"):
        prepare_stage(recipe_from_dict(recipe), 0, tmp_path / "run2", RunState.load(tmp_path / "run2"))
    assert not list((tmp_path / "run2" / "data" / "shards").glob("*")), "a failed fetch leaves nothing behind"

