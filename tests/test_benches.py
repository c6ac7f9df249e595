"""`mllm-kit eval --bench`: bench files in LLaVA's formats, scored like the training-time evaluation, in lmms-eval's layout."""

import base64
import json

import pytest
from bench_files import MMB_HEADER, mmb_row, png_b64
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


def test_question_jsonl_answers_inline_or_in_a_file(tmp_path):
    (tmp_path / "a.png").write_bytes(base64.b64decode(png_b64(1)))
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


def _score(name, items, outputs):
    """A bench's scores for given generated outputs (no model)."""
    from mllm_kit.evaluation.benches import get_bench

    bench = get_bench(name)
    metric = bench.metric(items)
    bench.update(metric, items, outputs)
    return bench.compute(metric)


def test_mmbench_rotates_each_question_as_llava_all_rounds(tmp_path):
    """model_vqa_mmbench.py --all-rounds: round r shows the options shifted by r under A, B, ...; the gold letter moves
    with its option; a question counts only when every round is right."""
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "blue", "green"], "B") + mmb_row(7, ["cat", "dog"], "A", 2))
    items = read_mmbench(tsv)
    assert [i.id for i in items] == ["3", "1000003", "2000003", "7", "1000007"]
    assert [i.group for i in items] == ["3", "3", "3", "7", "7"]
    assert [i.prompt.text.split("\n", 2)[2] for i in items[:3]] == [
        "A. red\nB. blue\nC. green", "A. blue\nB. green\nC. red", "A. green\nB. red\nC. blue"]
    assert [i.answers[0] for i in items] == ["B", "A", "C", "A", "B"]          # "blue" wherever it is shown; "cat"
    assert isinstance(items[0].prompt.images[0], Image.Image) and items[0].prompt.images[0] is items[1].prompt.images[0]
    bench_items = get_bench_read("mmbench", tsv)
    assert bench_items[0].prompt.text.endswith("C. green\nAnswer with the option's letter from the given choices directly.")
    # always "B": right once for question 3, once for question 7 → no question passes; per row 2 of 5
    scores = _score("mmbench", bench_items, ["B"] * 5)
    assert scores == {"accuracy": 0.0, "vanilla_accuracy": pytest.approx(2 / 5)}
    assert _score("mmbench", bench_items, ["B", "A", "(C)", "A", "B. dog"]) == {"accuracy": 1.0, "vanilla_accuracy": 1.0}
    assert len(read_mmbench(tsv, rotate=False)) == 2
    cn = get_bench_read("mmbench_cn", tsv)                                   # LLaVA's --lang cn instruction
    assert len(cn) == 5 and cn[0].prompt.text.endswith("C. green\n请直接回答选项字母。")
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "blue", "None"], "B").replace("Look closely.", "None"))
    (item, _) = read_mmbench(tsv)                                             # pandas' NA strings are empty cells, as in LLaVA
    assert item.prompt.text == "Which colour?\nA. red\nB. blue"


def test_mmbench_files_with_circular_passes_and_files_that_cannot_be_rotated(tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    passes = [mmb_row(3, ["red", "blue"], "B"), mmb_row(1000003, ["blue", "red"], "A")]
    tsv.write_text(MMB_HEADER + "".join(passes))                               # MMBench's released layout: used as it is
    items = read_mmbench(tsv)
    assert [(i.id, i.group, i.answers[0]) for i in items] == [("3", "3", "B"), ("1000003", "3", "A")]
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "blue", "green"], "B") + mmb_row(1000003, ["blue", "green", "red"], "A"))
    with pytest.raises(DataError, match=r"question 3 has 2 circular pass\(es\) for 3 options.*one row per option"):
        read_mmbench(tsv)
    tsv.write_text(MMB_HEADER + passes[0] + mmb_row(1000003, ["blue", "red"], "B"))
    with pytest.raises(DataError, match="with different gold options"):
        read_mmbench(tsv)
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "nan", "green"], "A"))
    with pytest.raises(DataError, match=r"options \['A', 'C'\] do not run from A without a gap"):
        read_mmbench(tsv)
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "blue", "green"], "E"))
    with pytest.raises(DataError, match=r"mmbench.tsv.*answer 'E' is not one of the options"):
        read_mmbench(tsv)


