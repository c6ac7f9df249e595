"""`mllm-kit eval --bench`: bench files in LLaVA's formats, scored like the training-time evaluation, in lmms-eval's layout."""

import base64
import io
import json

import pytest
from PIL import Image

from mllm_kit.cli.main import main
from mllm_kit.errors import DataError
from mllm_kit.evaluation.formats import read_coco_captions, read_mmbench, read_questions


def _results(out):
    (results,) = out.glob("*_results.json")
    return json.loads(results.read_text())


def _samples(out, bench):
    (samples,) = out.glob(f"*_samples_{bench}.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_synthetic_bench_equals_the_training_time_evaluation(tiny_run, tmp_path):
    """The same prompts, the same greedy answers and the same accuracy as `mllm-kit eval` (the validation step)."""
    from torch.utils.data import DataLoader

    from mllm_kit import MLLM
    from mllm_kit.training.data import MLLMDataModule
    from mllm_kit.training.evaluate import GenerationAccuracy, PromptCollator, generate_answers
    from mllm_kit.training.state import finished_stage, read_run

    out = tmp_path / "out"
    assert main(["eval", "--run", str(tiny_run), "--bench", "synthetic=synthetic:eval", "--out", str(out), "--batch-size", "5"]) == 0
    rows = _samples(out, "synthetic")
    recipe, state = read_run(tiny_run)
    stage = finished_stage(recipe, state)
    model = MLLM.from_pretrained(state.final_dir(stage.name)).eval()
    data = MLLMDataModule(model, stage.data, tiny_run / "data", 1, 1, 0, recipe.eval, train=False)
    pad = model.tokenizer.pad_token_id
    metric = GenerationAccuracy(sorted(set(data.tasks.values())))
    expected = []
    for prompts in DataLoader(data.eval_prompts, batch_size=6, collate_fn=PromptCollator(pad, data.tasks)):
        answers = generate_answers(model, prompts.batch, recipe.eval.max_new_tokens, data.eval_prompts.encoder.stop_token_ids())
        metric.update(answers, prompts.targets, prompts.tasks)
        expected += answers
    assert [r["resps"][0][0] for r in rows] == expected
    assert len(rows) == 12 and len(set(expected)) > 1
    result = _results(out)["results"]["synthetic"]
    assert result["accuracy,none"] == pytest.approx(float(metric.compute()["accuracy"]))


def _png_b64(seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20 + seed, 24), (10 * seed, 80, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_question_jsonl_answers_inline_or_in_a_file(tmp_path):
    (tmp_path / "a.png").write_bytes(base64.b64decode(_png_b64(1)))
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 7, "image": "a.png", "text": "What?", "answers": [{"answer": "two"}, {"answer": "2"}]}\n'
                 '{"question_id": "x", "image": ["a.png", "a.png"], "text": "Both?"}\n')
    a = tmp_path / "a.jsonl"
    a.write_text('{"question_id": "x", "answer": "yes"}\n')
    items = read_questions(q, answers=a)
    assert [i.id for i in items] == ["7", "x"]
    assert items[0].answers == ["two", "2"] and items[1].answers == ["yes"]
    assert len(items[1].prompt.images) == 2 and items[1].prompt.turns()[-1].content.startswith("<image>\n<image>\nBoth?")
    with pytest.raises(DataError, match=r"q.jsonl.*no gold answer"):
        read_questions(q)
    q.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b", "answer": "c"}\n')
    with pytest.raises(DataError, match="appears twice"):
        read_questions(q, require_answers=False)


def test_mmbench_tsv_options_and_circular_groups(tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    rows = [f"3\tWhich colour?\tLook closely.\tred\tblue\tgreen\tnan\tB\tcolour\t{_png_b64(1)}\n",
            f"1000003\tWhich colour?\tLook closely.\tblue\tgreen\tred\tnan\tA\tcolour\t{_png_b64(1)}\n"]
    tsv.write_text(header + "".join(rows))
    items = read_mmbench(tsv)
    assert [i.group for i in items] == ["3", "3"] and items[0].options == {"A": "red", "B": "blue", "C": "green"}
    assert items[0].prompt.text == "Look closely.\nWhich colour?\nA. red\nB. blue\nC. green"
    assert isinstance(items[0].prompt.images[0], Image.Image)
    tsv.write_text(header + rows[0].replace("\tB\tcolour", "\tE\tcolour"))
    with pytest.raises(DataError, match=r"mmbench.tsv.*answer 'E' is not one of the options"):
        read_mmbench(tsv)


def test_coco_captions(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}]}))
    (item,) = read_coco_captions(path, prompt="Caption it.")
    assert item.answers == ["a dog", "a cat"] and item.prompt.text == "Caption it."
    path.write_text(json.dumps({"images": [{"id": 2, "file_name": "b.png"}], "annotations": []}))
    with pytest.raises(DataError, match="has no caption"):
        read_coco_captions(path)


