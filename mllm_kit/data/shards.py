"""WebDataset tar shards: ``mllm-kit data convert --to wds`` writes them, and a recipe trains from them.

A shard is a plain tar in WebDataset's layout — the members of one sample share a key: ``<key>.json`` (the LLaVA
record, its ``image`` renamed to the sample's image members) and ``<key>.<i>.<ext>`` (each image's original encoded
bytes) — so webdataset's own readers and tools read it too. ``manifest.json`` beside the shards lists each shard's
sample count, size and SHA-256.

Reading: local shards are *indexed*, not streamed. Opening a shard set reads every tar header once (seeking past the
image bytes) and every ``.json`` member, so the samples become a map-style dataset whose images are read by offset.
Everything the JSON path has then holds for shards unchanged: rank and worker splitting by sample index (each sample
exactly once per epoch across ranks × workers), length grouping, packing, and exact resume from the optimiser step.
Remote URLs are refused; ``pipe:`` commands (``data.allow_pipe: true``) are run once and their output cached locally,
then indexed.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mllm_kit.data.formats import Record, parse_record, read_json_records
from mllm_kit.errors import DataError, ImageError
from mllm_kit.files import atomic_file, atomic_write_json
from mllm_kit.log import get_logger, progress

log = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT = "mllm-kit-wds"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_urls(urls: str) -> list[str]:
    """WebDataset's brace notation: ``"train-{000000..000003}.tar"`` → four names (zero padding kept); several
    patterns may be joined with ``::``."""
    out: list[str] = []
    for part in urls.split("::"):
        match = _BRACES.search(part)
        if match is None:
            out.append(part)
            continue
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi) + 1):
            out.extend(expand_urls(part[: match.start()] + str(n).zfill(width) + part[match.end() :]))
    return out


def check_urls(urls: str, where: str, allow_pipe: bool = False) -> list[str]:
    """The shard names ``urls`` expands to, checked: local files must exist; ``pipe:`` commands are allowed only with
    ``allow_pipe`` (they run a shell command); remote URLs are refused (fetch them through a pipe)."""
    names = expand_urls(urls)
    for name in names:
        if name.startswith("pipe:") and not allow_pipe:
            raise DataError(f"{where}: {name!r} is a pipe URL, which runs a shell command; set data.allow_pipe: true to "
                            f"allow it (its output is copied to a local cache, then indexed like a local shard).")
        if "://" in name and not name.startswith("pipe:"):
            raise DataError(f"{where}: {name!r} is a remote URL; shards are read from local files by offset. Copy them to "
                            f"a local or mounted filesystem, or fetch them through a pipe ('pipe:curl -sfL {name}') with "
                            f"data.allow_pipe: true.")
    missing = [n for n in names if not n.startswith("pipe:") and not Path(n).is_file()]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{where}: {len(missing)} of the {len(names)} shards {urls!r} names do not exist ({shown}).")
    return names


def local_shards(names: Sequence[str], cache: Path, where: str) -> list[Path]:
    """Local paths of checked shard names: a ``pipe:`` command runs once and its output is kept in ``cache`` under a
    name derived from the command (written atomically; a later run reuses it)."""
    paths = []
    for name in names:
        if not name.startswith("pipe:"):
            paths.append(Path(name))
            continue
        target = cache / f"{hashlib.sha1(name.encode()).hexdigest()[:16]}.tar"
        if not target.is_file():
            command = name[len("pipe:") :]
            log.info("%s: fetching %s", where, command)
            with atomic_file(target) as f:
                done = subprocess.run(command, shell=True, stdout=f, stderr=subprocess.PIPE)
                if done.returncode != 0:
                    raise DataError(f"{where}: {name!r} exited with status {done.returncode}: "
                                    f"{done.stderr.decode(errors='replace').strip()[-500:] or 'no message'}.")
        paths.append(target)
    return paths


@dataclass(frozen=True)
class Member:
    shard: Path
    offset: int
    size: int


class ShardImages:
    """Image members of indexed shards, read by offset: ``load(name)`` decodes, ``size(name)`` reads the header."""

    def __init__(self, members: dict[str, Member]) -> None:
        self.members = members

    def _open(self, name: str, ref: str) -> Image.Image:
        member = self.members.get(name)
        if member is None:
            raise ImageError(f"{ref}: image {name!r} is not in the shards.")
        with open(member.shard, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        try:
            return Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{ref}: image {name!r} in {str(member.shard)!r} cannot be read as an image ({err}).") from None

    def load(self, name: str, ref: str) -> Image.Image:
        image = self._open(name, ref)
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # truncated data fails only when decoded
            raise ImageError(f"{ref}: image {name!r} cannot be decoded ({err}).") from None

    def size(self, name: str, ref: str) -> tuple[int, int]:
        return self._open(name, ref).size


def read_shards(paths: Sequence[Path]) -> tuple[list[Record], ShardImages]:
    """Index shards: every sample's record (in shard order, then member order) and its image members."""
    records: list[Record] = []
    members: dict[str, Member] = {}
    for path in progress(paths, "indexing shards"):
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    if info.name.endswith(".json"):
                        raw = json.loads(tar.extractfile(info).read().decode("utf-8"))
                        records.append(parse_record(raw, len(records), str(path)))
                    else:
                        members[info.name] = Member(path, info.offset_data, info.size)
        except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"shard {str(path)!r} is not a readable tar of samples ({err}); re-create it with "
                            f"mllm-kit data convert --to wds.") from None
    if not records:
        raise DataError(f"the shards {', '.join(str(p) for p in paths[:3])} hold no samples.")
    return records, ShardImages(members)


