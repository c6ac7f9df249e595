"""Reading image files, with errors that name the sample and the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mllm_kit.errors import DataError


def load_image(path: str | Path, ref: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB; ``ref`` names the sample in errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{ref}: image file {str(path)!r} not found (check 'image_root' and the sample's 'image').")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{ref}: image file {str(path)!r} cannot be read as an image ({err}).") from None
