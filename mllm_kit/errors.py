"""The one place errors are defined.

Every error a user can trigger with bad input derives from :class:`MllmKitError` and says which
file, sample, recipe key or component is wrong and what would fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MllmKitError(Exception):
    """Base class for errors caused by user input (configs, data, component names)."""


class RegistryError(MllmKitError, KeyError):
    """Unknown, duplicate or badly specified component."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(MllmKitError, ValueError):
    """A component or recipe option has a wrong value."""


class DataError(MllmKitError, ValueError):
    """A data file or sample is malformed."""


class ImageError(DataError):
    """A sample's image is missing or cannot be decoded (the dataset may skip the sample)."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest option, or ``""`` when nothing is close."""
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def sample_ref(file: object, index: int, sample_id: object | None = None) -> str:
    """How errors name a sample: ``data.json, sample 12 (id 'abc')``."""
    ref = f"{file}, sample {index}"
    return f"{ref} (id {sample_id!r})" if sample_id is not None else ref
