"""The one logging helper: ``get_logger(__name__)`` everywhere, rich output on a terminal; :func:`progress` is the
one progress bar for work outside training (data conversion, indexing).

Configuring it also silences the tqdm bars of transformers ("Loading weights", "Writing model shards") and
huggingface_hub (downloads), so a run's console shows the log and the trainer's one progress display. Set
``HF_HUB_DISABLE_PROGRESS_BARS=0`` to keep those bars.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

_ROOT = "mllm_kit"
T = TypeVar("T")
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        try:
            from rich.logging import RichHandler

            handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:  # pragma: no cover - rich is a dependency
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    _silence_hf_progress_bars()
    _configured = True


def _silence_hf_progress_bars() -> None:
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:  # the user chose; both libraries follow it
        return
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    disable_progress_bars()  # covers hub downloads; transformers copies this state when it is imported
    # transformers already imported: it keeps its own switch for the bars it draws (v5: modeling_utils'
    # "Writing model shards", core_model_loading's "Loading weights").
    disable = getattr(sys.modules.get("transformers.utils.logging"), "disable_progress_bar", None)
    if disable is not None:
        disable()


def get_logger(name: str) -> logging.Logger:
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def progress(items: Sequence[T], description: str) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on a terminal; elsewhere (logs, CI) one line at the start and the end."""
    _configure()
    logger = logging.getLogger(_ROOT)
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=description, total=len(items), console=None, transient=True)
        return
    logger.info("%s: %d items", description, len(items))
    yield from items
    logger.info("%s: done", description)
