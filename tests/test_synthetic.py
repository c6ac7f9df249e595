from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_kit.data import synthetic
from mllm_kit.data.synthetic import (
    BACKGROUND,
    COLOR_RGB,
    COLORS,
    SHAPES,
    TASKS,
    Scene,
    Shape,
    SynthConfig,
    answers_for,
    generate,
    render,
)
from mllm_kit.errors import ConfigError

SMALL = dict(num_align=24, num_sft=60, num_eval=60)
ALL = SynthConfig(tasks=TASKS, **SMALL)
RELATION_Q = re.compile(r"^Is the (\w+) shape left of the (\w+) shape\?$")
FIXED_Q = {q: t for t, q in synthetic.QUESTIONS.items() if t != "relation"}


@pytest.fixture(scope="module")
def all_tasks(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SynthPaths:
    return generate(tmp_path_factory.mktemp("synth") / "all", ALL)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def pixels(paths: synthetic.SynthPaths, record: dict) -> np.ndarray:
    with Image.open(paths.image_root / record["image"]) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def shape_mask(rgb: np.ndarray) -> np.ndarray:
    """Shape pixels: the background is grey (r == g == b), no shape colour is."""
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of ``mask`` by flood fill."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(blob)
    return found


def task_of(question: str) -> str:
    question = question.removeprefix("<image>\n")
    return "relation" if RELATION_Q.match(question) else FIXED_Q[question]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    config = SynthConfig(tasks=TASKS, **SMALL)
    a, b = generate(tmp_path / "a", config), generate(tmp_path / "b", config)
    for name in ("align", "sft", "eval"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    for record in load(a.sft) + load(a.eval) + load(a.align):
        assert np.array_equal(pixels(a, record), pixels(b, record))

    c = generate(tmp_path / "c", SynthConfig(seed=1, tasks=TASKS, **SMALL))
    assert load(c.sft) != load(a.sft)
    assert load(c.eval) != load(a.eval)
    record = load(a.sft)[0]
    assert not np.array_equal(pixels(a, record), pixels(c, record))


def test_record_structure(all_tasks: synthetic.SynthPaths) -> None:
    sft, evals, align = load(all_tasks.sft), load(all_tasks.eval), load(all_tasks.align)
    assert (len(align), len(sft), len(evals)) == (24, 60, 60)
    for split, records in (("sft", sft), ("eval", evals), ("align", align)):
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert r["image"] == f"images/{r['id']}.png" and r["id"].startswith(split)
            assert (all_tasks.image_root / r["image"]).is_file()
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 2
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert turns[0]["value"].startswith("<image>")
    for r in sft + evals:
        questions = [t["value"] for t in r["conversations"][0::2]]
        assert len(set(questions)) == len(questions)
        for turn, (q, a) in enumerate(zip(questions, (t["value"] for t in r["conversations"][1::2]))):
            assert a in answers_for(task_of(q))
            assert (turn == 0) == q.startswith("<image>\n")
    assert all(len(r["conversations"]) == 2 and r["answer"] == r["conversations"][1]["value"] for r in evals)
    assert all(task_of(r["conversations"][0]["value"]) == r["task"] for r in evals)
    assert any(len(r["conversations"]) > 2 for r in sft), "multi_turn=0.3 should give some multi-turn samples"
    assert {task_of(r["conversations"][0]["value"]) for r in sft} == set(TASKS)
    for r in align:
        assert r["conversations"][0]["value"] == "<image>"
        caption = r["conversations"][1]["value"]
        assert caption.endswith(".") and any(c in caption for c in COLORS) and any(s in caption for s in SHAPES)


def test_eval_is_balanced_per_task(all_tasks: synthetic.SynthPaths) -> None:
    evals = load(all_tasks.eval)
    per_task = Counter(r["task"] for r in evals)
    assert set(per_task) == set(TASKS) and max(per_task.values()) - min(per_task.values()) <= 1
    for task in TASKS:
        counts = Counter(r["answer"] for r in evals if r["task"] == task)
        assert set(counts) == set(answers_for(task))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_pixels_show_what_the_answer_says(all_tasks: synthetic.SynthPaths) -> None:
    checked = Counter()
    for r in load(all_tasks.eval):
        rgb = pixels(all_tasks, r)
        parts = blobs(shape_mask(rgb))
        centres = [np.mean(b, axis=0).round().astype(int) for b in parts]  # (y, x); shapes are convex
        colors = [tuple(rgb[y, x]) for y, x in centres]
        task, answer = r["task"], r["answer"]
        if task == "color":
            assert colors == [COLOR_RGB[answer]]
        elif task == "count":
            assert len(parts) == answers_for("count").index(answer) + 1
            assert len(set(colors)) == 1
        elif task == "position":
            (_y, x), size = centres[0], rgb.shape[1]
            assert len(parts) == 1 and (x < size / 3 if answer == "left" else x > 2 * size / 3)
        elif task == "relation":
            c1, c2 = RELATION_Q.match(r["conversations"][0]["value"].removeprefix("<image>\n")).groups()
            xs = {color: int(centre[1]) for color, centre in zip(colors, centres)}
            assert len(parts) == 2 and set(xs) == {COLOR_RGB[c1], COLOR_RGB[c2]}
            assert (xs[COLOR_RGB[c1]] < xs[COLOR_RGB[c2]]) == (answer == "yes")
        else:
            assert len(parts) == 1
        checked[task] += 1
    assert set(checked) == set(TASKS)


def test_blank_images_keep_text_and_draw_no_shape(tmp_path: Path, all_tasks: synthetic.SynthPaths) -> None:
    blank = generate(tmp_path / "blank", SynthConfig(tasks=TASKS, blank_images=True, **SMALL))
    for name in ("align", "sft", "eval"):
        assert getattr(blank, name).read_bytes() == getattr(all_tasks, name).read_bytes()
    for r in load(blank.eval) + load(blank.sft):
        rgb = pixels(blank, r)
        assert not shape_mask(rgb).any()
        assert np.abs(rgb - BACKGROUND).max() <= ALL.noise


def test_render_background_noise_and_solid_fill() -> None:
    rng = np.random.default_rng(0)
    scene = Scene((Shape("square", "blue", 20, 30, 6),))
    rgb = np.asarray(render(scene, 48, 5, rng)).astype(int)
    assert rgb.shape == (48, 48, 3)
    assert (rgb[24:37, 14:27] == COLOR_RGB["blue"]).all()
    background = rgb[~shape_mask(rgb)]
    assert np.abs(background - BACKGROUND).max() == 5 and len(np.unique(background)) > 5


def test_isoluminant_palette_is_one_grey_in_grayscale_and_distinct_in_colour() -> None:
    """The mixture benchmark's colour-blind member must not read colour from luminance (docs/encoders/mixtures.md)."""
    rng = np.random.default_rng(0)
    for palette, distinct_greys in (("standard", len(COLORS)), ("isoluminant", 1)):
        images = [render(Scene((Shape("square", c, 12, 12, 6),)), 24, 0, rng, palette) for c in COLORS]
        rgb = {tuple(np.asarray(im)[12, 12]) for im in images}
        grey = {int(np.asarray(im.convert("L"))[12, 12]) for im in images}
        assert len(rgb) == len(COLORS) and len(grey) == distinct_greys, palette
    with pytest.raises(ConfigError, match="palette must be one of"):
        SynthConfig(palette="pastel")


def test_second_call_is_cached_and_new_config_replaces(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    config = SynthConfig(num_align=4, num_sft=6, num_eval=5)
    paths = generate(out, config)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert generate(out, config) == paths
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    generate(out, SynthConfig(num_align=4, num_sft=9, num_eval=5))
    assert len(load(paths.sft)) == 9
    assert json.loads((out / "manifest.json").read_text())["config"]["num_sft"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "temporary siblings left behind"


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._build_split

    def crash_on_eval(split, *args):
        if split == "eval":
            raise KeyboardInterrupt
        return real(split, *args)

    monkeypatch.setattr(synthetic, "_build_split", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "ds", SynthConfig(num_align=3, num_sft=3, num_eval=3))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a dataset"):
        generate(out, SynthConfig(num_align=2, num_sft=2, num_eval=2))
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("colour",)}, r"tasks.*'colour'.*Did you mean 'color'\?"),
        ({"tasks": ()}, "tasks is empty"),
        ({"radius": (8, 40)}, "radius max 40 is too large for image_size 64"),
        ({"tasks": ("count",), "radius": (15, 16)}, "radius min 15 is too large for task 'count'"),
        ({"num_sft": 0}, "num_sft must be a positive"),
        ({"num_eval": -3}, "num_eval must be a positive"),
        ({"noise": 30}, "noise"),
        ({"multi_turn": 1.5}, "multi_turn"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_answers_for() -> None:
    assert answers_for("color") == COLORS and answers_for("shape") == SHAPES
    assert answers_for("count") == ("one", "two", "three")
    with pytest.raises(ConfigError, match="Did you mean 'shape'"):
        answers_for("shapes")


def test_config_accepts_lists_and_default_is_valid() -> None:
    config = SynthConfig(tasks=["count", "relation"], radius=[6, 10])
    assert config.tasks == ("count", "relation") and config.radius == (6, 10)
    assert hash(config) == hash(SynthConfig(tasks=("count", "relation"), radius=(6, 10)))
