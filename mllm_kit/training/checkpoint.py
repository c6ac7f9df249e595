"""Checkpoints that are written atomically: an interrupted write never replaces the last good one."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mllm_kit.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target directory, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
