"""Packing (data.packing): budgets, per-sample isolation, and equality with padded batches — losses and gradients on
image, text-only and multi-image samples, for a plain, a DeepStack, an MoE-LLM and a LoRA-MoE (instance gate) model."""

import pytest
import torch

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.data.packing import PackCollator, first_fit_decreasing
from mllm_kit.errors import ConfigError
from mllm_kit.llm.moe import UpcycleMoE
from mllm_kit.registry import TRANSFORMS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec


def test_first_fit_decreasing_respects_both_budgets_and_places_every_sample_once():
    g = torch.Generator().manual_seed(0)
    sizes = [(int(n), int(k)) for n, k in zip(torch.randint(3, 60, (300,), generator=g), torch.randint(0, 3, (300,), generator=g))]
    sizes[7] = None  # dropped by truncation
    order = torch.randperm(300, generator=g).tolist()
    rows = first_fit_decreasing(sizes, order, max_tokens=100, max_images=3, buffer=64)
    placed = sorted(i for row in rows for i in row)
    assert placed == [i for i in range(300) if i != 7]
    assert all(sum(sizes[i][0] for i in row) <= 100 and sum(sizes[i][1] for i in row) <= 3 for row in rows)
    total = sum(s[0] for s in sizes if s is not None)
    tokens_only = first_fit_decreasing(sizes, order, max_tokens=100, buffer=64)
    assert total / (100 * len(tokens_only)) > 0.95 > total / (100 * len(rows))  # well filled; the image cap costs rows
    # first-fit-decreasing within one window: the longest sample opens the first row
    one = first_fit_decreasing([(50, 0), (70, 0), (30, 0), (20, 0)], [0, 1, 2, 3], max_tokens=100)
    assert one == [[1, 2], [0, 3]]
    assert first_fit_decreasing([(10, 2), (10, 2)], [0, 1], max_tokens=100, max_images=3) == [[0], [1]]


def _model(kind: str) -> MLLM:
    torch.manual_seed(0)
    if kind == "deepstack":
        spec = resolve_model(tiny_encoder_spec("clip"), {"preset": "deepstack", "start": 1, "interval": 2, "num_crops": 2},
                             tiny_llm_spec("llama", num_layers=5))
    else:
        spec = resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama", num_layers=2))
    model = MLLM.build(spec)
    if kind == "moe":  # capacity large enough that no token is dropped: routing is per token, so packing changes nothing
        UpcycleMoE(layers="every_other", num_experts=4, top_k=2, capacity_factor=64.0, noisy_gate=False)(model)
    if kind == "lora_moe":
        TRANSFORMS.build({"name": "add_lora_moe", "target_modules": ["q_proj", "v_proj"], "r": 4, "num_experts": 3,
                          "top_k": 1, "dropout": 0.0})(model)
        with torch.no_grad():  # LoRA B starts at zero; make the experts differ so the gate matters
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model.train()


def _samples(model: MLLM, deepstack: bool) -> list[Sample]:
    """Image, text-only, two-image and image samples of different lengths."""
    n, img = model.tokens_per_image(), model.image_token_id
    g = torch.Generator().manual_seed(1)
    layouts = [(1, 9), (0, 13), (2, 6), (1, 4), (0, 5)]
    out = []
    for k, (images, text) in enumerate(layouts):
        words = torch.randint(5, 60, (text,), generator=g).tolist()
        ids = [words[0], *([img] * n + [words[1]]) * images, *words[2:]] if images else words
        labels = [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:]  # the last three tokens are the reply
        crops = torch.randn(2 * images, 3, 32, 32, generator=g) if deepstack and images else None
        out.append(Sample(
            input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_image_tokens=n * images, id=str(k),
            pixel_values=torch.randn(images, 3, 32, 32, generator=g) if images else None,
            crop_pixel_values=crops, crop_grids=[(1, 2)] * images if crops is not None else [],
            instruction_ids=torch.tensor(words[:3]) if model.reads_instruction else None,
        ))
    return out


