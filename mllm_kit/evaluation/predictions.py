"""Per-sample predictions as JSONL, appended batch by batch so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mllm_kit.errors import DataError


def done_ids(path: str | Path, key: str = "id") -> set[str]:
    """Ids already in ``path``. A last line cut by a kill (no newline, or not JSON) is removed, so it is redone."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    ids = set()
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)[key]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}, line {lineno}: not a prediction with {key!r}; it is not this command's output "
                            f"(use another --out, or delete it to start over).") from None
    return ids


def append(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON lines and make them durable before returning (a kill loses at most the batch being written)."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
