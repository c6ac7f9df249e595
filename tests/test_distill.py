"""Distillation: the position-gathered LM head, the KD/mimic/preference objectives on real models, teachers, errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_model

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.cli.main import main
from mllm_kit.config import recipe_from_dict, resolve_model
from mllm_kit.config.recipe import DataSpec
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.formats import parse_record
from mllm_kit.data.synthetic import SynthConfig, generate
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.model import MLLM
from mllm_kit.objectives.base import shifted_token_ce
from mllm_kit.objectives.distill import KDObjective, MimicObjective
from mllm_kit.objectives.divergences import divergence, relation_loss
from mllm_kit.objectives.head import head_cross_entropy
from mllm_kit.objectives.preference import DPOObjective, KTOPairObjective
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec, tiny_tokenizer
from mllm_kit.training.data import build_dataset, teacher_view
from mllm_kit.training.runner import RunState, prepare_stage


def _model(seed=0, connector="mlp2x_gelu", **llm):
    torch.manual_seed(seed)
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), connector, tiny_llm_spec("llama", **llm)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(num_align=8, num_sft=8, num_eval=4, image_size=64))
    return root


def _batch(model, synth, split="sft", n=4, teacher=None, **kw):
    spec = DataSpec(train=str(synth / f"{split}.json"), image_root=str(synth), template="chatml")
    view = teacher_view(model, teacher, spec) if teacher is not None else None
    ds = build_dataset(model, spec, synth, teacher=view, **kw)
    return PadCollator(model.tokenizer.pad_token_id)([ds[i] for i in range(n)])


def _frozen(model):
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    return teacher


def test_gathered_chunked_lm_loss_equals_the_full_logits_loss_and_gradient(synth):
    model = _model()
    batch = _batch(model, synth)
    full_sum, n = shifted_token_ce(model(batch).logits, batch.labels)
    full_grads = torch.autograd.grad(full_sum, [model.llm.model.lm_head.weight, model.connector.mlp[0].weight])
    out = model(batch)
    chunked_sum, m = head_cross_entropy(out.hidden, batch.labels, out.head, batch.num_loss_tokens, chunk_size=7)
    grads = torch.autograd.grad(chunked_sum, [model.llm.model.lm_head.weight, model.connector.mlp[0].weight])
    assert m == int(n) > 7  # several checkpointed chunks
    torch.testing.assert_close(chunked_sum, full_sum, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _kd(objective, student, teacher, batch):
    objective.bind(student, teacher)
    with torch.no_grad():
        t_out = teacher(batch.teacher_view())
    return objective(student(batch), batch, None, t_out)


@pytest.mark.parametrize("kind", ["forward", "js", "tv"])
def test_kd_terms_and_their_gradients_vanish_when_the_teacher_is_the_student(synth, kind):
    student = _model()
    batch = _batch(student, synth)
    objective = KDObjective(lm=0, response=1, visual=1, relation=1, divergence=kind, chunk_size=5)
    out = _kd(objective, student, _frozen(student), batch)
    grads = torch.autograd.grad(out["loss"], [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    assert abs(float(out["loss"].detach())) < 1e-6
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-6


def test_mimic_gradient_vanishes_at_the_teacher(synth):
    student = _model()
    batch = _batch(student, synth)
    out = _kd(MimicObjective(positions="all"), student, _frozen(student), batch)
    grads = torch.autograd.grad(out["loss"], [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    assert float(out["loss"].detach()) > 0.1  # the teacher's entropy
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-6


def test_kd_parts_equal_a_computation_from_the_full_logits(synth):
    student, teacher = _model(0), _frozen(_model(1))
    batch = _batch(student, synth)
    objective = KDObjective(lm=1, response=1, visual=1, relation=1, relation_normalize=True, chunk_size=3)
    out = _kd(objective, student, teacher, batch)
    with torch.no_grad():
        zs, zt = student(batch).logits, teacher(batch).logits
    response = torch.zeros_like(batch.labels, dtype=torch.bool)
    response[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    lm_sum, n = shifted_token_ce(zs, batch.labels)
    visual = batch.input_ids == student.image_token_id
    rel = relation_loss(zs[visual].unflatten(0, (batch.num_images, -1)), zt[visual].unflatten(0, (batch.num_images, -1)), True)
    expected = {"lm_loss": lm_sum / n, "kd_response": divergence(zs[response], zt[response]).mean(),
                "kd_visual": divergence(zs[visual], zt[visual]).mean(), "kd_relation": rel.mean()}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(out["loss"].detach(), sum(expected.values()), atol=1e-5, rtol=1e-5)


def test_preference_objectives_with_the_policy_as_reference(synth):
    student = _model()
    batch = _batch(student, synth, split="preference", preference=True)
    assert batch.pairs == 4 and len(batch) == 8
    assert batch.sample_ids[:4] == batch.sample_ids[4:]
    out = _kd(DPOObjective(), student, _frozen(student), batch)
    torch.testing.assert_close(out["loss"].detach(), torch.tensor(0.6931471805599453), atol=1e-6, rtol=0)
    kto = _kd(KTOPairObjective(), student, _frozen(student), batch)
    torch.testing.assert_close(kto["loss"].detach(), torch.tensor(0.5), atol=1e-6, rtol=0)  # 1 − σ(0) per reply
    # The reply log-probs the loss reads are the sums over each row's supervised tokens.
    logp = torch.log_softmax(student(batch).logits.float(), -1)[:, :-1].gather(-1, batch.labels[:, 1:].clamp(min=0).unsqueeze(-1))[..., 0]
    per_row = (logp * (batch.labels[:, 1:] != IGNORE_INDEX)).sum(1)
    torch.testing.assert_close(DPOObjective()._sequence_logps(student(batch), batch, False).detach(), per_row.detach(), atol=1e-5, rtol=1e-5)


def test_preference_records_parse_and_fail_clearly():
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"}], "chosen": "red", "rejected": "blue"}
    assert parse_record(good, 0, "p.json").pair == ("red", "blue")
    with pytest.raises(DataError, match="both 'chosen' and 'rejected'"):
        parse_record({**good, "rejected": ""}, 0, "p.json")
    with pytest.raises(DataError, match="end with the human turn"):
        parse_record({**good, "conversations": [*good["conversations"], {"from": "gpt", "value": "red"}]}, 0, "p.json")


def test_a_preference_stage_refuses_plain_samples_and_a_plain_stage_refuses_pairs(synth):
    model = _model()
    with pytest.raises(DataError, match="no 'chosen'/'rejected'"):
        _batch(model, synth, split="sft", preference=True)
    with pytest.raises(DataError, match="reads no pairs"):
        _batch(model, synth, split="preference")


def test_a_teacher_with_another_connector_reads_its_own_view(synth):
    student = _model()
    teacher = _frozen(_model(1, connector={"preset": "c_abstractor", "num_queries": 4, "hidden": 32}))
    batch = _batch(student, synth, teacher=teacher)
    assert student.tokens_per_image() == 16 and teacher.tokens_per_image() == 4
    assert batch.teacher is not None and batch.teacher.num_image_tokens * 4 == batch.num_image_tokens
    assert torch.equal(batch.labels[batch.labels != IGNORE_INDEX], batch.teacher.labels[batch.teacher.labels != IGNORE_INDEX])
    out = _kd(KDObjective(), student, teacher, batch)
    assert torch.isfinite(out["loss"]) and float(out["kd_response"]) > 0
    out["loss"].backward()
    with pytest.raises(ConfigError, match=r"objective.visual: .* student has 16 tokens per image and the teacher 4"):
        KDObjective(visual=1).bind(student, teacher, "objective")


def test_a_teacher_template_that_changes_the_reply_tokens_is_a_clear_error(synth):
    student = _model()
    spec = DataSpec(train=str(synth / "sft.json"), image_root=str(synth), template="chatml")
    view = teacher_view(student, _frozen(student), spec, template="plain")
    ds = build_dataset(student, spec, synth, teacher=view)
    with pytest.raises(DataError, match=r"sft.json.*teacher's view of this sample"):
        ds[0]


# -- the positions, normalisers and terms the released codes use (LLaVA-MoD, LLAVADI) --------------------------


def _close(actual, expected, msg=None):
    torch.testing.assert_close(actual.detach().double(), torch.as_tensor(expected).double(), atol=1e-5, rtol=1e-5, msg=msg)


def _full_logits(student, teacher, batch):
    with torch.no_grad():
        return student(batch).logits.double(), teacher(batch.teacher_view()).logits.double()


def _llava_mod_align(zs, zt, labels):
    """LLaVA-MoD's ``compute_align_loss`` (llavamod/train/align_trainer.py) on one micro-batch: the UNshifted label mask."""
    x = (torch.softmax(zt, -1) * torch.log_softmax(zs, -1)).sum(-1)
    mask = labels != IGNORE_INDEX
    return -(x * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_type", ["only_kd", "kd_lm"])
def test_default_mimic_reads_llava_mods_unshifted_label_positions(synth, loss_type):
    student, teacher = _model(0), _frozen(_model(1))
    with torch.no_grad():  # peaked distributions that change from position to position: one position off shows
        for model in (student, teacher):
            model.llm.model.lm_head.weight.mul_(30)
    batch = _batch(student, synth)
    out = _kd(MimicObjective(loss_type=loss_type, chunk_size=4), student, teacher, batch)
    zs, zt = _full_logits(student, teacher, batch)
    align = _llava_mod_align(zs, zt, batch.labels)
    lm_sum, n = shifted_token_ce(zs, batch.labels)
    _close(out["mimic_align"], align)
    _close(out["lm_loss"], lm_sum / n)
    expected = align + (lm_sum / n if loss_type == "kd_lm" else 0.0)
    _close(out["loss"], expected)
    # The off-by-one is real: the shifted positions (the LM loss's) give another value.
    shifted = _kd(MimicObjective(positions="next_token"), student, teacher, batch)["mimic_align"]
    assert abs(float(shifted) - float(align)) > 0.1


def test_mimic_per_sample_reduction_is_llava_mods_one_sample_micro_batches(synth):
    student, teacher = _model(0), _frozen(_model(1))
    batch = _batch(student, synth)
    objective = MimicObjective(reduction="sample")
    out = _kd(objective, student, teacher, batch)
    zs, zt = _full_logits(student, teacher, batch)
    per_sample = [_llava_mod_align(zs[i : i + 1], zt[i : i + 1], batch.labels[i : i + 1]) for i in range(len(batch))]
    _close(out["loss"], torch.stack(per_sample).mean())
    # The trainer's token normaliser does not enter a per-sample mean.
    with torch.no_grad():
        again = objective(student(batch), batch, 123.0, teacher(batch))
    torch.testing.assert_close(again["loss"], out["loss"].detach(), atol=1e-6, rtol=1e-6)


def test_mimic_aligns_label_positions_across_a_teacher_view_with_fewer_image_tokens(synth):
    student = _model()
    teacher = _frozen(_model(1, connector={"preset": "c_abstractor", "num_queries": 4, "hidden": 32}))
    batch = _batch(student, synth, teacher=teacher)
    assert batch.teacher is not None and batch.teacher.input_ids.shape[1] < batch.input_ids.shape[1]
    out = _kd(MimicObjective(), student, teacher, batch)
    zs, zt = _full_logits(student, teacher, batch)
    s_rows, t_rows = zs[batch.labels != IGNORE_INDEX], zt[batch.teacher.labels != IGNORE_INDEX]
    expected = -(torch.softmax(t_rows, -1) * torch.log_softmax(s_rows, -1)).sum(-1).mean()
    _close(out["mimic_align"], expected)


def _llavadi_reference(student, teacher, adapter, batch):
    """LLAVADI's ``DistillModel.forward`` (xushilin1/LLaVADI, projects/distill/distill_llava_llama.py) under the flags of
    scripts/v1_5/distill_finetune.sh — --align_logits --align_logits_all --norm_logits --align_hidden_embeds
    --align_all_hidden_embeds — written out per sample as it is there (the LM loss as mllm-kit normalises it)."""
    import torch.nn.functional as F

    def normalize(logit):
        return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))

    with torch.no_grad():
        s_out, t_out = student(batch), teacher(batch)
    zs, zt, hs, ht = s_out.logits.double(), t_out.logits.double(), s_out.hidden, t_out.hidden
    mask = batch.attention_mask.bool()
    kl = hid = 0.0
    for i in range(len(batch)):
        s_logits, t_logits = normalize(zs[i][mask[i]]), normalize(zt[i][mask[i]])
        kl += F.kl_div(F.log_softmax(s_logits, dim=-1), F.softmax(t_logits, dim=-1), reduction="batchmean")
        with torch.no_grad():
            hid += F.mse_loss(adapter(hs[i][mask[i]]).double(), ht[i][mask[i]].double())
    lm_sum, n = shifted_token_ce(zs, batch.labels)
    return {"lm_loss": lm_sum / n, "kd_response": kl / len(batch), "kd_hidden": hid / len(batch)}


