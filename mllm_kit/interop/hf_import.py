"""``mllm-kit import --from hf-llava DIR --out RUN``: a local transformers LLaVA checkpoint as a run directory.

The run holds one finished stage (``imported``) whose ``final/`` is the converted model, a ``state.json`` that marks it
done and a ``recipe.yaml`` describing the model and the data settings read from the checkpoint's processor (chat
template, image preprocessing), so a recipe continues from it with ``init_from: RUN`` (or ``RUN:imported``), and
``mllm-kit eval`` / ``mllm-kit export`` read it like any run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mllm_kit.errors import ConfigError
from mllm_kit.files import atomic_dir
from mllm_kit.log import get_logger

log = get_logger(__name__)

IMPORTED_STAGE = "imported"
CANDIDATE_TEMPLATES = ("vicuna_v1", "chatml", "llama3", "phi3", "plain")


def _llava_config(src: Path) -> dict[str, Any]:
    file = src / "config.json"
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory: `mllm-kit import --from hf-llava` reads a local LLaVA-HF checkpoint "
                          f"directory (config.json with model_type llava, weights, processor files).")
    if not file.is_file():
        raise ConfigError(f"{src} is not a transformers checkpoint (no config.json); give a LlavaForConditionalGeneration directory.")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from None
    model_type = config.get("model_type")
    if model_type != "llava":
        hint = (" LLaVA-NeXT/OneVision checkpoints (AnyRes tiles) do not import; only LlavaForConditionalGeneration does."
                if str(model_type).startswith("llava") else "")
        raise ConfigError(f"{src} is not a LLaVA checkpoint: config.json has model_type {model_type!r}, not 'llava' "
                          f"(transformers' LlavaForConditionalGeneration).{hint}")
    return config


def _size(value: Any, key: str) -> int | None:
    if value is None:
        return None
    got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return int(got) if got else None


def image_options(ip: Any, image_size: int) -> tuple[dict[str, Any], list[str]]:
    """Encoder options (``mean``, ``std``, ``image_mode``) reproducing a transformers image processor, and what of it
    mllm-kit does not reproduce (warnings)."""
    notes: list[str] = []
    options: dict[str, Any] = {"mean": [float(m) for m in ip.image_mean], "std": [float(s) for s in ip.image_std]}
    size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
    if getattr(ip, "do_pad", False):
        options["image_mode"], target = "pad", _size(size, "height")
    elif getattr(ip, "do_center_crop", False):
        options["image_mode"], target = "center_crop", _size(size, "shortest_edge")
        if _size(crop, "height") != target or _size(crop, "width") != target:
            notes.append(f"crop_size {crop} differs from the resized short side {target}")
    else:
        options["image_mode"], target = "resize", _size(size, "height")
    if target != image_size:
        notes.append(f"the processor resizes to {target}, the vision tower takes {image_size} (mllm-kit resizes to {image_size})")
    if int(getattr(ip, "resample", 3) or 3) != 3:
        notes.append(f"resample {getattr(ip, 'resample', None)} is not bicubic (mllm-kit resizes bicubic)")
    if not getattr(ip, "do_normalize", True) or not getattr(ip, "do_rescale", True):
        notes.append("the processor does not rescale and normalise (mllm-kit does)")
    return options, notes


def _probe_messages(turns: Any, as_lists: bool) -> list[dict[str, Any]]:
    out = []
    for t in turns:
        if not as_lists:
            out.append({"role": t.role, "content": t.content})
            continue
        items: list[dict[str, Any]] = []
        for k, part in enumerate(t.content.split("<image>")):
            if k:
                items.append({"type": "image"})
            part = part.strip("\n")
            if part:
                items.append({"type": "text", "text": part})
        out.append({"role": t.role, "content": items})
    return out


def detect_template(tok: Any, chat_template: str | None) -> tuple[str | None, str | None, bool]:
    """``(template, system_prompt, exact)``: the built-in template (and system prompt: ``None`` = the template's default,
    ``""`` = none) whose prompts equal ``chat_template``'s renderings of probe conversations with list contents — on
    every probe (``exact``) or on the single-turn one only; else ``hf`` when ``chat_template`` accepts string contents,
    else ``(None, None, False)``."""
    from mllm_kit.data.templates import get_template
    from mllm_kit.interop.processor import PROBES

    if not chat_template:
        return None, None, False

    def theirs(turns: Any, as_lists: bool = True) -> str | None:
        try:
            text = tok.apply_chat_template(_probe_messages(turns, as_lists), chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=True)
        except Exception:  # a template that fails on the probe (e.g. one that insists on list contents)
            return None
        return text.removeprefix(tok.bos_token) if tok.bos_token else text

    def ours(name: str, system: str | None, turns: Any) -> str:
        if system is not None and turns[0].role != "system":
            turns = [type(turns[0])("system", system), *turns]
        return "".join(s.text for s in get_template(name).render_prompt(list(turns), tok))

    rendered = [theirs(turns) for turns in PROBES]
    partial = None
    for name in CANDIDATE_TEMPLATES:
        for system in (None, ""):
            hits = [r == ours(name, system, turns) for r, turns in zip(rendered, PROBES)]
            if all(hits):
                return name, system, True
            if hits[0] and partial is None:
                partial = (name, system)
    if partial is not None:
        return partial[0], partial[1], False
    text = theirs(PROBES[0], as_lists=False)
    if text is not None and "What color is the shape?" in text and "<image>" in text:
        return "hf", None, False
    return None, None, False


def _exported_settings(src: Path) -> dict[str, Any] | None:
    from mllm_kit.interop.llava import EXPORT_INFO

    file = src / EXPORT_INFO
    return json.loads(file.read_text()) if file.is_file() else None


def import_hf_llava(src_dir: str | Path, run_dir: str | Path, overwrite: bool = False, stage: str = IMPORTED_STAGE) -> Path:
    """Convert the LLaVA-HF checkpoint ``src_dir`` (``LlavaForConditionalGeneration.from_pretrained``, its
    ``AutoProcessor`` or ``AutoTokenizer``) with :func:`~mllm_kit.interop.llava.from_hf_llava` and write the run directory
    ``run_dir`` (atomically; an existing one is refused unless ``overwrite``). Weights load in float32 (an exact upcast);
    ``mllm-kit export --dtype`` writes them back in the checkpoint's dtype."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.interop.llava import from_hf_llava, refuse_existing
    from mllm_kit.saving import MLLM_CONFIG
    from mllm_kit.training.state import STATE_FILE, RunState, write_recipe

    src, run = Path(src_dir), Path(run_dir)
    config = _llava_config(src)
    refuse_existing(run, overwrite)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"cannot load {src} as a LlavaForConditionalGeneration: {err}") from None
    try:
        processor = AutoProcessor.from_pretrained(src)  # only its settings are read
        tok, ip = getattr(processor, "tokenizer", processor), getattr(processor, "image_processor", None)
        chat = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    except (OSError, ValueError, KeyError, TypeError):
        try:
            tok, ip = AutoTokenizer.from_pretrained(src), None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{src} has neither a processor nor a tokenizer that transformers can load: {err}") from None
        chat = getattr(tok, "chat_template", None)
    image_size = int(llava.config.vision_config.image_size)
    encoder_options: dict[str, Any] = {}
    if ip is not None:
        encoder_options, notes = image_options(ip, image_size)
        for note in notes:
            log.warning("import %s: the image processor is not reproduced exactly: %s", src, note)
    else:
        log.warning("import %s: no image processor; the encoder's default preprocessing is used", src)
    exported = _exported_settings(src)
    if exported is not None:
        template, system_prompt, exact = exported["template"], exported.get("system_prompt"), True
    else:
        template, system_prompt, exact = detect_template(tok, chat)
    if template == "hf" and chat:
        tok.chat_template = chat
    if template is None:
        log.warning("import %s: its chat template matches no built-in template; the run's data.template is chatml — set "
                    "data.template (or template: hf) in the recipe that continues from it", src)
    elif not exact:
        log.warning("import %s: chat template taken as %r (system prompt %r); it matches the checkpoint's single-turn "
                    "prompt, not every probe — check data.template before fine-tuning", src, template, system_prompt)
    final_rel = f"{stage}/final"
    with tempfile.TemporaryDirectory(prefix="mllm-kit-import-") as parts, atomic_dir(run) as tmp:
        model = from_hf_llava(llava, tok, parts, encoder_options)
        del llava
        model.save_pretrained(tmp / final_rel)
        meta = json.loads((tmp / final_rel / MLLM_CONFIG).read_text())
        model_spec = {}
        for part in ("encoder", "connector", "llm"):
            spec = {k: v for k, v in meta[part].items() if v is not None}
            if part != "connector":
                spec["path"] = str((run / final_rel / spec["path"]).resolve())
            model_spec[part] = spec
        data: dict[str, Any] = {"template": template or "chatml"}
        if system_prompt is not None:
            data["system_prompt"] = system_prompt
        recipe = recipe_from_dict({
            "name": f"imported-{src.resolve().name}",
            "description": f"the LLaVA-HF checkpoint {src.resolve()} imported by mllm-kit (stage {stage!r}: no training)",
            "model": model_spec, "data": data,
            "stages": [{"name": stage, "trainable": ["connector"]}],
        })
        write_recipe(tmp, recipe)
        state = RunState(tmp / STATE_FILE)
        state.mark(stage, status="done", final=final_rel, steps=0, imported_from=str(src.resolve()),
                   source_dtype=str(config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")))
    log.info("imported %s into %s (stage %s, template %s, %d image tokens per image)", src, run, stage, template or "chatml",
             model.tokens_per_image())
    return run