def _per_sample_losses(model: MLLM, batch: Batch, segments: torch.Tensor, count: int) -> torch.Tensor:
    logits = model(batch).logits.float()
    targets = batch.labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none")
    ce = ce * (targets != IGNORE_INDEX)
    return torch.zeros(count).index_add(0, segments[:, 1:].reshape(-1), ce.reshape(-1))


def _grads(model: MLLM) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["plain", "deepstack", "moe", "lora_moe"])
def test_packed_rows_give_the_padded_per_sample_losses_and_gradients(kind):
    model = _model(kind)
    samples = _samples(model, kind == "deepstack")
    padded = PadCollator(model.tokenizer.pad_token_id)(samples)
    rows = [[samples[0], samples[1]], [samples[2], samples[3], samples[4]]]
    packed = PackCollator(model.tokenizer.pad_token_id)(rows)
    assert packed.attention_mask is None and packed.num_loss_tokens == padded.num_loss_tokens == 15
    assert packed.images_per_sample == [1, 0, 2, 1, 0] and packed.sample_ids == ["0", "1", "2", "3", "4"]
    rows_index = torch.arange(len(samples)).unsqueeze(1).expand_as(padded.input_ids)
    losses = {}
    grads = {}
    for name, batch, segments in (("padded", padded, rows_index), ("packed", packed, packed.segments)):
        model.zero_grad()
        per_sample = _per_sample_losses(model, batch, segments, len(samples))
        per_sample.sum().backward()
        losses[name], grads[name] = per_sample.detach(), _grads(model)
    torch.testing.assert_close(losses["packed"], losses["padded"], rtol=1e-5, atol=1e-5)
    assert grads["packed"].keys() == grads["padded"].keys() and len(grads["padded"]) > 10
    worst = max((grads["packed"][k] - grads["padded"][k]).abs().max().item() for k in grads["padded"])
    assert worst <= 1e-5, worst


def test_a_packed_row_never_attends_to_another_sample():
    """Reads the attention probabilities of an eager-attention decoder on a packed row."""
    model = _model("plain").eval()
    model.llm.model.config._attn_implementation = "eager"
    samples = _samples(model, False)
    packed = PackCollator(model.tokenizer.pad_token_id, max_length=96, pad_to_max=True)([samples[:3], samples[3:]])
    with torch.no_grad():
        embeds, _ = model.embed_inputs(packed)
        # as MLLM.forward calls it (llm.decode): no cache, which is when transformers reads restarts as boundaries
        out = model.llm.model.get_decoder()(inputs_embeds=embeds, position_ids=packed.position_ids, use_cache=False,
                                            output_attentions=True)
    seg = packed.segments.clone()
    for r, lengths in enumerate(packed.seq_lens):  # the padding tail is a sequence of its own
        seg[r, sum(lengths):] = -1 - r
    same = seg.unsqueeze(2) == seg.unsqueeze(1)  # [B, T, T]
    causal = torch.ones_like(same).tril()
    for attn in out.attentions:  # [B, H, T, T]
        assert attn[(~(same & causal)).unsqueeze(1).expand_as(attn)].abs().max() == 0
        assert torch.allclose(attn.sum(-1), torch.ones(()))
    assert len(out.attentions) == 2


def test_loss_weighting_sample_and_square_weigh_each_sample_as_internvl():
    samples = [Sample(input_ids=torch.arange(1, 9), labels=torch.tensor([-100] * 4 + [5, 6, 7, 8]), pixel_values=None,
                      num_image_tokens=0, id="a"),
               Sample(input_ids=torch.arange(1, 5), labels=torch.tensor([-100, -100, -100, 4]), pixel_values=None,
                      num_image_tokens=0, id="b")]
    for weighting, per_token, total in (("sample", (1 / 4, 1.0), 2.0), ("square", (1 / 2, 1.0), 3.0)):
        padded = PadCollator(0, loss_weighting=weighting)(samples)
        packed = PackCollator(0, loss_weighting=weighting)([samples])
        for batch in (padded, packed):
            w = batch.loss_weights
            assert batch.loss_total == pytest.approx(total)
            supervised = batch.labels != IGNORE_INDEX
            assert torch.equal(w != 0, supervised)
            assert sorted(set(w[supervised].tolist())) == sorted(per_token)
    plain = PadCollator(0)(samples)
    assert plain.loss_weights is None and plain.loss_total == 5