def test_limit_keeps_whole_groups(tmp_path):
    from mllm_kit.evaluation.formats import take

    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text(MMB_HEADER + mmb_row(3, ["red", "blue", "green"], "B") + mmb_row(7, ["cat", "dog"], "A"))
    items = read_mmbench(tsv)
    assert [i.id for i in take(items, 1)] == ["3", "1000003", "2000003"] and take(items, 5) == items
    assert take(items, None) == items


def test_vqav2_bench_scores_what_llava_submits(tmp_path):
    """LLaVA converts every VQAv2 answer with EvalAIAnswerProcessor before submission (convert_vqav2_for_submission.py);
    vqaEval.py then compares unanimous human answers raw. "Yes" against ten "yes" is right, not 0."""
    q = tmp_path / "vqav2.jsonl"
    rows = [("Yes", ["yes"] * 10), ("Two dogs.", ["2 dogs"] * 10), ("the Red car", ["red car"] * 10),
            ("dog's", ["dog's"] * 10)]   # sic: the processor writes "dog 's", compared raw with ten "dog's": 0
    q.write_text("".join(json.dumps({"question_id": k, "text": "Q?", "answers": a}) + "\n" for k, (_, a) in enumerate(rows)))
    items = read_questions(q)
    assert _score("vqav2", items, [p for p, _ in rows]) == {"accuracy": pytest.approx(3 / 4)}
    from mllm_kit.evaluation.benches import get_bench

    assert get_bench("vqav2").record(items[0], " Yes\n") == {"submission": "yes"}
    # "Yes" was scored 0 before: the raw generation went to vqaEval.py, which compares unanimous answers raw


def test_vqav2_and_gqa_read_their_official_answer_files(tmp_path):
    q = tmp_path / "questions.jsonl"
    q.write_text('{"question_id": 5, "image": "a.jpg", "text": "Q?\\nAnswer the question using a single word or phrase."}\n')
    vqa = tmp_path / "v2_mscoco_val2014_annotations.json"
    vqa.write_text(json.dumps({"annotations": [{"question_id": 5, "answers": [{"answer": "two", "answer_id": i} for i in range(10)]}]}))
    (item,) = get_bench_read("vqav2", q, vqa)
    assert item.answers == ["two"] * 10
    assert item.prompt.text == "Q?\nAnswer the question using a single word or phrase."   # the file's suffix, not twice
    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"5": {"question": "Q?", "answer": "t-shirt", "imageId": "n1"}}))
    items = read_questions(q, answers=gqa)
    assert items[0].answers == ["t-shirt"]
    # convert_gqa_for_eval.py: rstrip('.').lower(); GQA eval.py: equality. lmms-eval's punctuation stripping is not used.
    assert _score("gqa", items * 3, ["T-shirt.", "tshirt", "t-shirt!"]) == {"accuracy": pytest.approx(1 / 3)}


def test_textvqa_reads_llavas_file_and_the_official_annotations(tmp_path):
    """llava_textvqa_val_v051_ocr.jsonl repeats question_id (it is the image id); eval_textvqa.py matches the annotations
    on (image id, lower-cased question); m4c's evaluator normalises both sides."""
    q = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    suffix = "\nAnswer the question using a single word or phrase."
    q.write_text("".join(json.dumps({"question_id": "img1", "image": "img1.jpg", "text": t + suffix}) + "\n" for t in (
        "What is the brand?\nReference OCR token: DAKOTA, DIGITAL", "What year is it?\nReference OCR token: 1999")))
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "what is the brand?", "answers": ["Dakota"] * 10},
        {"image_id": "img1", "question": "what year is it?", "answers": ["1999"] * 7 + ["99"] * 3}]}))
    items = get_bench_read("textvqa", q)                                     # the annotations beside the file
    assert [i.id for i in items] == ["img1", "img1#1"] and items[1].answers[0] == "1999"
    assert items[0].prompt.text.count("Answer the question") == 1
    assert _score("textvqa", items, ["dakota.", "Nineteen"]) == {"accuracy": 1.0 / 2}
    ann.write_text(json.dumps({"data": [{"image_id": "img1", "question": "what is the brand?", "answers": ["x"] * 10}]}))
    with pytest.raises(DataError, match=r"1 question\(s\) have no gold answer in .*TextVQA_0.5.1_val.json"):
        get_bench_read("textvqa", q)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": "img1", "answers": ["a", "b"]}\n')
    with pytest.raises(DataError, match="appears twice"):                     # a JSONL keyed by the repeated id is ambiguous
        get_bench_read("textvqa", q, answers)


