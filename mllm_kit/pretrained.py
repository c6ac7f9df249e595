"""Loading pretrained parts from disk (or a hub, when one is reachable) with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mllm_kit.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}.") from None


def from_pretrained(cls: Any, path: str | os.PathLike[str], *, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)``; a path that is neither a local directory nor reachable gets a clear error."""
    path = os.fspath(path)
    local = Path(path).expanduser()
    if local.exists():
        path = str(local)
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if local.exists():
            raise ConfigError(f"cannot load {what} from {path!r}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " The hub is offline (HF_HUB_OFFLINE=1)." if offline else ""
        raise ConfigError(
            f"cannot load {what} {path!r}: it is not a local directory and could not be fetched.{hint} "
            f"Point 'path' at a directory saved with save_pretrained, or run with --smoke for tiny models."
        ) from err
