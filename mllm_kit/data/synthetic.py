"""Deterministic synthetic dataset of coloured shapes, written as LLaVA-format JSON.

The test bed for "a model that sees beats one that does not": every answer is a single word that is
only recoverable from the pixels (``blank_images`` renders the same questions over empty backgrounds
for the blind control). Only numpy and PIL are used so generation stays fast and torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mllm_kit.errors import ConfigError, did_you_mean

FORMAT_VERSION = 1
GENERATOR = "mllm_kit.data.synthetic"

TASKS = ("color", "shape", "count", "position", "relation")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
BACKGROUND = 235
MAX_NOISE = 255 - BACKGROUND

_COUNT_WORDS = ("one", "two", "three")
_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": _COUNT_WORDS,
    "position": ("left", "right"),
    "relation": ("yes", "no"),
}
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Is the shape on the left or the right?",
    "relation": "Is the {c1} shape left of the {c2} shape?",
}
IMAGE_TOKEN = "<image>"
# Palette: the shape colours, then every background grey BACKGROUND + k for |k| <= MAX_NOISE.
_COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}
_PALETTE = [v for name in COLORS for v in COLOR_RGB[name]] + [
    v for g in range(BACKGROUND - MAX_NOISE, BACKGROUND + MAX_NOISE + 1) for v in (g, g, g)
]
# Seed streams per split: eval uses its own stream so it never replays training scenes.
_SPLIT_STREAM = {"align": 0, "sft": 1, "eval": 2}


def answers_for(task: str) -> tuple[str, ...]:
    """The closed answer set of ``task``."""
    if task not in _ANSWERS:
        raise ConfigError(f"unknown synthetic task {task!r}; choose from {list(TASKS)}.{did_you_mean(task, TASKS)}")
    return _ANSWERS[task]


@dataclass(frozen=True)
class Shape:
    """One solid shape; ``(x, y)`` is the centre and ``r`` the half-size of its bounding box, in pixels."""

    kind: str
    color: str
    x: int
    y: int
    r: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    shapes: tuple[Shape, ...] = ()


@dataclass(frozen=True)
class SynthConfig:
    """Sizes, tasks and rendering options of a synthetic dataset (the whole config is the cache key)."""

    seed: int = 0
    image_size: int = 64
    num_align: int = 2000
    num_sft: int = 12000
    num_eval: int = 600
    tasks: tuple[str, ...] = ("color", "shape")
    radius: tuple[int, int] = (8, 16)
    noise: int = 8
    multi_turn: float = 0.3
    blank_images: bool = False

    def __post_init__(self) -> None:
        # Recipes deliver lists from YAML/JSON; tuples keep the config hashable and comparable.
        if isinstance(self.tasks, str):
            raise ConfigError(f"synthetic tasks must be a list of task names, not the string {self.tasks!r}.")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "radius", tuple(self.radius))
        self._validate()

    def _validate(self) -> None:
        for name in ("seed", "image_size", "num_align", "num_sft", "num_eval", "noise"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"synthetic {name} must be an integer, got {value!r}.")
        if self.seed < 0:
            raise ConfigError(f"synthetic seed must be >= 0, got {self.seed}.")
        for name in ("num_align", "num_sft", "num_eval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"synthetic {name} must be a positive number of samples, got {getattr(self, name)}.")
        if self.image_size < 16:
            raise ConfigError(f"synthetic image_size must be at least 16 pixels, got {self.image_size}.")
        if not self.tasks:
            raise ConfigError(f"synthetic tasks is empty; choose one or more of {list(TASKS)}.")
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(
                    f"synthetic tasks: unknown task {task!r}; choose from {list(TASKS)}.{did_you_mean(task, TASKS)}"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"synthetic tasks lists a task twice: {list(self.tasks)}.")
        if len(self.radius) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.radius):
            raise ConfigError(f"synthetic radius must be two integers (min, max), got {self.radius!r}.")
        lo, hi = self.radius
        if not 1 <= lo <= hi:
            raise ConfigError(f"synthetic radius must satisfy 1 <= min <= max, got {self.radius!r}.")
        if 2 * hi + 1 > self.image_size:
            raise ConfigError(
                f"synthetic radius max {hi} is too large for image_size {self.image_size}: a shape is {2 * hi + 1} px "
                f"wide; use radius max <= {(self.image_size - 1) // 2} or a larger image_size."
            )
        for task in self.tasks:
            cap = _radius_cap(task, self.image_size)
            if lo > cap:
                raise ConfigError(
                    f"synthetic radius min {lo} is too large for task {task!r} at image_size {self.image_size}; "
                    f"use radius min <= {cap} or a larger image_size."
                )
        if not 0 <= self.noise <= MAX_NOISE:
            raise ConfigError(f"synthetic noise must be in [0, {MAX_NOISE}], got {self.noise}.")
        if not isinstance(self.multi_turn, int | float) or not 0.0 <= self.multi_turn <= 1.0:
            raise ConfigError(f"synthetic multi_turn must be a fraction in [0, 1], got {self.multi_turn!r}.")
        if not isinstance(self.blank_images, bool):
            raise ConfigError(f"synthetic blank_images must be true or false, got {self.blank_images!r}.")


@dataclass(frozen=True)
class SynthPaths:
    """Where :func:`generate` put a dataset; JSON image paths are relative to ``image_root``."""

    root: Path
    image_root: Path
    align: Path
    sft: Path
    eval: Path


# --- geometry -----------------------------------------------------------------------------------


def _third(size: int) -> int:
    """Largest centre x that still counts as 'in the left third' (mirrored for the right)."""
    return size // 3 - 1


def _radius_cap(task: str, size: int) -> int:
    """Largest radius at which ``task``'s scene layout fits in a ``size``-px image."""
    if task == "count":
        # One shape per quadrant with a 1 px margin, so shapes never touch.
        return (size // 2 - 3) // 2
    if task == "position":
        return _third(size)
    if task == "relation":
        # Two shapes side by side with a 2 px gap.
        return (size - 4) // 4
    return (size - 1) // 2


def _side(shape: Shape, size: int) -> str | None:
    third = _third(size)
    if shape.x <= third:
        return "left"
    if shape.x >= size - 1 - third:
        return "right"
    return None


def _int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` inclusive."""
    return int(rng.integers(lo, hi + 1))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --- scenes and questions -------------------------------------------------------------------------

_QA = tuple[str, str, str]  # (task, question, answer)


def _scene_for(task: str, answer: str, rng: np.random.Generator, config: SynthConfig) -> tuple[Scene, _QA]:
    """A random scene whose answer to ``task`` is ``answer``, and the question asked about it."""
    size = config.image_size
    lo, hi = config.radius
    r = _int(rng, lo, min(hi, _radius_cap(task, size)))
    question = QUESTIONS[task]
    if task in ("color", "shape"):
        color = answer if task == "color" else _pick(rng, COLORS)
        kind = answer if task == "shape" else _pick(rng, SHAPES)
        shapes = (Shape(kind, color, _int(rng, r, size - 1 - r), _int(rng, r, size - 1 - r), r),)
    elif task == "count":
        n = _COUNT_WORDS.index(answer) + 1
        color, kind, cell = _pick(rng, COLORS), _pick(rng, SHAPES), size // 2
        quadrants = rng.permutation(4)[:n]
        placed = []
        for q in sorted(int(v) for v in quadrants):
            x0, y0 = (q % 2) * cell, (q // 2) * cell
            x = _int(rng, x0 + 1 + r, x0 + cell - 2 - r)
            placed.append(Shape(kind, color, x, _int(rng, y0 + 1 + r, y0 + cell - 2 - r), r))
        shapes = tuple(placed)
    elif task == "position":
        third = _third(size)
        x = _int(rng, r, third) if answer == "left" else _int(rng, size - 1 - third, size - 1 - r)
        shapes = (Shape(_pick(rng, SHAPES), _pick(rng, COLORS), x, _int(rng, r, size - 1 - r), r),)
    else:  # relation
        i, j = (int(v) for v in rng.choice(len(COLORS), size=2, replace=False))
        c1, c2 = COLORS[i], COLORS[j]
        left, right = (c1, c2) if answer == "yes" else (c2, c1)
        gap = 2 * r + 3  # centre distance that leaves 2 background pixels between the boxes
        xl = _int(rng, r, size - 1 - r - gap)
        xr = _int(rng, xl + gap, size - 1 - r)
        shapes = (
            Shape(_pick(rng, SHAPES), left, xl, _int(rng, r, size - 1 - r), r),
            Shape(_pick(rng, SHAPES), right, xr, _int(rng, r, size - 1 - r), r),
        )
        question = question.format(c1=c1, c2=c2)
    return Scene(shapes), (task, question, answer)


def _all_questions(scene: Scene, size: int, tasks: Sequence[str]) -> list[_QA]:
    """Every question from ``tasks`` that has a well-defined answer for ``scene``."""
    shapes = scene.shapes
    qas: list[_QA] = []
    if len(shapes) == 1:
        (s,) = shapes
        qas += [("color", QUESTIONS["color"], s.color), ("shape", QUESTIONS["shape"], s.kind)]
        side = _side(s, size)
        if side is not None:
            qas.append(("position", QUESTIONS["position"], side))
    if 1 <= len(shapes) <= len(_COUNT_WORDS):
        qas.append(("count", QUESTIONS["count"], _COUNT_WORDS[len(shapes) - 1]))
    if len(shapes) == 2 and shapes[0].color != shapes[1].color:
        a, b = sorted(shapes, key=lambda s: s.x)
        if a.x + a.r < b.x - b.r:
            qas.append(("relation", QUESTIONS["relation"].format(c1=a.color, c2=b.color), "yes"))
            qas.append(("relation", QUESTIONS["relation"].format(c1=b.color, c2=a.color), "no"))
    return [qa for qa in qas if qa[0] in tasks]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _caption(scene: Scene, size: int) -> str:
    shapes = scene.shapes
    if len(shapes) == 2 and shapes[0].color != shapes[1].color:
        a, b = sorted(shapes, key=lambda s: s.x)
        return f"{_a(a.color)} {a.kind} left of {_a(b.color)} {b.kind}."
    s = shapes[0]
    text = f"{_a(s.color)} {s.kind}" if len(shapes) == 1 else f"{_COUNT_WORDS[len(shapes) - 1]} {s.color} {s.kind}s"
    sides = {_side(t, size) for t in shapes}
    if len(sides) == 1 and None not in sides:
        text += f" on the {sides.pop()}"
    return text + "."


def _render_indexed(scene: Scene, image_size: int, noise: int, rng: np.random.Generator) -> Image.Image:
    """:func:`render` as a palette image: a third of the bytes to encode, so PNGs are smaller and faster to write."""
    # One noise value per pixel (grey, not per channel) keeps the background neutral and the palette small.
    offsets = rng.integers(-noise, noise + 1, size=(image_size, image_size), dtype=np.int16)
    image = Image.fromarray((offsets + len(COLORS) + MAX_NOISE).astype(np.uint8))
    image.putpalette(_PALETTE)  # turns the "L" image into "P"
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = _COLOR_INDEX[s.color]
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)
    return image


def render(scene: Scene, image_size: int, noise: int, rng: np.random.Generator) -> Image.Image:
    """RGB image: light grey background with per-pixel uniform noise in ``[-noise, noise]``, solid shapes on top."""
    return _render_indexed(scene, image_size, noise, rng).convert("RGB")


# --- writing --------------------------------------------------------------------------------------


def _human(question: str, first: bool) -> dict[str, str]:
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question}


def _build_split(split: str, config: SynthConfig, image_dir: Path) -> list[dict[str, Any]]:
    """Render one split's images into ``image_dir`` and return its records."""
    scene_rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], 0])
    # Noise has its own stream so blank_images cannot shift any question or answer.
    noise_rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], 1])
    count = {"align": config.num_align, "sft": config.num_sft, "eval": config.num_eval}[split]
    size, tasks = config.image_size, config.tasks
    records: list[dict[str, Any]] = []
    for i in range(count):
        if split == "eval":
            # Round-robin over tasks, then over answers within a task: balanced, also for any prefix.
            task = tasks[i % len(tasks)]
            answers = _ANSWERS[task]
            answer = answers[(i // len(tasks)) % len(answers)]
        else:
            task = _pick(scene_rng, tasks)
            answer = _pick(scene_rng, _ANSWERS[task])
        scene, qa = _scene_for(task, answer, scene_rng, config)
        name = f"{split}_{i:06d}"
        image = f"images/{name}.png"
        _render_indexed(Scene() if config.blank_images else scene, size, config.noise, noise_rng).save(
            image_dir / f"{name}.png", compress_level=1
        )
        if split == "align":
            conversations = [
                {"from": "human", "value": IMAGE_TOKEN},
                {"from": "gpt", "value": _caption(scene, size)},
            ]
            records.append({"id": name, "image": image, "conversations": conversations})
            continue
        turns = [qa]
        if split == "sft" and scene_rng.random() < config.multi_turn:
            others = [q for q in _all_questions(scene, size, tasks) if q[1] != qa[1]]
            extra = min(len(others), _int(scene_rng, 1, 2))
            turns += [others[int(k)] for k in scene_rng.permutation(len(others))[:extra]]
        conversations = []
        for t, (_, question, ans) in enumerate(turns):
            conversations += [_human(question, t == 0), {"from": "gpt", "value": ans}]
        record: dict[str, Any] = {"id": name, "image": image, "conversations": conversations}
        if split == "eval":
            record.update(task=task, answer=answer)
        records.append(record)
    return records


def _manifest(config: SynthConfig) -> dict[str, Any]:
    # Round-trip through JSON so tuples compare equal to the lists read back from disk.
    return json.loads(json.dumps({"generator": GENERATOR, "format_version": FORMAT_VERSION, "config": asdict(config)}))


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _paths(root: Path) -> SynthPaths:
    return SynthPaths(root, root, root / "align.json", root / "sft.json", root / "eval.json")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=None), encoding="utf-8")


def generate(out_dir: str | Path, config: SynthConfig = SynthConfig()) -> SynthPaths:
    """Write the dataset for ``config`` to ``out_dir`` (reused as is when it was already written for it)."""
    root = Path(out_dir)
    manifest = _manifest(config)
    if _read_manifest(root) == manifest:
        return _paths(root)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_manifest(root) is None)):
        raise ConfigError(
            f"synthetic out_dir {str(root)!r} exists and is not a dataset written by {GENERATOR} "
            "(no manifest.json); choose a new or empty directory."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling and rename into place, so a crash never leaves a complete-looking dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        for split in ("align", "sft", "eval"):
            _write_json(tmp / f"{split}.json", _build_split(split, config, tmp / "images"))
        _write_json(tmp / "manifest.json", manifest)  # last: its presence marks a finished dataset
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if _read_manifest(root) == manifest:  # another process (e.g. another rank) finished it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return _paths(root)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished the same dataset first: theirs is as good as ours.
            if _read_manifest(root) != manifest:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(root)