def get_bench_read(name, path, answers=None, image_root=None):
    from mllm_kit.evaluation.benches import get_bench

    return get_bench(name).read(path, image_root, answers)


def test_scienceqa_img_reads_llava_cqm_a_and_problems(tmp_path):
    sqa = tmp_path / "llava_test_CQM-A.json"
    sqa.write_text(json.dumps([
        {"id": "10", "image": "10/image.png", "conversations": [
            {"from": "human", "value": "Context: A map.\nWhich state is farthest north?\nOptions: (A) Ohio (B) Maine\n<image>"},
            {"from": "gpt", "value": "B"}]},
        {"id": "11", "conversations": [{"from": "human", "value": "Which is a fruit?\nOptions: (A) apple (B) rock"},
                                       {"from": "gpt", "value": "A"}]},
        {"id": "12", "image": "12/image.png", "conversations": [{"from": "human", "value": "Pick one.\n<image>"},
                                                                 {"from": "gpt", "value": "C"}]}]))
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({"10": {"choices": ["Ohio", "Maine"], "answer": 1}, "11": {"choices": ["apple", "rock"], "answer": 0},
                                    "12": {"choices": ["a", "b", "c"], "answer": 2}}))
    items = get_bench_read("scienceqa_img", sqa)
    assert [i.id for i in items] == ["10", "12"]                              # the image subset (IMG-Accuracy)
    assert items[0].prompt.text == ("Context: A map.\nWhich state is farthest north?\nOptions: (A) Ohio (B) Maine\n"
                                    "Answer with the option's letter from the given choices directly.")
    assert items[0].prompt.turns()[-1].content.startswith("<image>\nContext")   # model_vqa_science.py: the image first
    assert _score("scienceqa_img", items, ["B", "The answer is C."]) == {"accuracy": 1.0}
    assert _score("scienceqa_img", items, ["b", "C."]) == {"accuracy": 0.0}   # eval_science_qa.py reads neither
    problems.write_text(json.dumps({"10": {"choices": ["Ohio", "Maine"], "answer": 1}}))
    with pytest.raises(DataError, match=r"has no problem '12'"):
        get_bench_read("scienceqa_img", sqa)
    with pytest.raises(DataError, match="problems.json"):
        get_bench_read("scienceqa_img", sqa, tmp_path / "nope.json")


def _mme_folder(root):
    """MME_Benchmark_release_version: a subtask with images/ + questions_answers_YN/, and one with files side by side."""
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Van Gogh? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet?  Please answer yes or no.\tNo\n")      # sic: two spaces in some files
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text("Is a c++ code shown? Please answer yes or no.\tNo\n"
                                                      "Is a python code shown? Please answer yes or no.\tYes\n")


def test_mme_reads_llava_jsonl_and_the_released_folder(tmp_path):
    _mme_folder(tmp_path / "MME_Benchmark_release_version")
    q = tmp_path / "llava_mme.jsonl"
    suffix = "\nAnswer the question using a single word or phrase."
    rows = [("artwork/10002.jpg", "Is this artwork created by Van Gogh?"), ("artwork/10002.jpg", "Is this artwork created by Monet?"),
            ("code_reasoning/0020.png", "Is a c++ code shown? Please answer yes or no."),
            ("code_reasoning/0020.png", "Is a python code shown? Please answer yes or no.")]
    q.write_text("".join(json.dumps({"question_id": i, "image": i, "text": t + suffix, "category": i.split("/")[0]}) + "\n"
                         for i, t in rows))
    items = get_bench_read("mme", q)
    assert [i.id for i in items] == ["artwork/10002.jpg", "artwork/10002.jpg#1", "code_reasoning/0020.png", "code_reasoning/0020.png#1"]
    assert [i.answers[0] for i in items] == ["Yes", "No", "No", "Yes"]
    assert [i.group for i in items] == ["artwork/10002.jpg"] * 2 + ["code_reasoning/0020.png"] * 2
    # artwork: both right → 200; code_reasoning: one right → acc 50 + acc+ 0
    scores = _score("mme", items, ["Yes", "No.", "No", "no"])
    assert scores == {"perception": 200.0, "cognition": 50.0, "artwork": 200.0, "code_reasoning": 50.0}
    q.write_text(q.read_text().splitlines(keepends=True)[0])
    with pytest.raises(DataError, match="two questions per image"):
        get_bench_read("mme", q)
    q.write_text(json.dumps({"question_id": "artwork/99.jpg", "image": "x", "text": "Who?"}) + "\n")
    with pytest.raises(DataError, match=r"no gold answer for question 'artwork/99.jpg'"):
        get_bench_read("mme", q)
    with pytest.raises(DataError, match="is not a folder"):
        get_bench_read("mme", q, tmp_path / "missing")


