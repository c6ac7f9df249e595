"""Deterministic synthetic dataset of coloured shapes, written as LLaVA-format JSON.

The test bed for "a model that sees beats one that does not": every answer is a single word that is
only recoverable from the pixels (``blank_images`` renders the same questions over empty backgrounds
for the blind control). Only numpy and PIL are used so generation stays fast and torch-free. Scenes,
geometry and rendering live in :mod:`mllm_kit.data.shapes`; this module configures, draws and writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# mllm_kit.data.synthetic stays the public path of the palette, scenes and rendering.
from mllm_kit.data.shapes import BACKGROUND, COLOR_RGB, COLORS, QUESTIONS, SHAPES, Shape, render  # noqa: F401
from mllm_kit.data.shapes import (
    ANSWERS,
    MAX_NOISE,
    PALETTES,
    TASKS,
    Scene,
    all_questions,
    caption,
    default_radius,
    pick,
    radius_cap,
    render_indexed,
    scene_for,
    uniform_int,
)
from mllm_kit.errors import ConfigError, did_you_mean

FORMAT_VERSION = 2  # 2: preference.json
GENERATOR = "mllm_kit.data.synthetic"
IMAGE_TOKEN = "<image>"
# Seed streams per split: eval uses its own stream so it never replays training scenes.
_SPLIT_STREAM = {"align": 0, "sft": 1, "eval": 2}


def answers_for(task: str) -> tuple[str, ...]:
    """The closed answer set of ``task``."""
    if task not in ANSWERS:
        raise ConfigError(f"unknown synthetic task {task!r}; choose from {list(TASKS)}.{did_you_mean(task, TASKS)}")
    return ANSWERS[task]


def parse_radius(text: str) -> tuple[int, int]:
    """``"MIN,MAX"`` (as the command line gives it) as a radius pair for :class:`SynthConfig`."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"synthetic radius must be two integers MIN,MAX (e.g. 8,16), got {text!r}.") from None
    return (lo, hi)


@dataclass(frozen=True)
class SynthConfig:
    """Sizes, tasks and rendering options of a synthetic dataset (the whole config is the cache key).

    ``radius`` is the (min, max) half-size of a shape in pixels; left unset (``None``) it becomes
    :func:`~mllm_kit.data.shapes.default_radius` of ``image_size`` ((8, 16) at 64 px), so the config
    holds the radius actually drawn and the cache key names it. ``palette``: ``standard`` or ``isoluminant`` (the six
    hues at one luminance, so a grayscale view cannot tell the colours apart).
    """

    seed: int = 0
    image_size: int = 64
    num_align: int = 2000
    num_sft: int = 12000
    num_eval: int = 600
    tasks: tuple[str, ...] = ("color", "shape")
    radius: tuple[int, int] | None = None
    noise: int = 8
    multi_turn: float = 0.3
    blank_images: bool = False
    palette: str = "standard"

    def __post_init__(self) -> None:
        # Recipes deliver lists from YAML/JSON; tuples keep the config hashable and comparable.
        if isinstance(self.tasks, str):
            raise ConfigError(f"synthetic tasks must be a list of task names, not the string {self.tasks!r}.")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.radius is not None:
            if not isinstance(self.radius, list | tuple):
                raise ConfigError(f"synthetic radius must be two integers [min, max], got {self.radius!r}.")
            object.__setattr__(self, "radius", tuple(self.radius))
        self._validate()

    def key(self) -> dict[str, Any]:
        """The config as its cache key: every field, except options added later while at their default (so caches and
        the numbers measured on them keep their keys)."""
        out = asdict(self)
        if out["palette"] == "standard":
            del out["palette"]
        return out

    def _radius_range(self) -> str:
        """The radii allowed at this image_size and these tasks, for error messages."""
        size = self.image_size
        text = f"1 <= min <= max <= {(size - 1) // 2}"
        caps = {t: radius_cap(t, size) for t in self.tasks if radius_cap(t, size) < (size - 1) // 2}
        if caps:
            task = min(caps, key=caps.get)
            text += f" and min <= {caps[task]} (task {task!r})"
        return f"allowed at image_size {size}: {text}; leave radius unset for the default {list(default_radius(size))}"

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
        if self.radius is None:
            object.__setattr__(self, "radius", default_radius(self.image_size))
        self._validate_radius()
        if not 0 <= self.noise <= MAX_NOISE:
            raise ConfigError(f"synthetic noise must be in [0, {MAX_NOISE}], got {self.noise}.")
        if not isinstance(self.multi_turn, int | float) or not 0.0 <= self.multi_turn <= 1.0:
            raise ConfigError(f"synthetic multi_turn must be a fraction in [0, 1], got {self.multi_turn!r}.")
        if not isinstance(self.blank_images, bool):
            raise ConfigError(f"synthetic blank_images must be true or false, got {self.blank_images!r}.")
        if self.palette not in PALETTES:
            raise ConfigError(f"synthetic palette must be one of {list(PALETTES)}, got {self.palette!r}."
                              f"{did_you_mean(str(self.palette), PALETTES)}")

    def _validate_radius(self) -> None:
        radius, size = self.radius, self.image_size
        assert radius is not None
        if len(radius) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in radius):
            raise ConfigError(f"synthetic radius must be two integers [min, max], got {radius!r}; {self._radius_range()}.")
        lo, hi = radius
        if not 1 <= lo <= hi:
            raise ConfigError(f"synthetic radius must satisfy 1 <= min <= max, got {list(radius)}; {self._radius_range()}.")
        if 2 * hi + 1 > size:
            raise ConfigError(
                f"synthetic radius max {hi} is too large for image_size {size}: a shape is {2 * hi + 1} px wide; "
                f"{self._radius_range()}, or use a larger image_size."
            )
        for task in self.tasks:
            if lo > radius_cap(task, size):
                raise ConfigError(
                    f"synthetic radius min {lo} is too large for task {task!r} at image_size {size}; "
                    f"{self._radius_range()}, or use a larger image_size."
                )


