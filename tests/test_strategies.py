"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU ranks (gloo) against one process, with sharded checkpoints that resume
and a consolidated ``final/`` (docs/scaling.md)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mllm_kit.batch import Batch
from mllm_kit.config import recipe_from_dict
from mllm_kit.data.synthetic import SynthConfig, generate
from mllm_kit.errors import ConfigError
from mllm_kit.model import MLLM
from mllm_kit.training.strategies import block_classes

_NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install 'mllm-kit[deepspeed]'")
STRATEGIES = ["fsdp", pytest.param("deepspeed_stage_2", marks=_NO_DEEPSPEED), pytest.param("deepspeed_stage_3", marks=_NO_DEEPSPEED)]


@pytest.fixture(scope="module")
def half_text_only(tmp_path_factory) -> Path:
    """SFT data where every other sample is text-only: with modality grouping off, some optimiser steps give one
    rank a text-only micro-batch while the other holds an image (chance of never: 2⁻¹⁶ over 16 micro-batch pairs)."""
    root = tmp_path_factory.mktemp("half_text_only")
    paths = generate(root / "synthetic", SynthConfig(num_align=4, num_sft=24, num_eval=4, image_size=64))
    samples = json.loads(paths.sft.read_text())
    for sample in samples[1::2]:
        sample.pop("image")
        for turn in sample["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    out = root / "sft.json"
    out.write_text(json.dumps(samples))
    assert sum("image" in s for s in samples) == 12
    return out


def _recipe(tiny_recipe, data: Path, strategy: str | None, max_steps: int = 4) -> dict:
    """One SFT stage training a timm ViT (its cls token and position embeddings are read outside their module's
    forward), a resampler (learned latents on the connector itself) and the LLM, with activation
    checkpointing; 2 ranks × 1 sample × 2 accumulation or 1 process × 2 samples × 2: the same 4 samples per optimiser
    step. Adam's eps=1 makes the update scale with the gradient, so a gradient mis-scaled by accumulation or world size
    shows up in the weights (Adam is otherwise blind to a constant factor)."""
    from mllm_kit.tiny import tiny_encoder_spec

    r = tiny_recipe(global_batch_size=4, micro_batch_size=1 if strategy else 2, max_steps=max_steps, grad_clip=0.0, eps=1.0,
                    schedule="constant", warmup_steps=0)
    r["model"].update(encoder=tiny_encoder_spec("timm_vit"), connector="resampler")
    r["data"] = {**r["data"], "train": str(data), "image_root": str(data.parent / "synthetic"), "group_by_modality": False}
    r["data"].pop("eval")
    r["trainer"].update(accelerator="cpu", checkpoint_every_n_steps=2, activation_checkpointing=True,
                        **({"devices": 2, "strategy": strategy} if strategy else {}))
    # The ViT's used part (read at layer −2 of 3: its last block and final norm never get a gradient)
    used_vit = ["encoder.model.patch_embed", "encoder.model.blocks.0", "encoder.model.blocks.1", r"re:^encoder\.model\.(cls_token|pos_embed)$"]
    r["stages"] = [{"name": "sft", "trainable": [*used_vit, "connector", "llm"]}]
    return r


def _launch(recipe: dict, run_dir: Path, *extra: str) -> subprocess.Popen:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "mllm_kit.cli", "fit", "--recipe", str(path), "--run-dir", str(run_dir), "--no-eval", *extra]
    # A session of its own, so that a kill reaches every rank the launcher started.
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _run(recipe: dict, run_dir: Path, *extra: str) -> None:
    proc = _launch(recipe, run_dir, *extra)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "sft" / "final"
    weights = {f"connector.{k}": v for k, v in load_file(final / "connector.safetensors").items()}
    for part in ("llm", "encoder"):
        for f in (final / part).glob("*.safetensors"):
            weights.update({f"{part}.{k}": v for k, v in load_file(f).items()})
    return weights


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, half_text_only) -> Path:
    from conftest import _tiny_recipe

    run = tmp_path_factory.mktemp("single") / "run"
    _run(_recipe(_tiny_recipe, half_text_only, None), run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_sharded_ranks_match_one_process_resume_and_consolidate(tmp_path, tiny_recipe, half_text_only, single_run, strategy):
    recipe = _recipe(tiny_recipe, half_text_only, strategy)
    straight = tmp_path / "straight"
    _run(recipe, straight)
    # Each rank wrote its own shard; nothing was gathered into one checkpoint file.
    ckpt = straight / "sft" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len([f for f in ckpt.rglob("*") if f.is_file()]) >= 2
    diff = _max_diff(_weights(straight), _weights(single_run))
    assert diff < 1e-6, f"{strategy}: max parameter difference to one process {diff:.2e}"

    # Killed once the first sharded checkpoint is in place, then resumed: the same weights as the straight run.
    killed = tmp_path / "killed"
    proc = _launch(recipe, killed)
    target = killed / "sft" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "sft" / "final").exists(), "the run must be killed mid-stage"
    _run(recipe, killed, "--resume")
    diff = _max_diff(_weights(killed), _weights(straight))
    assert diff < 1e-6, f"{strategy}: resumed run differs from the straight one by {diff:.2e}"

    # The consolidated final/ reloads as an ordinary model and gives the one-process model's logits.
    ours, ref = MLLM.from_pretrained(straight / "sft" / "final").eval(), MLLM.from_pretrained(single_run / "sft" / "final").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    pixels = torch.randn(ours.encoder.dummy_pixels("cpu").shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch).logits, ref(batch).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_images(pixels).tokens, ref.encode_images(pixels).tokens, atol=1e-5, rtol=1e-5)


