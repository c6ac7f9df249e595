"""An `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ model backend for mllm-kit runs (the ``eval`` extra).

``lmms-eval --model mllm_kit --model_args run=DIR,stage=sft --tasks ...`` evaluates a run directory through
:class:`~mllm_kit.inference.Generator`, so prompts are encoded exactly as the stage's training samples were (its
template, system prompt, image transform and per-image token counts). lmms-eval finds the backend in one of two ways:

- the ``lmms_eval.models`` entry-point group, pointing at :func:`manifest` (lmms-eval ≥ 0.7; no environment needed);
- ``LMMS_EVAL_PLUGINS=mllm_kit.interop.lmms_eval_plugin`` (the older, deprecated plugin variable: lmms-eval imports
  ``<plugin>.models`` and reads its ``AVAILABLE_MODELS``; its CLI also adds ``<plugin>.tasks`` to the task search path).

``model_args``: ``run`` (the run directory, required), ``stage`` (default: the last finished one), ``device`` (default:
``--device``, else CPU; with several ranks, ``cuda`` or nothing means ``cuda:$LOCAL_RANK``), ``batch_size`` (default 8;
wins over ``--batch_size``, whose default is 1), ``max_new_tokens`` (when a task sets none; default 128) and
``system_prompt`` (replaces the run's system prompt; text or a file path).

This module imports without lmms-eval; building :class:`MLLMKit` without it raises an ImportError saying which extra to
install. :func:`generation_config` (lmms-eval ``generation_kwargs`` → :class:`~mllm_kit.inference.GenerationConfig`)
needs no lmms-eval either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mllm_kit.errors import ConfigError, DataError
from mllm_kit.inference import GenerationConfig, Generator, Prompt
from mllm_kit.log import get_logger

INSTALL_HINT = "pip install 'mllm-kit[eval]'"
MODEL_NAME = "mllm_kit"  # the name lmms-eval's --model takes

try:  # the extra is optional: without it this module still imports (for generation_config and a clear error)
    from lmms_eval.api.model import lmms as _LmmsBase

    _IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # pragma: no cover - exercised only where lmms-eval is absent
    _IMPORT_ERROR = err

    class _LmmsBase:  # type: ignore[no-redef]
        """Stands in for ``lmms_eval.api.model.lmms`` when lmms-eval is not installed."""

        def __init__(self) -> None:
            raise ImportError(f"The lmms-eval backend needs lmms-eval: {INSTALL_HINT} ({_IMPORT_ERROR}).")


log = get_logger(__name__)

# lmms-eval generation_kwargs this backend maps; tasks also send model-specific keys (image_aspect_ratio, ...),
# which are ignored with one warning per key.
GEN_KWARGS = ("until", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams", "seed")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".gif")


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ConfigError(f"generation_kwargs {key}={value!r}: expected true or false.")


def _number(value: Any, key: str, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"generation_kwargs {key}={value!r}: expected a number.") from None


def generation_config(gen_kwargs: Mapping[str, Any] | None, max_new_tokens: int = 128) -> GenerationConfig:
    """lmms-eval ``generation_kwargs`` → :class:`~mllm_kit.inference.GenerationConfig`.

    ``until`` (a string or a list) becomes ``stop`` (empty strings dropped); ``max_new_tokens`` defaults to the
    argument. Decoding samples only when ``do_sample`` is true, or absent with ``temperature > 0`` (lmms-eval's own
    backends decide by temperature), and never at ``temperature == 0`` or ``top_p <= 0`` (both mean greedy);
    greedy decoding ignores ``temperature`` / ``top_p`` / ``top_k``. ``num_beams`` and ``seed`` pass through.
    Other keys are ignored (:func:`ignored_gen_kwargs` lists them)."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until")
    if until is None:
        stops: tuple[str, ...] = ()
    elif isinstance(until, str):
        stops = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        stops = tuple(until)
    else:
        raise ConfigError(f"generation_kwargs until={until!r}: expected a string or a list of strings.")
    stops = tuple(dict.fromkeys(s for s in stops if s))

    new_tokens = kw.get("max_new_tokens")
    new_tokens = max_new_tokens if new_tokens is None else _number(new_tokens, "max_new_tokens", int)
    temperature = kw.get("temperature")
    temperature = None if temperature is None else _number(temperature, "temperature", float)
    top_p = kw.get("top_p")
    top_p = None if top_p is None else _number(top_p, "top_p", float)
    top_k = kw.get("top_k")
    top_k = 0 if top_k is None else _number(top_k, "top_k", int)
    num_beams = kw.get("num_beams")
    num_beams = 1 if num_beams is None else _number(num_beams, "num_beams", int)
    seed = kw.get("seed")
    seed = None if seed is None else _number(seed, "seed", int)

    do_sample = kw.get("do_sample")
    sample = _as_bool(do_sample, "do_sample") if do_sample is not None else (temperature or 0.0) > 0
    if temperature is not None and temperature <= 0:
        sample = False
    if top_p is not None and top_p <= 0:
        sample = False
    if not sample:
        return GenerationConfig(max_new_tokens=new_tokens, num_beams=num_beams, stop=stops, seed=seed)
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, top_k=top_k, num_beams=num_beams, stop=stops, seed=seed)


