"""Weighted mixtures of training sources (data.sources): shares per epoch, draws without replacement, bad input."""

from collections import Counter

import pytest
import torch

from mllm_kit.config import recipe_from_dict
from mllm_kit.data.shards import convert
from mllm_kit.data.sources import SourceMixture, source_counts, weighted_pool
from mllm_kit.data.synthetic import SynthConfig, generate
from mllm_kit.errors import ConfigError
from mllm_kit.training.runner import RunState, prepare_stage


def test_counts_follow_the_weights_and_add_up_to_all_samples():
    assert source_counts([10, 30], [0.7, 0.3]) == [28, 12]
    assert source_counts([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    assert sum(source_counts([7, 11, 13], [0.2, 0.5, 0.3])) == 31


def test_a_pool_repeats_a_source_evenly_and_subsamples_another_differently_each_epoch():
    g = torch.Generator().manual_seed(0)
    first, second = weighted_pool([10, 30], [0.7, 0.3], g), weighted_pool([10, 30], [0.7, 0.3], g)
    for pool in (first, second):
        small = Counter(i for i in pool if i < 10)
        large = Counter(i for i in pool if i >= 10)
        assert sum(small.values()) == 28 and set(small) == set(range(10)) and set(small.values()) <= {2, 3}
        assert sum(large.values()) == 12 and max(large.values()) == 1
    assert {i for i in first if i >= 10} != {i for i in second if i >= 10}, "another subset every epoch"
    assert weighted_pool([10, 30], [0.7, 0.3], torch.Generator().manual_seed(0)) == first, "a function of the seed"


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    a = generate(root / "a", SynthConfig(num_align=4, num_sft=8, num_eval=4, tasks=("color",)))
    b = generate(root / "b", SynthConfig(seed=1, num_align=4, num_sft=24, num_eval=4, tasks=("shape",)))
    convert(b.sft, b.image_root, root / "b_wds", samples_per_shard=10)
    return a, root / "b_wds"


def _stage(tmp_path, tiny_recipe, sources, world=1):
    recipe = tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=2)
    recipe["stages"] = recipe["stages"][1:]
    recipe["stages"][0]["data"] = {"train": None, "sources": sources}
    return prepare_stage(recipe_from_dict(recipe), 0, tmp_path, RunState.load(tmp_path))


def test_a_json_and_a_shard_source_train_with_their_shares(tmp_path, tiny_recipe, two_sources):
    a, shards = two_sources
    sources = [{"train": str(a.sft), "image_root": str(a.image_root), "weight": 3},
               {"train": {"format": "wds", "urls": str(shards / "train-{000000..000002}.tar")}, "weight": 1}]
    prepared = _stage(tmp_path, tiny_recipe, sources)
    data = prepared.data.dataset
    assert isinstance(data, SourceMixture) and data.sizes == [8, 24] and len(data) == 32
    assert prepared.data.steps_per_epoch(1) == 32 // 4
    loader = prepared.data.train_dataloader()
    for epoch in (0, 1):
        seen = [i for batch in loader.micro_batches(epoch) for i in batch]
        assert len(seen) == 32
        # 24 of the 8-sample JSON source (each sample 3 times), 8 of the 24 shard samples (each at most once)
        assert sum(i < 8 for i in seen) == 24 and Counter(i for i in seen if i < 8) == {i: 3 for i in range(8)}
        assert max(Counter(i for i in seen if i >= 8).values()) == 1
    # Each part reads its own images: a colour question from the JSON source, a shape question from the shards.
    assert "color" in prepared.model.tokenizer.decode(data[0].input_ids) and "shape" in prepared.model.tokenizer.decode(data[8].input_ids)
    batch = next(iter(loader)).batch
    out = prepared.model(batch)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("data, message", [
    ({"train": None, "sources": []}, "an empty list"),
    ({"train": None, "sources": [{"train": "synthetic:sft", "weight": 0}]}, r"stages\[1\].data.sources\[0\].weight: must be positive"),
    ({"train": "synthetic:sft", "sources": [{"train": "synthetic:sft"}]}, "gives both train and sources"),
])
def test_bad_sources_are_named_at_recipe_load(tiny_recipe, data, message):
    recipe = tiny_recipe()
    recipe["stages"][1]["data"] = data
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(recipe)


def test_a_missing_source_file_is_named(tmp_path, tiny_recipe):
    with pytest.raises(ConfigError, match=r"sources\[1\].train: file 'missing.json' does not exist"):
        _stage(tmp_path, tiny_recipe, [{"train": "synthetic:sft"}, {"train": "missing.json"}])
