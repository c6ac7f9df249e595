"""Reading image files, with errors that name the sample and the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from mllm_kit.errors import ImageError

T = TypeVar("T")


def load_image(path: str | Path, ref: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB; ``ref`` names the sample in errors."""
    return _read(path, ref, lambda image: image.convert("RGB"))


def image_size(path: str | Path, ref: str) -> tuple[int, int]:
    """``(width, height)`` of ``path`` from its header, without decoding the pixels; ``ref`` names the sample in errors."""
    return _read(path, ref, lambda image: image.size)


def _read(path: str | Path, ref: str, what: Callable[[Image.Image], T]) -> T:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{ref}: image file {str(path)!r} not found (check 'image_root' and the sample's 'image').")
    try:
        with Image.open(path) as image:
            return what(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{ref}: image file {str(path)!r} cannot be read as an image ({err}).") from None


class FolderImages:
    """Images as files under ``root`` (LLaVA JSON's ``image`` paths are relative to it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, name: str, ref: str) -> Image.Image:
        return load_image(self.root / name, ref)

    def size(self, name: str, ref: str) -> tuple[int, int]:
        return image_size(self.root / name, ref)