@dataclass(frozen=True)
class SynthPaths:
    """Where :func:`generate` put a dataset; JSON image paths are relative to ``image_root``."""

    root: Path
    image_root: Path
    align: Path
    sft: Path
    eval: Path
    preference: Path


# --- writing --------------------------------------------------------------------------------------


def _human(question: str, first: bool) -> dict[str, str]:
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if first else question}


def _build_split(split: str, config: SynthConfig, image_dir: Path) -> list[dict[str, Any]]:
    """Render one split's images into ``image_dir`` and return its records."""
    scene_rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], 0])
    # Noise has its own stream so blank_images cannot shift any question or answer.
    noise_rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], 1])
    pair_rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], 2])  # likewise for the preference pairs
    count = {"align": config.num_align, "sft": config.num_sft, "eval": config.num_eval}[split]
    size, tasks = config.image_size, config.tasks
    records: list[dict[str, Any]] = []
    for i in range(count):
        if split == "eval":
            # Round-robin over tasks, then over answers within a task: balanced, also for any prefix.
            task = tasks[i % len(tasks)]
            answers = ANSWERS[task]
            answer = answers[(i // len(tasks)) % len(answers)]
        else:
            task = pick(scene_rng, tasks)
            answer = pick(scene_rng, ANSWERS[task])
        scene, qa = scene_for(task, answer, scene_rng, size, config.radius)
        name = f"{split}_{i:06d}"
        image = f"images/{name}.png"
        render_indexed(Scene() if config.blank_images else scene, size, config.noise, noise_rng, config.palette).save(
            image_dir / f"{name}.png", compress_level=1
        )
        if split == "align":
            conversations = [
                {"from": "human", "value": IMAGE_TOKEN},
                {"from": "gpt", "value": caption(scene, size)},
            ]
            records.append({"id": name, "image": image, "conversations": conversations})
            continue
        turns = [qa]
        if split == "sft" and scene_rng.random() < config.multi_turn:
            others = [q for q in all_questions(scene, size, tasks) if q[1] != qa[1]]
            extra = min(len(others), uniform_int(scene_rng, 1, 2))
            turns += [others[int(k)] for k in scene_rng.permutation(len(others))[:extra]]
        conversations = []
        for t, (_, question, ans) in enumerate(turns):
            conversations += [_human(question, t == 0), {"from": "gpt", "value": ans}]
        record: dict[str, Any] = {"id": name, "image": image, "conversations": conversations}
        if split == "sft":  # the pair a preference stage reads: the first question, right vs wrong answer
            task, question, answer = qa
            wrong = [a for a in ANSWERS[task] if a != answer]
            record["preference"] = {"conversations": [_human(question, True)], "chosen": answer,
                                    "rejected": wrong[int(pair_rng.integers(len(wrong)))]}
        if split == "eval":
            record.update(task=task, answer=answer)
        records.append(record)
    return records


def _manifest(config: SynthConfig) -> dict[str, Any]:
    # Round-trip through JSON so tuples compare equal to the lists read back from disk.
    return json.loads(json.dumps({"generator": GENERATOR, "format_version": FORMAT_VERSION, "config": config.key()}))


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _paths(root: Path) -> SynthPaths:
    return SynthPaths(root, root, root / "align.json", root / "sft.json", root / "eval.json", root / "preference.json")


def _preference_pairs(sft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference records (chosen = the correct answer, rejected = another answer of the same task, same image)."""
    return [{"id": f"pref_{r['id']}", "image": r["image"], **r.pop("preference")} for r in sft]


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
            records = _build_split(split, config, tmp / "images")
            if split == "sft":
                _write_json(tmp / "preference.json", _preference_pairs(records))
            _write_json(tmp / f"{split}.json", records)
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
