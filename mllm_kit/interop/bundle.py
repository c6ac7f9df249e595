"""mllm-kit bundles: any architecture, as safetensors + JSON, loadable without pickles or remote code.

A bundle is what :func:`mllm_kit.saving.save_mllm` writes (``mllm.json``, ``encoder/``, ``llm/``, the connector's or the
whole transformed model's ``*.safetensors``) plus ``bundle.json`` (the chat template, system prompt, image settings,
image-token count and stop ids a server needs to reproduce the training prompts) and ``manifest.json`` (SHA-256 and
size of every file). :func:`load_bundle` checks all of it before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mllm_kit.errors import ConfigError
from mllm_kit.files import atomic_dir
from mllm_kit.model import MLLM
from mllm_kit.saving import MLLM_CONFIG, save_mllm

BUNDLE_FILE = "bundle.json"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "mllm-kit-bundle"
# Files that Python would unpickle (torch.load, pickle): a bundle never holds one, and load_bundle refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pickles(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in _files(directory) if p.suffix.lower() in PICKLE_SUFFIXES]


def _remote_code(meta: dict[str, Any]) -> list[str]:
    return [part for part in ("encoder", "connector", "llm") if (meta.get(part) or {}).get("trust_remote_code")]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mllm-kit")
    except Exception:  # not installed as a distribution (a source checkout)
        from mllm_kit import __version__

        return __version__


def save_bundle(model: MLLM, out_dir: str | Path, template: str = "chatml", system_prompt: str | None = None,
                image_mode: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a bundle in ``out_dir`` (atomically; an existing one is refused unless ``overwrite``), with the
    data settings it was trained with: ``template``, ``system_prompt`` and ``image_mode`` (a stage's ``data`` fields)."""
    from mllm_kit.data.conversation import ConversationEncoder
    from mllm_kit.data.templates import get_template
    from mllm_kit.interop.llava import refuse_existing

    out = Path(out_dir)
    refuse_existing(out, overwrite)
    chat = get_template(template)
    transform = model.make_image_transform(image_mode)
    base = getattr(transform, "base", transform)
    members = getattr(base, "transforms", (base,))
    dynamic = model.connector.dynamic_tokens
    stops = ConversationEncoder(model.tokenizer, chat, model.image_token_id,
                                model.image_token_count()).stop_token_ids()
    settings = {
        "format": BUNDLE_FORMAT, "version": 1, "mllm_kit": _version(), "template": chat.name, "system_prompt": system_prompt,
        "image_mode": image_mode, "tokens_per_image": None if dynamic else model.tokens_per_image(),
        "image_token": model.llm.image_token, "image_token_id": model.image_token_id, "stop_token_ids": stops,
        "image": [{"size": t.size, "mode": t.mode, "mean": list(t.mean), "std": list(t.std), "grayscale": t.grayscale}
                  for t in members],
        "crops": [list(g) for g in getattr(transform, "grids", ())],
    }
    with atomic_dir(out) as tmp:
        save_mllm(model, tmp)  # replaces the (empty) temporary directory with the saved model
        meta = json.loads((tmp / MLLM_CONFIG).read_text())
        if _remote_code(meta):
            raise ConfigError(f"the model's {_remote_code(meta)} need trust_remote_code; a bundle loads without remote code. "
                              f"Use a model whose parts transformers implements.")
        pickles = _pickles(tmp)
        if pickles:
            raise ConfigError(f"saving wrote pickle files {pickles}; a bundle holds safetensors only (a component's "
                              f"save_pretrained must write safetensors).")
        (tmp / BUNDLE_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        manifest = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in _files(tmp)}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"files": manifest}, indent=2, sort_keys=True) + "\n")
    return out


def check_bundle(directory: str | Path) -> dict[str, Any]:
    """Verify a bundle without loading it: no pickle files, every file listed in the manifest with its hash, nothing
    unlisted, no remote code. Returns ``bundle.json``'s settings."""
    directory = Path(directory)
    if not (directory / BUNDLE_FILE).is_file() or not (directory / MANIFEST_FILE).is_file():
        what = "does not exist" if not directory.exists() else f"has no {BUNDLE_FILE} / {MANIFEST_FILE}"
        raise ConfigError(f"{directory} {what}: not an mllm-kit bundle (written by `mllm-kit export --to bundle`).")
    pickles = _pickles(directory)
    if pickles:
        raise ConfigError(f"{directory} holds pickle files {pickles}: a bundle is safetensors only, and loading a pickle runs "
                          f"arbitrary code. Refusing to load it; remove them if they are not yours to trust.")
    settings = json.loads((directory / BUNDLE_FILE).read_text())
    if settings.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{directory / BUNDLE_FILE}: format {settings.get('format')!r} is not {BUNDLE_FORMAT!r}.")
    listed = json.loads((directory / MANIFEST_FILE).read_text()).get("files", {})
    present = {str(p.relative_to(directory)) for p in _files(directory)} - {MANIFEST_FILE}
    unlisted = sorted(f for f in present - set(listed) if not Path(f).name.startswith("."))
    missing = sorted(set(listed) - present)
    if unlisted or missing:
        raise ConfigError(f"{directory} does not match its manifest: unlisted files {unlisted}, missing files {missing}.")
    changed = [f for f, entry in listed.items() if _sha256(directory / f) != entry.get("sha256")]
    if changed:
        raise ConfigError(f"{directory}: files changed since the bundle was written (SHA-256 differs): {sorted(changed)}.")
    meta = json.loads((directory / MLLM_CONFIG).read_text())
    if _remote_code(meta):
        raise ConfigError(f"{directory / MLLM_CONFIG}: {_remote_code(meta)} ask for trust_remote_code; a bundle loads without it.")
    return settings


def load_bundle(directory: str | Path) -> MLLM:
    """The model of a bundle, after :func:`check_bundle`; ``read_bundle_settings`` gives its data settings."""
    check_bundle(directory)
    return MLLM.from_pretrained(directory)


def read_bundle_settings(directory: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a verified bundle: template, system prompt, image settings, image-token count, stop ids."""
    return check_bundle(directory)