def test_seedbench_reads_llava_jsonl_and_seed_bench_json(tmp_path):
    q = tmp_path / "llava-seed-bench.jsonl"
    suffix = "\nAnswer with the option's letter from the given choices directly."
    q.write_text("".join(json.dumps({"question_id": k, "image": f"{k}.jpg", "text": f"How many?\nA. 1\nB. 2{suffix}"}) + "\n"
                         for k in (101, 102, 103)))
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Instances Counting": 5}, "questions": [
        {"question_id": "101", "answer": "A", "data_type": "image", "question_type_id": 5},
        {"question_id": "102", "answer": "B", "data_type": "image", "question_type_id": 5},
        {"question_id": "103", "answer": "B", "data_type": "video", "question_type_id": 5}]}))
    items = get_bench_read("seedbench", q)
    assert [i.answers[0] for i in items] == ["A", "B", "B"] and items[0].prompt.text.count("Answer with") == 1
    assert _score("seedbench", items, ["A", "B.", "B"]) == {"accuracy": pytest.approx(2 / 3), "accuracy_image": 0.5,
                                                            "accuracy_video": 1.0}
    image_only = get_bench_read("seedbench_img", q)
    assert [i.id for i in image_only] == ["101", "102"]
    with pytest.raises(DataError, match=r"no gold answer in .*other.json"):
        (tmp_path / "other.json").write_text(json.dumps({"questions": []}))
        get_bench_read("seedbench", q, tmp_path / "other.json")