def test_kd_with_llavadis_released_options_equals_its_distill_model(synth):
    student, teacher = _model(0), _frozen(_model(1, num_layers=3, hidden_size=96))
    batch = _batch(student, synth)
    assert not batch.attention_mask.all()  # padded rows: the padding is not an attended position
    objective = KDObjective(lm=1, response=1, hidden=1, positions="all", logit_norm="zscore", reduction="sample", chunk_size=16)
    out = _kd(objective, student, teacher, batch)
    expected = _llavadi_reference(student, teacher, objective.adapter, batch)
    for key, value in expected.items():
        _close(out[key], value, key)
    _close(out["loss"], sum(expected.values()))
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.adapter.parameters())


def test_kd_hidden_term_and_temperature_inside_the_objective(synth):
    import torch.nn.functional as F

    student, teacher = _model(0), _frozen(_model(1, num_layers=3, hidden_size=96))
    batch = _batch(student, synth)
    tau, normalizer = 2.0, 7.0
    objective = KDObjective(lm=1, response=1, hidden=0.5, temperature=tau, chunk_size=5)
    objective.bind(student, teacher)
    with torch.no_grad():
        t_out = teacher(batch)
    s_out = student(batch)
    out = objective(s_out, batch, normalizer, t_out)
    response = torch.zeros_like(batch.labels, dtype=torch.bool)
    response[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    zs, zt = s_out.logits.detach().double()[response], t_out.logits.double()[response]
    kl = F.kl_div(F.log_softmax(zs / tau, -1), F.softmax(zt / tau, -1), reduction="none").sum(-1) * tau**2
    with torch.no_grad():
        mse = (objective.adapter(s_out.hidden[response]).double() - t_out.hidden[response].double()).pow(2).mean(-1)
    lm_sum, _ = shifted_token_ce(s_out.logits.detach().double(), batch.labels)
    _close(out["kd_response"], kl.mean())
    _close(out["kd_hidden"], mse.mean())
    # Token terms are sums over the supervised positions divided by the trainer's normaliser.
    expected = (lm_sum + kl.sum() + 0.5 * mse.sum()) / normalizer
    _close(out["loss"], expected)


def test_every_position_needs_the_teacher_to_read_the_students_sequence(synth):
    student = _model()
    teacher = _frozen(_model(1, connector={"preset": "c_abstractor", "num_queries": 4, "hidden": 32}))
    for objective in (KDObjective(positions="all"), MimicObjective(positions="all")):
        with pytest.raises(ConfigError, match=r"stages\[1\]\.objective\.positions: 'all' .* reads its own view"):
            objective.bind(student, teacher, "stages[1].objective", separate_view=True)
    with pytest.raises(ConfigError, match=r"objective kd: positions: 'every' is not one of"):
        KDObjective(positions="every")


# -- long samples: both views are cut alike --------------------------------------------------------------


def test_truncate_to_keeps_the_shortest_prefix_with_the_replies_and_images_asked_for():
    from mllm_kit.data.conversation import Encoded, ImageSpan, truncate_to

    x = IGNORE_INDEX
    ids = [1, 9, 9, 2, 3, 4, 5, 9, 9, 9, 6, 7, 8]  # 9: image tokens (spans at 1 and 7), replies 3 4 and 7 8
    enc = Encoded(ids, [x, x, x, x, 3, 4, x, x, x, x, x, 7, 8], [ImageSpan(1, 2), ImageSpan(7, 3)])
    assert truncate_to(enc, 4, 2) is enc
    one = truncate_to(enc, 2, 1)
    assert one.input_ids == [1, 9, 9, 2, 3, 4] and one.image_spans == [ImageSpan(1, 2)]
    assert truncate_to(enc, 1, 1).input_ids == [1, 9, 9, 2, 3]
    assert truncate_to(enc, 3, 2).input_ids == ids[:12] and len(truncate_to(enc, 3, 2).image_spans) == 2
    assert truncate_to(enc, 0, 1).input_ids == [1, 9, 9]


def _long_record(synth):
    reply = "the shape is a large triangle drawn in red on a plain white background near the centre"
    return {"id": "long", "image": ["images/sft_000000.png", "images/sft_000001.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": reply},
        {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": reply.replace("triangle", "circle")},
        {"from": "human", "value": "Which is larger?"}, {"from": "gpt", "value": reply.replace("large", "larger")}]}


@pytest.mark.parametrize("where", ["first_reply", "second_image", "last_reply"])
def test_a_long_sample_is_cut_alike_in_a_teacher_view_with_fewer_image_tokens(synth, tmp_path, where):
    student = _model()
    teacher = _frozen(_model(1, connector={"preset": "c_abstractor", "num_queries": 4, "hidden": 32}))
    records = [_long_record(synth), *json.loads((synth / "sft.json").read_text())[:3]]
    (tmp_path / "long.json").write_text(json.dumps(records))

    def dataset(max_length):
        spec = DataSpec(train=str(tmp_path / "long.json"), image_root=str(synth), template="chatml", max_length=max_length)
        return build_dataset(student, spec, synth, teacher=teacher_view(student, teacher, spec))

    whole = dataset(4096)[0]
    images = (whole.input_ids == student.image_token_id).nonzero().squeeze(1)
    supervised = (whole.labels != IGNORE_INDEX).nonzero().squeeze(1)
    cut = {"first_reply": int(supervised[3]), "second_image": int(images[-1]) - 5, "last_reply": int(supervised[-4])}[where]
    ds = dataset(cut)
    sample = ds[0]
    assert ds.num_trimmed == 1 and len(sample.input_ids) <= cut
    mine, theirs = sample.labels[sample.labels != IGNORE_INDEX], sample.teacher.labels[sample.teacher.labels != IGNORE_INDEX]
    assert 0 < len(mine) < len(supervised) and torch.equal(mine, theirs)
    kept = 1 if where != "last_reply" else 2
    assert sample.pixel_values.shape[0] == sample.teacher.pixel_values.shape[0] == kept
    assert sample.teacher.num_image_tokens == 4 * kept and sample.num_image_tokens == 16 * kept
    text = sample.input_ids[sample.input_ids != student.image_token_id]
    their_text = sample.teacher.input_ids[sample.teacher.input_ids != teacher.image_token_id]
    assert torch.equal(their_text, text[: len(their_text)])  # the same text, up to the last kept reply token
    batch = PadCollator(student.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    for objective in (KDObjective(hidden=1), MimicObjective()):
        out = _kd(objective, student, teacher, batch)
        assert torch.isfinite(out["loss"]) and float(out["loss"]) > 0


# -- teachers in recipes: loading, freezing, errors before training --------------------------------------


def _kd_recipe(tiny_recipe, teacher, objective=None, **stage):
    data = tiny_recipe(max_steps=2)
    data["stages"] = [{"name": "distil", "trainable": ["connector", "llm"], "data": {"train": "synthetic:sft"},
                       "teacher": teacher, "objective": objective or {"name": "kd", "hidden": 1}, **stage}]
    data["data"].pop("eval")
    return data


def test_teacher_is_frozen_out_of_the_optimiser_and_checkpoint_and_recorded(tmp_path, tiny_recipe):
    teacher = _model(3, num_layers=3, hidden_size=96)
    save_model(teacher, str(tmp_path / "teacher.safetensors"))
    llm = tiny_llm_spec("llama", num_layers=3, hidden_size=96)
    recipe = recipe_from_dict(_kd_recipe(tiny_recipe, {"model": {"llm": llm}, "weights": str(tmp_path / "teacher.safetensors")}))
    prepared = prepare_stage(recipe, 0, tmp_path / "run", RunState.load(tmp_path / "run"))
    loaded = prepared.module.teacher.model
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    for k, v in teacher.state_dict().items():
        assert torch.equal(before[k], v), k  # the weights file, loaded strictly
    prepared.model.train()
    prepared.trainer.fit(prepared.module, datamodule=prepared.data)
    assert not loaded.training and all(not p.requires_grad and p.grad is None for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(before[k], v), k
    optimised = {id(p) for g in prepared.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in loaded.parameters()}
    assert optimised & {id(p) for p in prepared.module.objective_modules.parameters()}  # LLAVADI's adapter trains
    ckpt = torch.load(tmp_path / "run" / "distil" / "checkpoints" / "last.ckpt", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if "teacher" in k]
    assert ckpt["mllm_kit_teacher"]["form"] == "model" and len(ckpt["mllm_kit_teacher"]["fingerprint"]) == 16


def _fit_fails(tmp_path, capsys, data):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(data))
    run = tmp_path / "run"
    code = main(["fit", "--recipe", str(recipe), "--run-dir", str(run), "--no-eval", "trainer.progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not run.exists(), "a failed check must leave no run directory behind"
    return err


def test_teacher_mistakes_fail_before_anything_trains(tmp_path, capsys, tiny_recipe):
    err = _fit_fails(tmp_path, capsys, _kd_recipe(tiny_recipe, {"run": str(tmp_path / "nope"), "stage": "sft"}))
    assert "stages[0] ('distil').teacher.run: " in err and "is not a run directory" in err

    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.yaml").write_text((tmp_path / "r.json").read_text())
    (other / "state.json").write_text(json.dumps({"stages": {"sft": {"status": "running"}}}))
    err = _fit_fails(tmp_path, capsys, _kd_recipe(tiny_recipe, {"run": str(other), "stage": "sft"}))
    assert "teacher.stage: stage 'sft' of run" in err and "has not finished (running" in err

    llm = {"name": "hf_causal_lm", "tokenizer": str(tiny_tokenizer(vocab_size=320)),
           "config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}}
    err = _fit_fails(tmp_path, capsys, _kd_recipe(tiny_recipe, {"model": {"llm": llm}}))
    assert "teacher.vocab: student and teacher vocabularies differ" in err

    conn = {"preset": "c_abstractor", "num_queries": 4, "hidden": 32}
    err = _fit_fails(tmp_path, capsys, _kd_recipe(tiny_recipe, {"model": {"connector": conn}}, {"name": "kd", "visual": 1}))
    assert "objective.visual: the visual term(s) read the visual positions" in err

    err = _fit_fails(tmp_path, capsys, _kd_recipe(tiny_recipe, {"model": {}}, "lm"))
    assert "teacher: the stage's objective 'lm' reads no teacher" in err


@pytest.mark.parametrize("teacher, message", [
    ({"stage": "later"}, "teacher.stage: 'later' is not an earlier stage of this recipe"),
    ({"run": "x"}, "teacher.stage: a teacher run needs the stage"),
    ({"run": "x", "stage": "sft", "hf_llava": "y"}, "give exactly one teacher"),
    ({"stage": "x", "precision": "fp8"}, "teacher.precision: expected one of"),
])
def test_teacher_specs_are_checked_at_load(tiny_recipe, teacher, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_dict(_kd_recipe(tiny_recipe, teacher))


# -- end to end (slow): the zoo recipes, resume, DDP ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava_kd", "llava_mod", "llavadi"])
def test_distillation_zoo_recipes_run_every_stage_with_smoke(tmp_path, name):
    from mllm_kit.config import load_recipe

    run = tmp_path / name
    assert main(["fit", "--recipe", name, "--smoke", "--run-dir", str(run), "trainer.progress=false"]) == 0
    state = json.loads((run / "state.json").read_text())["stages"]
    assert sorted(s.name for s in load_recipe(name).stages) == sorted(state) and all(v["status"] == "done" for v in state.values())
    distilled = [s for s in load_recipe(name).stages if s.teacher is not None]
    for stage in distilled:
        header = (run / stage.name / "logs" / "metrics.csv").read_text().splitlines()[0]
        expected = {"kd": "train/kd_response", "mimic": "train/mimic_align", "kto_pair": "train/pref_loss"}[stage.objective["name"]]
        assert expected in header, (stage.name, header)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished one-stage teacher run (a 3-layer Llama, wider than the student), shared by the slow tests."""
    from conftest import _tiny_recipe
    from test_training import _run_cli

    data = _tiny_recipe(max_steps=4)
    data["model"]["llm"] = tiny_llm_spec("llama", num_layers=3, hidden_size=96)
    data["stages"] = [{"name": "sft", "trainable": ["connector", "llm"], "data": {"train": "synthetic:sft"}}]
    data["data"].pop("eval")
    run = tmp_path_factory.mktemp("teacher") / "run"
    _run_cli(data, run)
    return run


def _student(tiny_recipe, teacher_run, **optim):
    data = _kd_recipe(tiny_recipe, {"run": str(teacher_run), "stage": "sft"}, {"name": "kd", "visual": 1, "relation": 1})
    data["stages"][0]["name"] = "sft"  # _final_weights reads sft/final
    data["optim"].update(optim)
    return data


@pytest.mark.slow
def test_killed_distillation_resumes_to_bit_identical_weights(tmp_path, tiny_recipe, teacher_run):
    import signal
    import subprocess
    import sys
    import time

    from test_training import _final_weights, _run_cli

    data = _student(tiny_recipe, teacher_run, max_steps=30)
    data["trainer"]["checkpoint_every_n_steps"] = 5
    _run_cli(data, tmp_path / "straight")
    import yaml

    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump(data))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mllm_kit.cli", "fit", "--recipe", str(recipe), "--run-dir", str(killed), "--no-eval"]
    ckpt = killed / "sft" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "sft" / "final").exists()
    assert 0 < torch.load(ckpt, weights_only=False)["global_step"] < 30
    _run_cli(data, killed, "--resume")
    a, b = _final_weights(tmp_path / "straight"), _final_weights(killed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_two_ddp_ranks_distil_like_one_process(tmp_path, tiny_recipe, teacher_run):
    from test_training import _final_weights, _run_cli

    ddp = _student(tiny_recipe, teacher_run, global_batch_size=4, micro_batch_size=1, max_steps=3, grad_clip=0.0)
    ddp["trainer"].update(devices=2, strategy="ddp", accelerator="cpu")
    single = _student(tiny_recipe, teacher_run, global_batch_size=4, micro_batch_size=2, max_steps=3, grad_clip=0.0)
    _run_cli(ddp, tmp_path / "ddp")
    _run_cli(single, tmp_path / "single")
    a, b = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "single")
    assert a.keys() == b.keys() and a
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < 1e-4, diffs.max()
    assert (diffs > 2e-6).float().mean() < 1e-3


def test_data_inspect_shows_both_replies_of_a_preference_pair(tmp_path, capsys):
    assert main(["data", "inspect", "--recipe", "llava_mod", "--smoke", "--stage", "preference", "--count", "1",
                 "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    pair = json.loads(next(tmp_path.glob("synthetic-*/preference.json")).read_text())[0]
    assert f"[[{pair['chosen']}" in out and f"rejected: sample {pair['id']}" in out and f"[[{pair['rejected']}" in out


def test_a_llava_hf_teacher_is_imported_frozen_and_distils(tmp_path, tiny_recipe):
    from test_parity_llava import _clip_llama_llava
    from transformers import AutoTokenizer

    from mllm_kit import Batch

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    llava = _clip_llama_llava(tok, "default")
    llava.save_pretrained(tmp_path / "llava-hf")
    tok.save_pretrained(tmp_path / "llava-hf")
    data = _kd_recipe(tiny_recipe, {"hf_llava": str(tmp_path / "llava-hf"), "vocab": "shared_prefix"})
    data["stages"][0]["data"] = {"train": "synthetic:align", "template": "plain"}
    prepared = prepare_stage(recipe_from_dict(data), 0, tmp_path / "run", RunState.load(tmp_path / "run"))
    teacher = prepared.module.teacher.model
    n = teacher.tokens_per_image()
    ids = torch.cat([torch.randint(10, 300, (1, 3)), torch.full((1, n), llava.config.image_token_id), torch.randint(10, 300, (1, 5))], 1)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(Batch(input_ids=ids, pixel_values=pixels, num_image_tokens=n)).logits,
                                   llava(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=1e-5)
    prepared.model.train()
    prepared.trainer.fit(prepared.module, datamodule=prepared.data)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
