"""Training semantics: what trains, how the loss is normalised, and resume after a hard kill."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mllm_kit.data.collate import PadCollator
from mllm_kit.objectives.base import shifted_token_ce
from mllm_kit.config import recipe_from_dict
from mllm_kit.errors import ConfigError
from mllm_kit.training.checkpoint import AtomicCheckpointIO
from mllm_kit.training.runner import RunState, prepare_stage


class GradCapture(L.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})


def _fit(prepared, *callbacks):
    prepared.trainer.callbacks.extend(callbacks)
    prepared.model.train()
    prepared.trainer.fit(prepared.module, datamodule=prepared.data)


def test_alignment_stage_trains_only_the_connector(tmp_path, tiny_recipe):
    prepared = prepare_stage(recipe_from_dict(tiny_recipe()), 0, tmp_path, RunState.load(tmp_path))
    capture = GradCapture()
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
    _fit(prepared, capture)
    connector = {n for n, _ in prepared.model.named_parameters() if n.startswith("connector.")}
    assert connector and {n for n, g in capture.grads[0].items() if g is not None} == connector
    optimizer = prepared.trainer.optimizers[0]
    with_state = {n for n, p in prepared.model.named_parameters() if p in optimizer.state}
    assert with_state == connector, "frozen parameters must carry no optimiser state"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(connector)
    for name, p in prepared.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in connector), name


def test_loss_is_normalised_by_the_global_batch_token_count(tmp_path, tiny_recipe):
    """Two micro-batches with different supervised-token counts: the accumulated gradient must equal the
    gradient of the token-mean loss over all four samples, not the mean of two micro-batch means."""
    recipe = recipe_from_dict(tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=1, grad_clip=0.0))
    prepared = prepare_stage(recipe, 0, tmp_path, RunState.load(tmp_path))
    assert prepared.trainer.accumulate_grad_batches == 2 and prepared.trainer.max_steps == 1  # set at construction
    reference = copy.deepcopy(prepared.model).train()
    loader = prepared.data.train_dataloader()
    first, second = loader.micro_batches(0)[:2]
    collate = PadCollator(prepared.model.tokenizer.pad_token_id)
    micro = [collate([prepared.data.dataset[i] for i in idx]) for idx in (first, second)]
    assert micro[0].num_loss_tokens != micro[1].num_loss_tokens, "pick samples with different token counts"

    capture = GradCapture()
    _fit(prepared, capture)

    full = collate([prepared.data.dataset[i] for i in first + second])
    loss_sum, n = shifted_token_ce(reference(full).logits, full.labels)
    (loss_sum / n).backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    got = capture.grads[0]
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4)

    # The naive mean of micro-batch means gives a different gradient on this data.
    reference.zero_grad()
    for b in micro:
        s, k = shifted_token_ce(reference(b).logits, b.labels)
        (s / k / 2).backward()
    name = next(iter(expected))
    assert not torch.allclose(reference.get_parameter(name).grad, expected[name], atol=1e-6, rtol=1e-4)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _run_cli(recipe_data: dict, run_dir: Path, *extra: str, **popen) -> subprocess.CompletedProcess:
    recipe = run_dir.parent / f"{run_dir.name}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data))
    cmd = [sys.executable, "-m", "mllm_kit.cli", "fit", "--recipe", str(recipe), "--run-dir", str(run_dir), "--no-eval", *extra]
    return subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, **popen)


def _final_weights(run: Path) -> dict:
    final = run / "sft" / "final"
    weights = {f"connector.{k}": v for k, v in load_file(final / "connector.safetensors").items()}
    for f in (final / "llm").glob("*.safetensors"):
        weights.update({f"llm.{k}": v for k, v in load_file(f).items()})
    return weights


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_recipe):
    data = tiny_recipe(max_steps=2)
    data["stages"][1]["optim"] = {"max_steps": 40}
    data["trainer"]["checkpoint_every_n_steps"] = 5
    data["data"].pop("eval")  # nothing to evaluate
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "mllm_kit.cli", "fit", "--recipe", str(recipe), "--run-dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    _run_cli(data, tmp_path / "straight")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "sft" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-stage"
    assert not (killed / "sft" / "final").exists()
    step = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < step < 40
    assert RunState.load(killed).stages["sft"]["status"] == "running"

    subprocess.run([*cmd, str(killed), "--resume"], check=True, env=env, capture_output=True)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(killed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_two_ddp_ranks_train_like_one_process_with_the_same_global_batch(tmp_path, tiny_recipe):
    """2 ranks × 1 sample × 2 accumulation steps and 1 rank × 2 samples × 2 steps see the same 4 samples per
    optimiser step; with the loss normalised by the global token count their weights must agree."""
    ddp = tiny_recipe(global_batch_size=4, micro_batch_size=1, max_steps=3, grad_clip=0.0)
    ddp["trainer"].update(devices=2, strategy="ddp", accelerator="cpu")
    single = tiny_recipe(global_batch_size=4, micro_batch_size=2, max_steps=3, grad_clip=0.0)
    _run_cli(ddp, tmp_path / "ddp")
    _run_cli(single, tmp_path / "single")
    a, b = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "single")
    assert a.keys() == b.keys()
    # All-reduce sums in another order; Adam turns float-noise-sized gradient differences into update
    # differences of up to ~lr·1e-2 in a handful of elements, so the bound is on the bulk plus a loose max.
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < 1e-4, diffs.max()
    assert (diffs > 2e-6).float().mean() < 1e-3, (diffs > 2e-6).float().mean()
    before = load_file(tmp_path / "single" / "align" / "final" / "connector.safetensors")
    assert any(not torch.equal(before[k], a[f"connector.{k}"]) for k in before), "SFT must have moved the weights"


def test_bf16_mixed_precision_and_activation_checkpointing_train(tmp_path, tiny_recipe):
    data = tiny_recipe(max_steps=2)
    data["trainer"].update(precision="bf16-mixed", activation_checkpointing=True)
    prepared = prepare_stage(recipe_from_dict(data), 0, tmp_path, RunState.load(tmp_path))
    before = prepared.model.connector.mlp[0].weight.detach().clone()
    _fit(prepared)
    assert prepared.model.llm.model.is_gradient_checkpointing
    after = prepared.model.connector.mlp[0].weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_a_frozen_bfloat16_encoder_feeds_an_fp32_connector(tmp_path, tiny_recipe):
    """``model.encoder.dtype: bfloat16`` with the encoder frozen: the tower runs in bf16, the connector and LLM train
    in fp32 on its features cast once (the same features as the tower's own output, upcast)."""
    data = tiny_recipe(max_steps=2)
    data["model"]["encoder"] = {**data["model"]["encoder"], "dtype": "bfloat16"}
    prepared = prepare_stage(recipe_from_dict(data), 0, tmp_path, RunState.load(tmp_path))
    model = prepared.model
    assert model.encoder.dtype == torch.bfloat16 and model.connector.mlp[0].weight.dtype == torch.float32
    pixels = torch.randn(2, 3, model.encoder.image_size, model.encoder.image_size)
    with torch.no_grad():
        tokens = model.encode_images(pixels).tokens
        expected = model.connector([f.to(torch.float32) for f in model.encoder.features(pixels)]).tokens
    assert tokens.dtype == torch.float32 and torch.equal(tokens, expected)
    before = model.connector.mlp[0].weight.detach().clone()
    _fit(prepared)
    after = model.connector.mlp[0].weight.detach()
    assert after.dtype == torch.float32 and torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("precision, refused", [("32-true", True), ("bf16-mixed", True), ("bf16-true", False)])
def test_training_a_bfloat16_part_needs_a_bf16_true_stage(tmp_path, tiny_recipe, precision, refused):
    data = tiny_recipe()
    data["model"]["encoder"] = {**data["model"]["encoder"], "dtype": "bfloat16"}
    data["trainer"]["precision"] = precision
    data["stages"][0]["trainable"] = ["connector", "encoder"]
    recipe = recipe_from_dict(data)
    if not refused:
        prepare_stage(recipe, 0, tmp_path, RunState.load(tmp_path))
        return
    with pytest.raises(ConfigError, match=r"stages\[0\]\.trainable: encoder holds its weights in half precision.*bf16-true"):
        prepare_stage(recipe, 0, tmp_path, RunState.load(tmp_path))


def test_the_progress_bar_counts_against_the_step_budget():
    """The trainer runs ``max_epochs=-1``; the bar's description reads the stage's epochs (900 steps of 375 batches:
    epochs 0..2), not Lightning's "Epoch 0/-2", and its total counts micro-batches under accumulation."""
    from types import SimpleNamespace

    from mllm_kit.training.runner import StepBudgetProgressBar

    bar = StepBudgetProgressBar("sft")
    bar._trainer = SimpleNamespace(max_steps=900, accumulate_grad_batches=1, num_training_batches=375)
    assert bar._get_train_description(0).strip() == "sft epoch 0/2"
    bar._trainer = SimpleNamespace(max_steps=10, accumulate_grad_batches=4, num_training_batches=12, global_step=0)
    assert bar._get_train_description(1).strip() == "sft epoch 1/3"
    assert bar.total_train_batches == 12  # a whole epoch of micro-batches
    bar._trainer.global_step = 9  # the last epoch: one optimiser step of 4 micro-batches left
    assert bar.total_train_batches == 4