def test_vizwiz_reads_the_annotations_and_scores_unanswerable(tmp_path):
    q = tmp_path / "llava_val.jsonl"
    q.write_text("".join(json.dumps({"question_id": k, "image": f"VizWiz_val_{k:08d}.jpg", "text": t}) + "\n"
                         for k, t in enumerate(["What is this?", "What colour?", "How many?"])))
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps([
        {"image": "VizWiz_val_00000000.jpg", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
         "answer_type": "unanswerable", "answerable": 0},
        {"image": "VizWiz_val_00000001.jpg", "answers": [{"answer": "Coca-Cola"}] * 10, "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_val_00000002.jpg", "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7, "answer_type": "number"}]))
    items = get_bench_read("vizwiz", q, ann)
    assert items[0].prompt.text == ("What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                                    "\nAnswer the question using a single word or phrase.")
    # "Unanswerable" → "unanswerable" (EvalAI's processor, then the VizWiz script); "coca cola" ≠ raw "Coca-Cola"
    assert _score("vizwiz", items, ["Unanswerable", "coca cola", "Two"]) == {
        "accuracy": pytest.approx((1.0 + 0.0 + 0.9) / 3), "accuracy_unanswerable": 1.0, "accuracy_other": 0.0,
        "accuracy_number": pytest.approx(0.9)}
    ann.write_text(json.dumps([{"image": "VizWiz_val_00000000.jpg", "answers": [{"answer": "x"}] * 10}]))
    with pytest.raises(DataError, match=r"2 question\(s\) have no gold answer"):
        get_bench_read("vizwiz", q, ann)


def test_pope_bench_scores_each_category(tmp_path):
    q = tmp_path / "llava_pope_test.jsonl"
    rows = [("yes", "adversarial"), ("no", "adversarial"), ("yes", "random"), ("no", "random")]
    q.write_text("".join(json.dumps({"question_id": k, "image": "a.jpg", "label": lab, "category": c,
                                     "text": "Is there a dog in the image?\nAnswer the question using a single word or phrase."})
                         + "\n" for k, (lab, c) in enumerate(rows)))
    items = get_bench_read("pope", q)
    scores = _score("pope", items, ["Yes", "No", "Yes", "Yes"])
    assert scores["f1_adversarial"] == 1.0 and scores["f1_random"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3) / 2) and scores["accuracy"] == pytest.approx((1 + 0.5) / 2)


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
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _samples(two, "synthetic") == _samples(one, "synthetic")
    assert _results(two)["results"] == _results(one)["results"]


def test_every_bench_kind_end_to_end(tiny_run, tmp_path):
    """VQAv2, GQA, DocVQA, POPE, MMBench (letter and likelihood) and COCO captions in one `eval`: each result equals its
    metric recomputed from the per-sample responses written beside it."""
    from mllm_kit.inference import Generator
    from mllm_kit.metrics import (
        ANLS,
        POPE,
        CircularChoiceAccuracy,
        COCOCaptionScores,
        GQAAccuracy,
        LikelihoodChoiceAccuracy,
        VQAv2Accuracy,
        evalai_answer,
    )

    for k in range(4):
        Image.new("RGB", (40 + 8 * k, 32), (60 * k, 90, 200 - 40 * k)).save(tmp_path / f"im{k}.png")
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("".join(json.dumps({"question_id": k, "image": f"im{k}.png", "text": f"How many things? ({k})",
                                       "answers": ["two", "2", "2", "three"] if k % 2 else ["yes"] * 3 + ["no"]}) + "\n" for k in range(4)))
    pope = tmp_path / "pope.jsonl"
    pope.write_text("".join(json.dumps({"question_id": k, "image": f"im{k}.png", "text": "Is there a dog in the image?",
                                        "label": "yes" if k < 3 else "no"}) + "\n" for k in range(4)))
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text(MMB_HEADER + "".join(mmb_row(k, ["red", "blue", "green", "pink"], "ABCD"[k], k) for k in range(2)))
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": k, "file_name": f"im{k}.png"} for k in range(3)],
                                "annotations": [{"image_id": k, "caption": c} for k in range(3) for c in ("a red box", "a box of colour")]}))
    out = tmp_path / "out"
    benches = [f"vqav2={vqa}", f"gqa={vqa}", f"docvqa={vqa}", f"pope={pope}", f"mmbench={tsv}", f"mmbench_likelihood={tsv}",
               f"coco_caption={coco}"]
    assert main(["eval", "--run", str(tiny_run), "--out", str(out), "--max-new-tokens", "4",
                 *[a for b in benches for a in ("--bench", b)]]) == 0
    results = _results(out)["results"]

    def check(bench, metric, *columns, prepare=str.strip):
        rows = _samples(out, bench)
        metric.update([prepare(r["resps"][0][0]) for r in rows], *[[c(r) for r in rows] for c in columns])
        expected = {k: float(v) for k, v in metric.compute().items() if k not in ("num_samples", "num_groups")}
        assert {k.removesuffix(",none"): v for k, v in results[bench].items() if k != "alias"} == pytest.approx(expected)
        return rows

    rows = check("vqav2", VQAv2Accuracy(), lambda r: r["target"], prepare=lambda r: evalai_answer(r.strip()))
    assert [r["submission"] for r in rows] == [evalai_answer(r["resps"][0][0].strip()) for r in rows]
    check("gqa", GQAAccuracy(), lambda r: r["target"][0])
    check("docvqa", ANLS(), lambda r: r["target"])
    check("pope", POPE(), lambda r: r["target"][0])
    rows = check("mmbench", CircularChoiceAccuracy(), lambda r: r["target"][0], lambda r: str(int(r["id"]) % 1_000_000),
                 lambda r: ["red", "blue", "green", "pink"])
    assert len(rows) == 8 and results["mmbench"]["accuracy,none"] <= results["mmbench"]["vanilla_accuracy,none"]
    assert [r["id"] for r in rows] == [str(k + r * 1_000_000) for k in range(2) for r in range(4)]
    likelihood = _samples(out, "mmbench_likelihood")
    assert len(likelihood) == 2                                                # by option text: no rotations
    metric = LikelihoodChoiceAccuracy()
    metric.update([r["resps"][0][0] for r in likelihood], ["ABCD".index(r["target"][0]) for r in likelihood])
    assert results["mmbench_likelihood"]["accuracy,none"] == pytest.approx(float(metric.compute()["accuracy"]))
    generator = Generator.from_run(tiny_run)
    items = read_mmbench(tsv, rotate=False)
    scores = generator.loglikelihood([items[0].prompt] * 4, ["red", "blue", "green", "pink"])
    assert likelihood[0]["resps"][0][0] == pytest.approx([s for s, _ in scores], abs=1e-4)
    check("coco_caption", COCOCaptionScores(), lambda r: r["target"])
    assert _results(out)["n-samples"]["coco_caption"] == {"original": 3, "effective": 3}


