"""Scenes of the synthetic shapes dataset: palette, geometry, questions and rendering.

:mod:`mllm_kit.data.synthetic` draws scenes from here and writes them out; this module only knows about one
scene at a time. Only numpy and PIL are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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

COUNT_WORDS = ("one", "two", "three")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": COUNT_WORDS,
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
# The same hues at one luminance (ITU-R 601 luma 120, as PIL's convert("L") computes it): a grayscale view cannot tell
# them apart, so a colour-blind encoder sees shape only (the mixture benchmark, docs/encoders/mixtures.md).
ISOLUMINANT_RGB: dict[str, tuple[int, int, int]] = {
    "red": (252, 63, 63),
    "green": (0, 201, 17),
    "blue": (73, 118, 252),
    "yellow": (139, 134, 0),
    "purple": (189, 58, 254),
    "orange": (202, 101, 0),
}
PALETTES = {"standard": COLOR_RGB, "isoluminant": ISOLUMINANT_RGB}
# Image palette: the shape colours, then every background grey BACKGROUND + k for |k| <= MAX_NOISE.
_COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}
_GREYS = [v for g in range(BACKGROUND - MAX_NOISE, BACKGROUND + MAX_NOISE + 1) for v in (g, g, g)]
_PALETTE = {name: [v for c in COLORS for v in rgb[c]] + _GREYS for name, rgb in PALETTES.items()}


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


# --- geometry -----------------------------------------------------------------------------------


def _third(size: int) -> int:
    """Largest centre x that still counts as 'in the left third' (mirrored for the right)."""
    return size // 3 - 1


def radius_cap(task: str, size: int) -> int:
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


def default_radius(size: int) -> tuple[int, int]:
    """Shape radii drawn when none are given: 1/8 to 1/4 of the image side, (8, 16) at 64 px.

    Fits every task's layout at any ``size >= 16``, so the same scenes scale with the image."""
    return (size // 8, size // 4)


def _side(shape: Shape, size: int) -> str | None:
    third = _third(size)
    if shape.x <= third:
        return "left"
    if shape.x >= size - 1 - third:
        return "right"
    return None


def uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` inclusive."""
    return int(rng.integers(lo, hi + 1))


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --- scenes and questions -------------------------------------------------------------------------

QA = tuple[str, str, str]  # (task, question, answer)


def scene_for(
    task: str, answer: str, rng: np.random.Generator, size: int, radius: tuple[int, int]
) -> tuple[Scene, QA]:
    """A random ``size``-px scene whose answer to ``task`` is ``answer`` (shape radii drawn from ``radius``),
    and the question asked about it."""
    lo, hi = radius
    r = uniform_int(rng, lo, min(hi, radius_cap(task, size)))
    question = QUESTIONS[task]
    if task in ("color", "shape"):
        color = answer if task == "color" else pick(rng, COLORS)
        kind = answer if task == "shape" else pick(rng, SHAPES)
        shapes = (Shape(kind, color, uniform_int(rng, r, size - 1 - r), uniform_int(rng, r, size - 1 - r), r),)
    elif task == "count":
        n = COUNT_WORDS.index(answer) + 1
        color, kind, cell = pick(rng, COLORS), pick(rng, SHAPES), size // 2
        quadrants = rng.permutation(4)[:n]
        placed = []
        for q in sorted(int(v) for v in quadrants):
            x0, y0 = (q % 2) * cell, (q // 2) * cell
            x = uniform_int(rng, x0 + 1 + r, x0 + cell - 2 - r)
            placed.append(Shape(kind, color, x, uniform_int(rng, y0 + 1 + r, y0 + cell - 2 - r), r))
        shapes = tuple(placed)
    elif task == "position":
        third = _third(size)
        x = uniform_int(rng, r, third) if answer == "left" else uniform_int(rng, size - 1 - third, size - 1 - r)
        shapes = (Shape(pick(rng, SHAPES), pick(rng, COLORS), x, uniform_int(rng, r, size - 1 - r), r),)
    else:  # relation
        i, j = (int(v) for v in rng.choice(len(COLORS), size=2, replace=False))
        c1, c2 = COLORS[i], COLORS[j]
        left, right = (c1, c2) if answer == "yes" else (c2, c1)
        gap = 2 * r + 3  # centre distance that leaves 2 background pixels between the boxes
        xl = uniform_int(rng, r, size - 1 - r - gap)
        xr = uniform_int(rng, xl + gap, size - 1 - r)
        shapes = (
            Shape(pick(rng, SHAPES), left, xl, uniform_int(rng, r, size - 1 - r), r),
            Shape(pick(rng, SHAPES), right, xr, uniform_int(rng, r, size - 1 - r), r),
        )
        question = question.format(c1=c1, c2=c2)
    return Scene(shapes), (task, question, answer)


def all_questions(scene: Scene, size: int, tasks: Sequence[str]) -> list[QA]:
    """Every question from ``tasks`` that has a well-defined answer for ``scene``."""
    shapes = scene.shapes
    qas: list[QA] = []
    if len(shapes) == 1:
        (s,) = shapes
        qas += [("color", QUESTIONS["color"], s.color), ("shape", QUESTIONS["shape"], s.kind)]
        side = _side(s, size)
        if side is not None:
            qas.append(("position", QUESTIONS["position"], side))
    if 1 <= len(shapes) <= len(COUNT_WORDS):
        qas.append(("count", QUESTIONS["count"], COUNT_WORDS[len(shapes) - 1]))
    if len(shapes) == 2 and shapes[0].color != shapes[1].color:
        a, b = sorted(shapes, key=lambda s: s.x)
        if a.x + a.r < b.x - b.r:
            qas.append(("relation", QUESTIONS["relation"].format(c1=a.color, c2=b.color), "yes"))
            qas.append(("relation", QUESTIONS["relation"].format(c1=b.color, c2=a.color), "no"))
    return [qa for qa in qas if qa[0] in tasks]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(scene: Scene, size: int) -> str:
    shapes = scene.shapes
    if len(shapes) == 2 and shapes[0].color != shapes[1].color:
        a, b = sorted(shapes, key=lambda s: s.x)
        return f"{_a(a.color)} {a.kind} left of {_a(b.color)} {b.kind}."
    s = shapes[0]
    text = f"{_a(s.color)} {s.kind}" if len(shapes) == 1 else f"{COUNT_WORDS[len(shapes) - 1]} {s.color} {s.kind}s"
    sides = {_side(t, size) for t in shapes}
    if len(sides) == 1 and None not in sides:
        text += f" on the {sides.pop()}"
    return text + "."


def render_indexed(scene: Scene, image_size: int, noise: int, rng: np.random.Generator, palette: str = "standard") -> Image.Image:
    """:func:`render` as a palette image: a third of the bytes to encode, so PNGs are smaller and faster to write."""
    # One noise value per pixel (grey, not per channel) keeps the background neutral and the palette small.
    offsets = rng.integers(-noise, noise + 1, size=(image_size, image_size), dtype=np.int16)
    image = Image.fromarray((offsets + len(COLORS) + MAX_NOISE).astype(np.uint8))
    image.putpalette(_PALETTE[palette])  # turns the "L" image into "P"
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


def render(scene: Scene, image_size: int, noise: int, rng: np.random.Generator, palette: str = "standard") -> Image.Image:
    """RGB image: light grey background with per-pixel uniform noise in ``[-noise, noise]``, solid shapes on top in the
    colours of ``palette`` (:data:`PALETTES`)."""
    return render_indexed(scene, image_size, noise, rng, palette).convert("RGB")