def test_bench_errors_are_clear(tiny_run, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "hi"}\n')
    assert main(["eval", "--run", str(tiny_run), "--bench", f"vqav2={q}"]) == 2
    assert "no gold answer" in capsys.readouterr().err
    assert main(["eval", "--run", str(tiny_run), "--bench", f"nosuchbench={q}"]) == 2
    assert "unknown bench 'nosuchbench'" in capsys.readouterr().err
    assert main(["eval", "--run", str(tiny_run), "--bench", str(q)]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    q.write_text('{"question_id": 1, "text": "hi", "image": "missing.png", "answer": "x"}\n')
    assert main(["eval", "--run", str(tiny_run), "--bench", f"vqav2={q}", "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_benches_during_training_log_and_keep_the_best_step(tiny_recipe, tmp_path):
    """eval.benches every step: bench/* metrics are logged per step, and best/ holds the weights of the best one."""
    import csv

    from mllm_kit import MLLM
    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.evaluation.benches import get_bench
    from mllm_kit.evaluation.runner import run_bench
    from mllm_kit.inference import GenerationConfig, Generator
    from mllm_kit.training.runner import fit
    from mllm_kit.training.state import RunState

    data = tiny_recipe(max_steps=4, lr=3e-3)
    data["eval"].update(benches={"synthetic": "synthetic:eval"}, every_n_steps=1, keep_best="synthetic/accuracy",
                        keep_best_mode="min", bench_limit=6)  # min: some step after the first is (almost surely) not the best
    data["stages"] = data["stages"][1:]
    run = tmp_path / "run"
    fit(recipe_from_dict(data), run)
    with open(run / "sft" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("bench/synthetic/accuracy")]
    logged = {int(r["step"]): float(r["bench/synthetic/accuracy"]) for r in rows}
    assert sorted(logged) == [1, 2, 3, 4]
    best = RunState.load(run).stages["sft"]["best"]
    assert best["value"] == min(logged.values()) and logged[best["step"]] == best["value"]
    assert min(s for s, v in logged.items() if v == best["value"]) == best["step"]  # the first step that reached it
    recipe = recipe_from_dict(data)
    bench = get_bench("synthetic")
    from mllm_kit.training.data import resolve_path

    path, root = resolve_path(recipe.stages[0].data, "synthetic:eval", None, run / "data")
    items = bench.read(path, root)[:6]
    rescored = run_bench(Generator(MLLM.from_pretrained(run / "sft" / "best"), recipe.stages[0].data), "synthetic", bench, items,
                         GenerationConfig(max_new_tokens=bench.max_new_tokens), batch_size=32, show_progress=False)
    assert rescored.metrics["accuracy"] == pytest.approx(best["value"])


def test_bench_recipe_keys_are_checked_at_load(tiny_recipe):
    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.errors import ConfigError

    def load(**eval_keys):
        data = tiny_recipe()
        data["eval"].update(eval_keys)
        return recipe_from_dict(data)

    with pytest.raises(ConfigError, match="eval.benches.vqa2: unknown bench. Did you mean 'vqav2'"):
        load(benches={"vqa2": "x.jsonl"})
    with pytest.raises(ConfigError, match="eval.keep_best: 'accuracy' must be '<bench>/<metric>'"):
        load(benches={"synthetic": "synthetic:eval"}, keep_best="accuracy")
    with pytest.raises(ConfigError, match="eval.stages: no stage 'sf'"):
        load(benches={"synthetic": "synthetic:eval"}, stages=["sf"])
    with pytest.raises(ConfigError, match="apply to eval.benches"):
        load(every_n_steps=10)


@pytest.mark.slow
def test_bench_over_two_ranks_equals_one_process(tiny_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m mllm_kit.cli eval --bench ...`: each rank answers half; rank 0 writes every sample
    once, in order, and the metric equals one process's."""
    import os
    import socket
    import subprocess
    import sys

    one = tmp_path / "one"
    assert main(["eval", "--run", str(tiny_run), "--bench", "synthetic=synthetic:eval", "--out", str(one)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(port), "-m", "mllm_kit.cli", "eval", "--run-dir", str(tiny_run),
                           "--bench", "synthetic=synthetic:eval", "--out", str(two)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _samples(two, "synthetic") == _samples(one, "synthetic")
    assert _results(two)["results"] == _results(one)["results"]


def test_every_bench_kind_end_to_end(tiny_run, tmp_path):
    """VQAv2, GQA, DocVQA, POPE, MMBench (letter and likelihood) and COCO captions in one `eval`: each result equals its
    metric recomputed from the per-sample responses written beside it."""
    from mllm_kit.inference import Generator
    from mllm_kit.metrics import ANLS, POPE, CircularChoiceAccuracy, ExactMatch, LikelihoodChoiceAccuracy, VQAv2Accuracy

    for k in range(4):
        Image.new("RGB", (40 + 8 * k, 32), (60 * k, 90, 200 - 40 * k)).save(tmp_path / f"im{k}.png")
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("".join(json.dumps({"question_id": k, "image": f"im{k}.png", "text": f"How many things? ({k})",
                                       "answers": ["two", "2", "2", "three"] if k % 2 else ["yes"] * 3 + ["no"]}) + "\n" for k in range(4)))
    pope = tmp_path / "pope.jsonl"
    pope.write_text("".join(json.dumps({"question_id": k, "image": f"im{k}.png", "text": "Is there a dog in the image?",
                                        "label": "yes" if k < 3 else "no"}) + "\n" for k in range(4)))
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n" + "".join(
        f"{k % 2 + 1_000_000 * (k // 2)}\tWhich colour?\tnan\tred\tblue\tgreen\tpink\t{'ABCD'[k]}\tc\t{_png_b64(k)}\n" for k in range(4)))
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": k, "file_name": f"im{k}.png"} for k in range(3)],
                                "annotations": [{"image_id": k, "caption": c} for k in range(3) for c in ("a red box", "a box of colour")]}))
    out = tmp_path / "out"
    benches = [f"vqav2={vqa}", f"gqa={vqa}", f"docvqa={vqa}", f"pope={pope}", f"mmbench={tsv}", f"mmbench_likelihood={tsv}",
               f"coco_caption={coco}"]
    assert main(["eval", "--run", str(tiny_run), "--out", str(out), "--max-new-tokens", "4",
                 *[a for b in benches for a in ("--bench", b)]]) == 0
    results = _results(out)["results"]

    def check(bench, metric, *columns):
        rows = _samples(out, bench)
        metric.update([r["resps"][0][0] for r in rows], *[[c(r) for r in rows] for c in columns])
        expected = {k: float(v) for k, v in metric.compute().items() if k not in ("num_samples", "num_groups")}
        assert {k.removesuffix(",none"): v for k, v in results[bench].items() if k != "alias"} == pytest.approx(expected)
        return rows

    check("vqav2", VQAv2Accuracy(), lambda r: r["target"])
    check("gqa", ExactMatch(), lambda r: r["target"][0])
    check("docvqa", ANLS(), lambda r: r["target"])
    check("pope", POPE(), lambda r: r["target"][0])
    rows = check("mmbench", CircularChoiceAccuracy(), lambda r: r["target"][0], lambda r: str(int(r["id"]) % 1_000_000),
                 lambda r: ["red", "blue", "green", "pink"])
    assert len(rows) == 4 and results["mmbench"]["accuracy,none"] <= results["mmbench"]["vanilla_accuracy,none"]
    likelihood = _samples(out, "mmbench_likelihood")
    metric = LikelihoodChoiceAccuracy()
    metric.update([r["resps"][0][0] for r in likelihood], ["ABCD".index(r["target"][0]) for r in likelihood])
    assert results["mmbench_likelihood"]["accuracy,none"] == pytest.approx(float(metric.compute()["accuracy"]))
    generator = Generator.from_run(tiny_run)
    items = read_mmbench(tsv)
    scores = generator.loglikelihood([items[0].prompt] * 4, ["red", "blue", "green", "pink"])
    assert likelihood[0]["resps"][0][0] == pytest.approx([s for s, _ in scores], abs=1e-4)
    assert set(results["coco_caption"]) >= {"bleu4,none", "rouge_l,none", "cider,none"}
    assert _results(out)["n-samples"]["coco_caption"] == {"original": 3, "effective": 3}