def test_llava_table_benches_end_to_end(tiny_run, tmp_path):
    """`mllm-kit eval --bench` on LLaVA's files for ScienceQA-IMG, MME, SEED-Bench, VizWiz and TextVQA (a tiny run):
    each result equals its metric recomputed from the per-sample responses, and --limit keeps MME's pairs whole."""
    from mllm_kit.metrics import MMEScore, ScienceQAAccuracy, SEEDAccuracy, TextVQAAccuracy, VizWizAccuracy, evalai_answer

    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 32), (200, 90, 40)).save(tmp_path / name)
    sqa = tmp_path / "sqa" / "llava_test_CQM-A.json"
    sqa.parent.mkdir()
    sqa.write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "Which?\nOptions: (A) x (B) y\n<image>"}]}]))
    (sqa.parent / "problems.json").write_text(json.dumps({"1": {"choices": ["x", "y"], "answer": 1}}))
    mme = tmp_path / "mme" / "llava_mme.jsonl"
    _mme_folder(mme.parent / "MME_Benchmark_release_version")
    mme.write_text("".join(json.dumps({"question_id": q, "image": "a.png", "text": t}) + "\n" for q, t in [
        ("artwork/10002.jpg", "Is this artwork created by Van Gogh?"), ("artwork/10002.jpg", "Is this artwork created by Monet?"),
        ("code_reasoning/0020.png", "Is a c++ code shown? Please answer yes or no."),
        ("code_reasoning/0020.png", "Is a python code shown? Please answer yes or no.")]))
    seed = tmp_path / "seed" / "llava-seed-bench.jsonl"
    seed.parent.mkdir()
    seed.write_text(json.dumps({"question_id": 7, "image": "a.png", "text": "How many?\nA. 1\nB. 2"}) + "\n")
    (seed.parent / "SEED-Bench.json").write_text(json.dumps({"questions": [{"question_id": "7", "answer": "B", "data_type": "image"}]}))
    vizwiz = tmp_path / "vizwiz.jsonl"
    vizwiz.write_text(json.dumps({"question_id": 0, "image": "b.png", "text": "What is it?"}) + "\n")
    (tmp_path / "val.json").write_text(json.dumps([{"image": "b.png", "answers": [{"answer": "unanswerable"}] * 10,
                                                    "answer_type": "unanswerable"}]))
    textvqa = tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    textvqa.parent.mkdir()
    textvqa.write_text(json.dumps({"question_id": "a", "image": "a.png", "text": "What is written?\nReference OCR token: OK"}) + "\n")
    (textvqa.parent / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"image_id": "a", "question": "what is written?", "answers": ["ok"] * 10}]}))
    out = tmp_path / "out"
    args = ["eval", "--run", str(tiny_run), "--out", str(out), "--max-new-tokens", "3", "--image-root", str(tmp_path),
            "--bench", f"scienceqa_img={sqa}", "--bench", f"mme={mme}", "--bench", f"seedbench={seed}", "--bench", f"vizwiz={vizwiz}",
            "--answers", f"vizwiz={tmp_path / 'val.json'}", "--bench", f"textvqa={textvqa}", "--limit", "1"]
    assert main(args) == 0
    results = {b: {k.removesuffix(",none"): v for k, v in r.items() if k != "alias"} for b, r in _results(out)["results"].items()}

    def recomputed(bench, metric, *columns, prepare=str.strip):
        rows = _samples(out, bench)
        metric.update([prepare(r["resps"][0][0]) for r in rows], *[[c(r) for r in rows] for c in columns])
        return rows, {k: float(v) for k, v in metric.compute().items() if k != "num_samples"}

    rows, expected = recomputed("mme", MMEScore(), lambda r: r["target"][0], lambda r: r["id"].split("/")[0],
                                lambda r: r["id"].split("#")[0])
    assert len(rows) == 2 and results["mme"] == pytest.approx(expected) and set(expected) == {"perception", "cognition", "artwork"}
    assert results["scienceqa_img"] == pytest.approx(recomputed("scienceqa_img", ScienceQAAccuracy(), lambda r: 1, lambda r: 2)[1])
    assert results["seedbench"] == pytest.approx(recomputed("seedbench", SEEDAccuracy(["image"]), lambda r: "B", lambda r: "image")[1])
    assert results["vizwiz"] == pytest.approx(recomputed("vizwiz", VizWizAccuracy(), lambda r: r["target"], lambda r: "unanswerable",
                                                         prepare=lambda r: evalai_answer(r.strip()))[1])
    assert results["textvqa"] == pytest.approx(recomputed("textvqa", TextVQAAccuracy(), lambda r: r["target"])[1])