def convert(data: str | Path, image_root: str | Path | None, out: str | Path, samples_per_shard: int = 1000,
            prefix: str = "train") -> Path:
    """Write LLaVA JSON/JSONL + image folder as ``<out>/<prefix>-NNNNNN.tar`` shards and their manifest; returns the
    manifest's path. Every record is validated first, and every image must exist. Shards are written to temporary
    names and renamed when complete."""
    data = Path(data)
    root = Path(image_root) if image_root is not None else data.parent
    raws = read_json_records(data)
    records = [parse_record(raw, i, str(data)) for i, raw in enumerate(raws)]
    if not records:
        raise DataError(f"data file {str(data)!r} holds no samples.")
    for r in records:
        for p in r.images:
            if not (root / p).is_file():
                raise DataError(f"{r.ref}: image file {str(root / p)!r} not found (check --image-root).")
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be ≥ 1, got {samples_per_shard}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    groups = [range(s, min(s + samples_per_shard, len(records))) for s in range(0, len(records), samples_per_shard)]
    for n, group in enumerate(progress(groups, "writing shards")):
        name = f"{prefix}-{n:06d}.tar"
        with atomic_file(out / name) as f:
            hashed = _Hashing(f)
            with tarfile.open(fileobj=hashed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # a stream: no seeks
                for i in group:
                    _add_sample(tar, raws[i], records[i], root)
        shards.append({"name": name, "samples": len(group), "bytes": hashed.size, "sha256": hashed.sha.hexdigest()})
    manifest = out / MANIFEST
    atomic_write_json(manifest, {"format": FORMAT, "version": 1, "source": str(data), "samples": len(records), "shards": shards})
    log.info("wrote %d samples in %d shards to %s (urls: %s)", len(records), len(shards), out,
             f"{out}/{prefix}-{{000000..{len(shards) - 1:06d}}}.tar")
    return manifest


def _add_sample(tar: tarfile.TarFile, raw: dict[str, Any], record: Record, root: Path) -> None:
    """``<key>.json`` with ``image`` naming the sample's members, then each image's bytes as ``<key>.<i>.<ext>``."""
    key = f"{record.index:09d}"
    names = [f"{key}.{j}{Path(p).suffix.lower() or '.img'}" for j, p in enumerate(record.images)]
    raw = dict(raw)
    if record.images:
        was_list = isinstance(raw.pop("images", None) or raw.get("image"), list)
        raw["image"] = names if was_list or len(names) > 1 else names[0]
    _add(tar, f"{key}.json", json.dumps(raw, ensure_ascii=False).encode("utf-8"))
    for member, p in zip(names, record.images):
        _add(tar, member, (root / p).read_bytes())


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``f``."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # byte-identical shards for identical input
    tar.addfile(info, io.BytesIO(payload))
