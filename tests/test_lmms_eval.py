"""The lmms-eval backend (``mllm_kit.interop.lmms_eval``).

Without lmms-eval: the generation_kwargs mapping, visuals and batch-size parsing, and the ImportError naming the extra.
With the ``eval`` extra: a tiny run directory (a saved tiny model, no training) answers a two-question local JSONL
task (``dataset_path: json``) and a multiple-choice task on the same file, through ``simple_evaluate`` and through the
``lmms-eval`` CLI (registered by an ``lmms_eval.models`` entry point); the answers and scores equal
:class:`~mllm_kit.inference.Generator`'s on the same prompts.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mllm_kit.errors import ConfigError, DataError
from mllm_kit.inference import GenerationConfig, Prompt
from mllm_kit.interop import lmms_eval as backend
from mllm_kit.interop.lmms_eval import generation_config, ignored_gen_kwargs, parse_batch_size, visuals_to_images

SKIP_REASON = "lmms-eval is not installed (pip install 'mllm-kit[eval]')"
QA_GEN_KWARGS = {"until": ["\n"], "max_new_tokens": 6, "do_sample": False, "temperature": 0.0}
QUESTIONS = ["What colour is the shape?", "How many shapes are there?"]
CHOICES = ["red", "two"]


# -- no lmms-eval needed ----------------------------------------------------------------------------------------
def test_generation_config_maps_lmms_eval_gen_kwargs():
    greedy = generation_config({"until": ["\n\n", "", "\n\n", "Q:"], "max_new_tokens": 16, "temperature": 0, "do_sample": False,
                                "top_p": 1.0, "num_beams": 1})
    assert greedy == GenerationConfig(max_new_tokens=16, stop=("\n\n", "Q:"))
    assert generation_config(None, max_new_tokens=32) == GenerationConfig(max_new_tokens=32)
    assert generation_config({"until": "ASSISTANT:"}).stop == ("ASSISTANT:",)
    # sampling: explicit, or by temperature alone (as lmms-eval's own backends decide)
    sampled = generation_config({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "max_new_tokens": 8})
    assert sampled == GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=3)
    assert generation_config({"temperature": 0.2}).do_sample and generation_config({"temperature": 0.2}).temperature == 0.2
    # greedy wins: do_sample false, temperature 0 or top_p 0 (lmms-eval tasks write all of these); strings from the CLI
    for kw in ({"do_sample": False, "temperature": 0.2}, {"do_sample": True, "temperature": 0}, {"do_sample": True, "top_p": 0},
               {"do_sample": "false", "temperature": "0.5"}, {"top_p": None, "temperature": None}):
        config = generation_config(kw)
        assert not config.do_sample and (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0), kw
    assert generation_config({"num_beams": "3", "max_new_tokens": "5"}) == GenerationConfig(max_new_tokens=5, num_beams=3)
    assert ignored_gen_kwargs({"until": [], "image_aspect_ratio": "pad", "repetition_penalty": 1.2}) == ["image_aspect_ratio",
                                                                                                       "repetition_penalty"]
    for bad in ({"until": 3}, {"max_new_tokens": "many"}, {"do_sample": "maybe"}, {"do_sample": True, "temperature": 1.0, "top_p": 2}):
        with pytest.raises(ConfigError):
            generation_config(bad)


def test_visuals_and_batch_size():
    image = Image.new("RGB", (4, 4))
    assert visuals_to_images(None) == []
    assert visuals_to_images([image, ["a.png", None]]) == [image, "a.png"]
    assert visuals_to_images(Path("b.jpg")) == [Path("b.jpg")]
    for bad in (["clip.mp4"], [{"array": [0.0], "sampling_rate": 16000}], [3]):
        with pytest.raises(DataError):
            visuals_to_images(bad)
    assert [parse_batch_size(v) for v in (None, 4, "16", "auto", "auto:4")] == [8, 4, 16, 8, 8]
    for bad in (0, "x"):
        with pytest.raises(ConfigError):
            parse_batch_size(bad)


def test_without_lmms_eval_the_backend_imports_and_names_the_extra(monkeypatch):
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    spec = importlib.util.spec_from_file_location("_lmms_eval_backend_without_extra", backend.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generation_config({"max_new_tokens": 3}).max_new_tokens == 3
    with pytest.raises(ImportError, match=r"pip install 'mllm-kit\[eval\]'"):
        module.MLLMKit(run="runs/x")


# -- with the eval extra ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lmms():
    return pytest.importorskip("lmms_eval", reason=SKIP_REASON)


@pytest.fixture(scope="module")
def world(lmms, tmp_path_factory):
    """A run directory holding a saved tiny model as its finished ``sft`` stage, two images, the answers
    :class:`Generator` gives, and a task folder: a JSONL file and two task YAMLs (generation and multiple choice)."""
    from mllm_kit import MLLM
    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.inference import Generator
    from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
    from mllm_kit.training.state import RunState, write_recipe

    root = tmp_path_factory.mktemp("lmms_eval")
    run = root / "run"
    recipe = recipe_from_dict({
        "name": "tiny", "model": {"encoder": tiny_encoder_spec("clip"), "connector": "mlp2x_gelu", "llm": tiny_llm_spec("llama")},
        "data": {"template": "chatml", "max_length": 512}, "stages": [{"name": "sft", "trainable": ["connector", "llm"]}]})
    run.mkdir()
    write_recipe(run, recipe)
    torch.manual_seed(0)
    model = MLLM.build(recipe.model)
    with torch.no_grad():  # a random init answers with near-uniform logits; sharpen them so answers differ
        model.llm.model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(run / "sft" / "final")
    RunState.load(run).mark("sft", status="done", final="sft/final")

    tasks = root / "tasks"
    tasks.mkdir()
    images = []
    for k in range(len(QUESTIONS)):
        g = torch.Generator().manual_seed(k)
        images.append(tasks / f"image{k}.png")
        Image.fromarray((torch.rand(48, 40 + 8 * k, 3, generator=g) * 255).byte().numpy()).save(images[-1])
    generator = Generator.from_run(run, "sft")
    prompts = [Prompt(q, images=[im]) for q, im in zip(QUESTIONS, images)]
    answers = generator.generate(prompts, generation_config(QA_GEN_KWARGS), batch_size=8)
    pairs = [(p, c) for p in prompts for c in CHOICES]
    lls = generator.loglikelihood([p for p, _ in pairs], [c for _, c in pairs], batch_size=8)
    # doc 0's reference is the model's own answer and doc 1's is not: exact_match must come out 0.5
    references = [answers[0].strip(), "no such answer"]
    assert references[1] != answers[1].strip()
    rows = [{"id": f"q{k}", "question": q, "image": str(images[k]), "answer": references[k], "choices": CHOICES, "label": k}
            for k, q in enumerate(QUESTIONS)]
    (tasks / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "utils.py").write_text("from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
                                    "    return [Image.open(doc['image']).convert('RGB')]\n")
    head = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(tasks / 'questions.jsonl'))}\n"
            "test_split: test\ndoc_to_visual: !function utils.doc_to_visual\ndoc_to_text: \"{{question}}\"\n")
    (tasks / "qa.yaml").write_text(
        "task: mllmkit_local_qa\n" + head + "output_type: generate_until\ndoc_to_target: answer\n"
        f"generation_kwargs: {json.dumps(QA_GEN_KWARGS)}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 0.0\n")
    (tasks / "mc.yaml").write_text(
        "task: mllmkit_local_mc\n" + head + "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 0.0\n")
    accuracy = sum(max(range(2), key=lambda c: lls[2 * k + c][0]) == k for k in range(2)) / 2
    return SimpleNamespace(root=root, run=run, tasks=tasks, images=images, generator=generator, answers=answers,
                           lls=lls, accuracy=accuracy)


def test_simple_evaluate_gives_the_generator_answers(world, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(world.root / "datasets"))
    lm = backend.MLLMKit.create_from_arg_string(f"run={world.run},stage=sft,batch_size=8", {"batch_size": 1, "device": None})
    assert lm.batch_size == 8  # model_args win over --batch_size's default
    results = simple_evaluate(model=lm, tasks=["mllmkit_local_qa", "mllmkit_local_mc"], log_samples=True, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(world.tasks), include_defaults=False))
    assert results["results"]["mllmkit_local_qa"]["exact_match,none"] == 0.5
    assert results["results"]["mllmkit_local_mc"]["acc,none"] == world.accuracy
    qa = sorted(results["samples"]["mllmkit_local_qa"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in qa] == world.answers
    mc = sorted(results["samples"]["mllmkit_local_mc"], key=lambda s: s["doc_id"])
    got = [tuple(choice[0]) for s in mc for choice in s["resps"]]
    assert [g for _, g in got] == [g for _, g in world.lls]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in world.lls], abs=1e-4)


def test_multi_round_follows_the_task_protocol(world):
    lm = backend.MLLMKit(run=str(world.run), stage="sft")
    doc = {"q": QUESTIONS[0]}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [], f"And then? (round {round_idx})", False, previous_output, {"round": round_idx}

    request = SimpleNamespace(args=(doc["q"], dict(QA_GEN_KWARGS), lambda d: [world.images[0]], doc_to_text, 0, "t", "test"),
                              doc=doc)
    (rounds,) = lm.generate_until_multi_round([request])
    config = generation_config(QA_GEN_KWARGS)
    expected = [world.answers[0], world.generator.generate([Prompt("And then? (round 1)")], config)[0]]
    assert rounds == expected
    assert seen == [([expected[0]], 1, None), (expected, 2, {"round": 1})]


def test_rank_world_size_and_device_come_from_the_launcher(world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = backend.MLLMKit(run=str(world.run), stage="sft")
    assert (lm.rank, lm.world_size, lm.device.type) == (1, 2, "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        backend.MLLMKit(run=str(world.run), pretrained="x")


def test_legacy_plugin_variable_registers_the_model(lmms, monkeypatch):
    from lmms_eval.models import _merge_legacy_plugin_models
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "mllm_kit.interop.lmms_eval_plugin")
    registry = ModelRegistryV2()
    with pytest.warns(DeprecationWarning):
        _merge_legacy_plugin_models(registry)
    assert registry.get_model_class("mllm_kit") is backend.MLLMKit
    assert importlib.util.find_spec("mllm_kit.interop.lmms_eval_plugin.tasks") is not None  # the CLI looks it up


@pytest.mark.slow
def test_cli_through_the_entry_point_writes_results(world):
    """``lmms-eval --model mllm_kit`` in a fresh process, registered by an ``lmms_eval.models`` entry point (a
    dist-info on PYTHONPATH declaring what pyproject's entry point declares)."""
    dist = world.root / "entry_point" / "mllm_kit_lmms_eval_entry-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mllm-kit-lmms-eval-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nmllm_kit = mllm_kit.interop.lmms_eval:manifest\n")
    out = world.root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(dist.parent), os.environ.get("PYTHONPATH")])),
           "LMMS_EVAL_DATASETS_CACHE": str(world.root / "datasets_cli"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LMMS_EVAL_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mllm_kit", "--model_args", f"run={world.run},stage=sft,batch_size=4",
         "--tasks", "mllmkit_local_qa,mllmkit_local_mc", "--include_path", str(world.tasks), "--output_path", str(out),
         "--log_samples", "--verbosity", "WARNING"], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())
    assert results["results"]["mllmkit_local_qa"]["exact_match,none"] == 0.5
    assert results["results"]["mllmkit_local_mc"]["acc,none"] == world.accuracy
    assert results["config"]["model_backend"].startswith("mllm_kit.interop.lmms_eval.MLLMKit")
    (samples_file,) = glob.glob(str(out / "**" / "*_samples_mllmkit_local_qa.jsonl"), recursive=True)
    samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["resps"] for s in samples] == world.answers
