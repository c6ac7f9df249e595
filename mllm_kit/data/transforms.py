"""Image preprocessing owned by each encoder: PIL image → normalised ``[3, H, W]`` tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mllm_kit.errors import ConfigError

ResizeMode = Literal["resize", "center_crop", "pad"]
RESIZE_MODES = ("resize", "center_crop", "pad")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageTransform:
    """Resize an image to ``size``×``size`` and normalise it with the encoder's mean/std.

    Modes:
      * ``resize``: stretch to a square (SigLIP/timm style).
      * ``center_crop``: resize the short side, then centre-crop (CLIP's processor: the long side becomes
        ``int(size · long / short)``, truncated, as in CLIP's and transformers' processors).
      * ``pad``: pad to a square with the mean colour, then resize (LLaVA-1.5 ``image_aspect_ratio pad``,
        specs/components.md §1.3); the colour is ``int(mean · 255)`` per channel, as LLaVA's ``expand2square`` and
        transformers' ``LlavaImageProcessor(do_pad=True)`` use, so an exported processor pads identically.
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    mode: ResizeMode = "center_crop"
    grayscale: bool = False  # luminance in all three channels (a colour-blind view)

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ConfigError(f"image_transform mode {self.mode!r} is not one of {RESIZE_MODES}.")
        if self.size <= 0:
            raise ConfigError(f"image size must be positive, got {self.size}.")

    def with_mode(self, mode: ResizeMode) -> ImageTransform:
        return ImageTransform(self.size, self.mean, self.std, mode, self.grayscale)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L").convert("RGB") if self.grayscale else image.convert("RGB")
        if self.mode == "pad":
            image = _pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.mode == "center_crop":
            image = _resize_short_side(image, self.size)
            image = _center_crop(image, self.size)
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def _pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    short = min(w, h)  # the long side is truncated, as CLIP's and transformers' processors do
    return image.resize((int(size * w / short), int(size * h / short)), Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class MixtureTransform:
    """One decoded image transformed for every member of an encoder mixture (each its own size, mode and
    normalisation), flattened and concatenated in member order: ``[Σ 3·Hᵢ·Wᵢ]`` — one tensor per image, so batches,
    crops and device copies treat a mixture's pixels like a single encoder's; the mixture splits them back (views)."""

    transforms: tuple[ImageTransform, ...]

    @property
    def size(self) -> int:
        """The first member's size: the crop size of a high-resolution view."""
        return self.transforms[0].size

    def with_mode(self, mode: ResizeMode) -> MixtureTransform:
        return MixtureTransform(tuple(t.with_mode(mode) for t in self.transforms))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        return torch.cat([t(image).flatten() for t in self.transforms])


BaseTransform = ImageTransform | MixtureTransform


@dataclass(frozen=True)
class ImageViews:
    """A global view plus a high-resolution view cut into ``grid = (rows, cols)`` crops ``[rows·cols, ...]``."""

    global_view: torch.Tensor
    crops: torch.Tensor
    grid: tuple[int, int]


def crop_grids(num_crops: int) -> list[tuple[int, int]]:
    """Candidate (rows, cols) with rows·cols ≤ ``num_crops``, excluding 1×1 (DeepStack, specs/components.md §3.1)."""
    return [(r, c) for r in range(1, num_crops + 1) for c in range(1, num_crops + 1) if r * c <= num_crops and r * c > 1]


def pinpoint_grids(pinpoints: list[list[int]] | list[tuple[int, int]], size: int, where: str = "pinpoints") -> list[tuple[int, int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` (``[height, width]`` in pixels, multiples of the crop ``size``) as
    (rows, cols) grids of crops (specs/components.md §3.2)."""
    grids = []
    for point in pinpoints:
        if len(point) != 2 or any(int(v) <= 0 or int(v) % size for v in point):
            raise ConfigError(f"{where}: {list(point)} is not a [height, width] pair of positive multiples of the crop size {size}.")
        grids.append((int(point[0]) // size, int(point[1]) // size))
    if not grids:
        raise ConfigError(f"{where}: needs at least one [height, width] resolution.")
    return grids


def best_grid(width: int, height: int, size: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution``: the grid that keeps the most image pixels after an aspect-preserving
    (integer-truncated) downscale, then wastes the fewest — shared by DeepStack's crops and AnyRes."""
    def score(grid: tuple[int, int]) -> tuple[int, int]:
        w, h = grid[1] * size, grid[0] * size
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        return (effective, -(w * h - effective))

    return max(grids, key=score)


def fit_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The ``(width, height)`` an image of ``(width, height)`` is resized to inside a ``target_w × target_h`` canvas,
    aspect kept: the side with the smaller scale fills the canvas and the other is rounded *up* (capped at the canvas),
    as LLaVA-NeXT's ``resize_and_pad_image`` (LLaVA-VL/LLaVA-NeXT ``llava/mm_utils.py``) and transformers'
    ``get_patch_output_size`` compute it — same float expressions, same tie (equal scales fill the height)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


@dataclass(frozen=True)
class CropGridTransform:
    """``base`` for the global view, plus a high-resolution view cut into crops (DeepStack §3.1, LLaVA-NeXT AnyRes §3.2).

    The image is resized (aspect kept, :func:`fit_size`; bicubic) into the best-fitting ``grids`` entry
    (:func:`best_grid`) of ``base.size`` crops, centred on a black canvas (offset ``(canvas − resized) // 2``) as
    LLaVA-NeXT's ``resize_and_pad_image`` does, and cut row-major into crops that ``base`` transforms like the global
    view. With ``base`` in ``resize`` mode the views equal transformers' ``LlavaNextImageProcessorPil`` output
    (tests/test_anyres.py).
    """

    base: BaseTransform
    grids: tuple[tuple[int, int], ...]

    def with_mode(self, mode: ResizeMode) -> CropGridTransform:
        return CropGridTransform(self.base.with_mode(mode), self.grids)

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        return best_grid(width, height, self.base.size, list(self.grids))

    def __call__(self, image: Image.Image) -> ImageViews:
        image = image.convert("RGB")
        size = self.base.size
        rows, cols = self.grid_for(image.width, image.height)
        target_w, target_h = cols * size, rows * size
        new_w, new_h = fit_size(image.width, image.height, target_w, target_h)
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
        crops = [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
        return ImageViews(self.base(image), torch.stack([self.base(crop) for crop in crops]), (rows, cols))