def test_every_block_class_is_a_shard_unit(tiny_recipe):
    """The encoder's and the LLM's transformer blocks (each mixture member's too) become FSDP2 units."""
    from mllm_kit.tiny import tiny_encoder_spec

    data = tiny_recipe()
    data["model"]["encoder"] = {"name": "mixture", "members": {"clip": tiny_encoder_spec("clip"), "dino": tiny_encoder_spec("dinov2")}}
    data["model"]["connector"] = "sequence_concat"
    model = MLLM.build(recipe_from_dict(data).model)
    names = {c.__name__ for c in block_classes(model)}
    assert {type(model.llm.decoder_layers[0]).__name__, "CLIPEncoderLayer", "Dinov2Layer"} <= names, names


@pytest.mark.parametrize("override, message", [
    ({"strategy": "zero9"}, "unknown strategy 'zero9'"),
    ({"strategy": "fsdp", "precision": "16-mixed"}, "not supported with strategy fsdp"),
    ({"strategy": "ddp", "offload_optimizer": True}, "offload_optimizer: needs a DeepSpeed strategy"),
    ({"strategy": "deepspeed_stage_2", "offload_parameters": True}, "offload_parameters: needs strategy fsdp or deepspeed_stage_3"),
])
def test_bad_strategy_settings_are_named_at_recipe_load(tiny_recipe, override, message):
    data = tiny_recipe()
    data["trainer"].update(override)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(data)


@pytest.mark.slow
def test_two_nodes_of_one_process_under_torchrun(tmp_path, tiny_recipe, half_text_only, single_run):
    """``torchrun --nnodes 2`` on localhost, one process per node (Lightning's TorchElastic environment): the run trains
    like one process at equal global batch and rank 0's run directory is complete."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _recipe(tiny_recipe, half_text_only, "ddp")
    recipe["trainer"].update(devices=1, num_nodes=2)
    path, run = tmp_path / "two_nodes.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "mllm_kit.cli", "fit", "--recipe", str(path), "--run-dir", str(run), "--no-eval"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "global batch 4 = 1 × 2 ranks × 2 accumulation" in " ".join(outs[0].split())  # derived and logged
    assert json.loads((run / "state.json").read_text())["stages"]["sft"]["status"] == "done"
    for name in ("recipe.yaml", "sft/final/mllm.json", "sft/logs/metrics.csv"):
        assert (run / name).is_file(), name
    diff = _max_diff(_weights(run), _weights(single_run))
    assert diff < 1e-4, f"two nodes vs one process: {diff:.2e}"