def ignored_gen_kwargs(gen_kwargs: Mapping[str, Any] | None) -> list[str]:
    """The keys of ``gen_kwargs`` that :func:`generation_config` does not use."""
    return sorted(k for k in (gen_kwargs or {}) if k not in GEN_KWARGS)


def parse_batch_size(value: Any, default: int = 8) -> int:
    """``batch_size`` from model_args or ``--batch_size``: ``N``, or ``auto`` / ``auto:N`` (→ ``default``: no search)."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return default
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size={value!r}: expected a positive integer or 'auto'.") from None
    if size < 1:
        raise ConfigError(f"batch_size={value!r}: expected a positive integer.")
    return size


def visuals_to_images(visuals: Any, where: str = "document") -> list[Any]:
    """A task's ``doc_to_visual`` output (``None``, a PIL image, a path, or nested lists of them) → the image list of a
    :class:`~mllm_kit.inference.Prompt`. Videos and audio are refused: mllm-kit models read images."""
    from PIL import Image

    out: list[Any] = []

    def walk(item: Any) -> None:
        if item is None:
            return
        if isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, (str, Path)):
            if str(item).lower().endswith(VIDEO_SUFFIXES):
                raise DataError(f"{where}: visual {str(item)!r} is a video; mllm-kit models read images only.")
            out.append(item)
        elif isinstance(item, Mapping):
            kind = "audio" if "array" in item or "sampling_rate" in item else "a mapping"
            raise DataError(f"{where}: visual is {kind} ({sorted(item)[:5]}); mllm-kit models read images "
                            "(PIL images or image file paths) only.")
        elif isinstance(item, Iterable) and not isinstance(item, (bytes, bytearray)):
            for sub in item:
                walk(sub)
        else:
            raise DataError(f"{where}: visual of type {type(item).__name__} is not an image (PIL image or file path).")

    walk(visuals)
    return out


class MLLMKit(_LmmsBase):
    """lmms-eval backend: one mllm-kit run (``run=DIR``, ``stage=NAME``) answering ``generate_until``,
    ``generate_until_multi_round`` and ``loglikelihood`` requests on this rank's share of the documents (lmms-eval
    shards documents by ``RANK`` / ``WORLD_SIZE``; this backend only puts each rank on its own device)."""

    is_simple = True

    def __init__(self, run: str | None = None, stage: str | None = None, device: str | None = None,
                 batch_size: int | str | None = None, max_new_tokens: int | str = 128, system_prompt: str | None = None,
                 max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(f"mllm_kit model_args: unknown {sorted(kwargs)}; known: run, stage, device, batch_size, "
                              "max_new_tokens, system_prompt.")
        if not run:
            raise ConfigError("mllm_kit model_args: run=DIR is required (a run directory made by `mllm-kit fit`).")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world_size > 1 and device in (None, "cuda"):  # one GPU per rank, not every rank on cuda:0
            import torch

            device = f"cuda:{local_rank}" if torch.cuda.is_available() else device
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = world_size
        self.generator = Generator.from_run(run, stage or None, device)
        self.run, self.stage = str(run), stage
        self.batch_size_per_device = parse_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MLLMKit:
        """Like lmms-eval's, but ``model_args`` win over the CLI's ``--batch_size`` / ``--device`` (which lmms-eval
        always passes, ``--batch_size`` with its default 1) instead of clashing with them."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    # -- what lmms-eval reads ----------------------------------------------------------------------------------
    @property
    def model(self):
        return self.generator.model

    @property
    def tokenizer(self):
        return self.generator.model.tokenizer

    @property
    def device(self):
        return self.generator.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # -- requests ------------------------------------------------------------------------------------------
    def _doc(self, request: Any, doc_id: Any, task: str, split: str) -> Any:
        datasets = getattr(self, "task_dict", {})
        if task in datasets:
            return datasets[task][split][doc_id]
        if getattr(request, "doc", None) is not None:
            return request.doc
        raise ConfigError(f"lmms-eval task {task!r}: its documents are unknown to the model (run it through "
                          "lmms_eval.evaluator.simple_evaluate, which fills model.task_dict).")

    def _images(self, request: Any, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(request, doc_id, task, split)) if callable(doc_to_visual) else doc_to_visual
        return visuals_to_images(visuals, f"{task} document {doc_id}")

    def _prompt(self, text: str, images: Sequence[Any], ref: str) -> Prompt:
        return Prompt(text, images=tuple(images), system=self.system_prompt, id=ref)

    def _config(self, gen_kwargs: Mapping[str, Any] | None) -> GenerationConfig:
        for key in ignored_gen_kwargs(gen_kwargs):
            if key not in self._warned:
                self._warned.add(key)
                log.warning("lmms-eval generation_kwargs %r is not used by the mllm_kit backend (uses: %s).", key,
                            ", ".join(GEN_KWARGS))
        return generation_config(gen_kwargs, self.max_new_tokens)

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, disable=self.rank != 0, desc=desc)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Requests ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``: batches of ``batch_size``
        sharing generation kwargs, longest context first; answers in request order."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(i)
        bar = self._progress(len(requests), "mllm_kit generate_until")
        for rows in groups.values():
            config = self._config(requests[rows[0]].args[1])
            rows = sorted(rows, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images = self._images(requests[i], doc_to_visual, doc_id, task, split)
                    prompts.append(self._prompt(context, images, f"{task}/{split}/{doc_id}"))
                for i, text in zip(chunk, self.generator.generate(prompts, config, batch_size=self.batch_size)):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Requests ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``. Round 0 answers
        the context; each later round asks the task's ``doc_to_text(doc, previous_output=, round_idx=,
        previous_round_info=)`` for ``(visuals, context, terminal, round_results, info)`` and stops when ``terminal``
        (lmms-eval's protocol). Returns each document's list of round answers."""
        out: list[list[str]] = []
        bar = self._progress(len(requests), "mllm_kit generate_until_multi_round")
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            config = self._config(gen_kwargs)
            doc = self._doc(request, doc_id, task, split)
            images = self._images(request, doc_to_visual, doc_id, task, split)
            rounds: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, rounds, info = doc_to_text(doc, previous_output=list(rounds),
                                                                           round_idx=round_idx, previous_round_info=info)
                    rounds = list(rounds)
                    if terminal:
                        break
                    images = visuals_to_images(visuals, f"{task} document {doc_id} round {round_idx}")
                ref = f"{task}/{split}/{doc_id}/round{round_idx}"
                rounds.append(self.generator.generate([self._prompt(context, images, ref)], config, batch_size=1)[0])
                round_idx += 1
            out.append(rounds)
            bar.update(1)
        bar.close()
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Requests ``(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`` or ``(context,
        continuation)`` (multiple choice's unconditional terms): ``(Σ log p(continuation), is greedy)``. The
        continuation is scored as the assistant's reply, without the leading target delimiter (``" A"`` → ``"A"``),
        as a chat model would write it."""
        items: list[tuple[Prompt, str]] = []
        for request in requests:
            args = request.args
            if len(args) == 2:
                context, target = args
                images: list[Any] = []
                ref = "unconditional"
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                images = self._images(request, doc_to_visual, doc_id, task, split)
                ref = f"{task}/{split}/{doc_id}"
                if callable(target):
                    target = target(self._doc(request, doc_id, task, split))
            if isinstance(target, (list, tuple)):
                target = target[0]
            items.append((self._prompt(context, images, ref), str(target).lstrip()))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(items)  # an empty continuation has log p = 0
        scored = [i for i, (_, cont) in enumerate(items) if cont]
        bar = self._progress(len(requests), "mllm_kit loglikelihood")
        bar.update(len(items) - len(scored))
        for start in range(0, len(scored), self.batch_size):
            chunk = scored[start : start + self.batch_size]
            pairs = self.generator.loglikelihood([items[i][0] for i in chunk], [items[i][1] for i in chunk],
                                                 batch_size=self.batch_size)
            for i, pair in zip(chunk, pairs):
                results[i] = pair
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], pair)
            bar.update(len(chunk))
        bar.close()
        return _survive_unwrap(results)


def _survive_unwrap(pairs: list[tuple[float, bool]]) -> list[Any]:
    """lmms-eval 0.7's evaluator passes every response through ``unwrap_generation_output``, which turns a
    ``(logp, is_greedy)`` tuple into its ``str()`` (then ``multiple_choice`` scoring fails to unpack it). Where it
    does, each pair goes out inside a ``GenerationResult``, whose ``text`` it hands on untouched; older versions get
    the plain tuples they expect."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return pairs
    if unwrap_generation_output((0.0, True))[0] == (0.0, True):
        return pairs
    return [GenerationResult(text=pair) for pair in pairs]  # type: ignore[arg-type]


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's registry record for ``--model mllm_kit``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MLLMKit")
