"""The one logging helper: ``get_logger(__name__)`` everywhere, rich output on a terminal."""

from __future__ import annotations

import logging
import sys

_ROOT = "mllm_kit"
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
    _configured = True


def get_logger(name: str) -> logging.Logger:
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