def test_packing_is_refused_where_it_is_not_implemented(tiny_recipe):
    from mllm_kit.config.load import recipe_from_dict

    recipe = tiny_recipe()
    recipe["stages"][1]["objective"] = "dpo"
    recipe["stages"][1]["data"]["packing"] = True
    with pytest.raises(ConfigError, match=r"stages\[1\]\.data\.packing: is supported with objective lm"):
        recipe_from_dict(recipe)
    recipe = tiny_recipe()
    recipe["data"]["packing_max_images"] = 0
    with pytest.raises(ConfigError, match="packing_max_images: must be ≥ 1"):
        recipe_from_dict(recipe)


def _stage_data(tmp_path, tiny_recipe, **data):
    from mllm_kit.config import recipe_from_dict
    from mllm_kit.training.runner import RunState, prepare_stage

    recipe = tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=2)
    recipe["data"].update({"packing": True, "max_length": 256, **data})
    recipe["stages"] = recipe["stages"][1:]  # SFT only: multi-turn samples of varied length
    recipe["data"]["synthetic"]["num_sft"] = 96
    return prepare_stage(recipe_from_dict(recipe), 0, tmp_path, RunState.load(tmp_path))


def test_packed_epochs_visit_every_sample_once_across_ranks_and_resume_where_they_stopped(tmp_path, tiny_recipe):
    prepared = _stage_data(tmp_path, tiny_recipe)
    data = prepared.data
    loaders = [data._loader(rank, 2) for rank in range(2)]
    sizes = data.dataset.packed_sizes()
    assert all(s is not None for s in sizes) and len(sizes) == 96
    for epoch in (0, 1):
        rows = [row for loader in loaders for micro in loader.micro_batches(epoch) for row in micro]
        seen = sorted(i for row in rows for i in row)
        assert len(seen) == len(set(seen))  # no sample twice within an epoch (a tail of rows may be left for none)
        assert all(sum(sizes[i][0] for i in row) <= 256 for row in rows)
    # every sample of the epoch's packing is in some row: the rows dropped are a tail of whole global batches
    all_rows = loaders[0].micro_batches(0)
    assert len(all_rows) % loaders[0].accumulate == 0
    # resuming after k optimiser steps yields the batches an uninterrupted epoch yields from step k on
    full = [b.batch.sample_ids for b in data._loader(0, 1)]
    resumed = [b.batch.sample_ids for b in data._loader(0, 1, steps_done=lambda: 1)]
    assert resumed == full[data._loader(0, 1).accumulate:]
    first = next(iter(data._loader(0, 1))).batch
    assert first.position_ids is not None and first.attention_mask is None and len(first.sample_ids) > 2


def test_a_sample_with_more_images_than_a_row_holds_is_named(tmp_path, tiny_recipe):
    prepared = _stage_data(tmp_path, tiny_recipe)
    with pytest.raises(ConfigError, match=r"sft\.json.*1 images, more than a packed row holds"):
        prepared.data.spec.packing_max_images = 0  # the recipe check refuses 0; forced here to reach the loader's
        prepared.data._loader()


def test_a_packed_stage_trains(tmp_path, tiny_recipe):
    prepared = _stage_data(tmp_path, tiny_recipe, loss_weighting="square")
    prepared.model.train()
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters() if p.requires_grad}
    prepared.trainer.fit(prepared.module, datamodule=prepared.data)
    assert prepared.trainer.global_step == 2
    assert any(not torch.equal(before[n], p.detach()) for n, p in prepared.model.named_parameters() if n in before)
