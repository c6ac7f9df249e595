"""Inference on a trained model: prompts (text + images) → batched, left-padded generation or continuation scores.

:class:`Generator` encodes prompts exactly as training encoded samples (the run's template, system prompt, image
transform and per-image token counts, through :class:`~mllm_kit.data.dataset.LlavaDataset`), so a prompt at inference
is the prefix a training sample had. It serves ``mllm-kit chat`` / ``predict`` / ``eval --bench`` and the lmms-eval
backend::

    gen = Generator.from_run("runs/quickstart")
    gen.generate([Prompt("What colour is the shape?", images=["img.png"])], GenerationConfig(max_new_tokens=8))
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.config.recipe import DataSpec
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import LlavaDataset, Sample
from mllm_kit.data.formats import Record
from mllm_kit.data.images import load_image
from mllm_kit.data.templates import IMAGE_PLACEHOLDER, Turn
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.model import MLLM

ImageLike = str | Path | Image.Image


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Greedy by default; ``do_sample`` draws with ``temperature`` / ``top_p`` / ``top_k`` (``0``: off);
    ``num_beams > 1`` runs beam search. Generation ends at the template's stop tokens, at any of ``stop`` (the text is
    cut right before it) or after ``max_new_tokens``. ``seed`` makes sampling repeatable without touching the global RNG."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy decoding), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.num_beams < 1:
            raise ConfigError(f"top_k must be ≥ 0 and num_beams ≥ 1, got top_k={self.top_k}, num_beams={self.num_beams}.")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty.")
        object.__setattr__(self, "stop", tuple(self.stop))

    def hf_kwargs(self) -> dict[str, Any]:
        """The matching ``transformers`` ``generate`` arguments."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: neutral values, so a model's generation_config does not warn about or apply its own
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationTiming:
    """Wall time a :class:`Generator` spent, split where the prefill ends: ``prefill_s`` covers the images (encoder,
    connector) and the forward over the prompts, ``decode_s`` the token-by-token steps after it (CUDA is synchronised
    at both marks). Counts: ``prompts``, ``prompt_tokens`` (padding excluded), ``new_tokens`` (up to each row's stop)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0

    def summary(self) -> str:
        per_token = self.decode_s / max(self.new_tokens, 1) * 1000
        return (f"prefill {self.prefill_s:.2f} s for {self.prompts} prompts ({self.prompt_tokens} tokens), decode "
                f"{self.decode_s:.2f} s for {self.new_tokens} tokens ({per_token:.1f} ms/token)")


@dataclass
class Prompt:
    """One user turn to answer. ``images`` fill the ``<image>`` placeholders of ``history`` and ``text`` in order;
    images without a placeholder are put at the start of ``text``, one line each, as LLaVA's data does.
    ``history``: earlier user/assistant turns; ``system`` replaces the run's system prompt."""

    text: str
    images: Sequence[ImageLike] = ()
    history: Sequence[Turn] = ()
    system: str | None = None
    id: str | None = None

    def turns(self) -> tuple[Turn, ...]:
        placed = sum(t.content.count(IMAGE_PLACEHOLDER) for t in (*self.history, Turn("user", self.text)))
        if placed > len(self.images):
            raise DataError(f"prompt {self.id or self.text[:40]!r}: {placed} {IMAGE_PLACEHOLDER} placeholder(s) but "
                            f"{len(self.images)} image(s).")
        text = f"{IMAGE_PLACEHOLDER}\n" * (len(self.images) - placed) + self.text
        system = () if self.system is None else (Turn("system", self.system),)
        return (*system, *self.history, Turn("user", text))


class _PromptImages:
    """The image source a prompt dataset reads: names ``"<k>"`` index the prompts' images (paths or PIL images)."""

    def __init__(self) -> None:
        self.items: list[ImageLike] = []

    def add(self, image: ImageLike) -> str:
        self.items.append(image)
        return str(len(self.items) - 1)

    def load(self, name: str, ref: str) -> Image.Image:
        item = self.items[int(name)]
        return item.convert("RGB") if isinstance(item, Image.Image) else load_image(item, ref)

    def size(self, name: str, ref: str) -> tuple[int, int]:
        return self.load(name, ref).size


@dataclass
class Generator:
    """A model with the data view it was trained with. ``data``: the stage's :class:`DataSpec` (template, system prompt,
    image mode, ``max_length``). Prompts longer than ``max_length`` are an error here, never silently trimmed."""

    model: MLLM
    data: DataSpec = field(default_factory=DataSpec)
    timing: GenerationTiming = field(default_factory=GenerationTiming)

    def __post_init__(self) -> None:
        from mllm_kit.training.data import model_view

        self.model.eval()
        self.view = model_view(self.model, self.data)
        self.stop_token_ids = self.view.encoder.stop_token_ids()
        self.stop_strings = [s for s in self.view.encoder.template.stop_strings(self.model.tokenizer) if s]

    @classmethod
    def from_run(cls, run_dir: str | Path, stage: str | None = None, device: str | torch.device | None = None,
                 connector: dict[str, Any] | None = None, efficiency: dict[str, Any] | None = None) -> Generator:
        """The final weights of ``stage`` (default: the last finished one) of a run directory, with that stage's data
        view; ``connector`` sets connector options that hold no weights (e.g. a Matryoshka ``scale``); ``efficiency``
        changes the visual-token efficiency method the stage trained with (:func:`~mllm_kit.efficiency.override_efficiency`:
        ``{"ratio": 0.75}``, ``{"method": "none"}``)."""
        from mllm_kit.efficiency import override_efficiency
        from mllm_kit.training.state import finished_stage, read_run

        recipe, state = read_run(run_dir)
        chosen = finished_stage(recipe, state, stage)
        model = MLLM.from_pretrained(state.final_dir(chosen.name), connector=connector)
        override_efficiency(model, efficiency)
        if device is not None:
            model.to(device)
        return cls(model, chosen.data)

    @property
    def efficiency_spec(self) -> dict[str, Any] | None:
        """The visual-token efficiency method the model generates with (``None``: every token)."""
        return getattr(self.model.efficiency, "build_spec", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- encoding -----------------------------------------------------------------------------------------------
    def samples(self, prompts: Sequence[Prompt], replies: Sequence[str] | None = None) -> list[Sample]:
        """Encode prompts (``replies``: each prompt's assistant reply, supervised, for scoring) as training did."""
        images = _PromptImages()
        records = []
        for k, prompt in enumerate(prompts):
            turns = prompt.turns()
            if replies is not None:
                turns = (*turns, Turn("assistant", replies[k]))
            records.append(Record(k, prompt.id, tuple(images.add(im) for im in prompt.images), turns, "prompts"))
        dataset = LlavaDataset("prompts", None, self.view.encoder, self.view.image_transform, self.data.max_length,
                               "drop", prompt=replies is None, records=records, instruction=self.view.instruction, images=images,
                               max_bad_fraction=0.0)
        out = []
        for k, prompt in enumerate(prompts):
            sample = dataset.get(k)
            if not isinstance(sample, Sample):
                raise DataError(f"prompt {prompt.id or k!r}: {sample} tokens exceed the run's data.max_length="
                                f"{self.data.max_length}; shorten the prompt or its history.")
            out.append(sample)
        return out

    def batch(self, samples: Sequence[Sample], padding_side: str = "left") -> Batch:
        return PadCollator(self.model.tokenizer.pad_token_id, padding_side=padding_side)(samples).to(self.device)

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig = GenerationConfig(), batch_size: int = 8) -> list[str]:
        """Answers to ``prompts``, in order, batched (longest first, so padding is small) with left padding."""
        samples = self.samples(prompts)
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
        answers: list[str] = [""] * len(samples)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, text in zip(rows, self._generate_batch(self.batch([samples[i] for i in rows]), config)):
                answers[i] = text
        return answers

    def _generate_batch(self, batch: Batch, config: GenerationConfig, streamer: Any = None) -> list[str]:
        kwargs = config.hf_kwargs()
        if config.stop:  # ends a row early on the host; the text is cut exactly below
            kwargs.update(stop_strings=list(config.stop), tokenizer=self.model.tokenizer)
        if streamer is not None:
            kwargs["streamer"] = streamer
        marks: list[float] = []

        def prefill_done(module, args, output) -> None:
            if not marks:
                marks.append(_clock(self.device))

        handle = self.model.llm.model.get_decoder().register_forward_hook(prefill_done)
        start = _clock(self.device)
        try:
            with _seeded(config.seed):
                new = self.model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                          stop_token_ids=self.stop_token_ids, crop_pixel_values=batch.crop_pixel_values,
                                          crop_grids=batch.crop_grids or None, instruction_ids=batch.instruction_ids,
                                          instruction_mask=batch.instruction_mask, image_sizes=batch.image_sizes or None,
                                          images_per_sample=batch.images_per_sample or None, row_lengths=batch.row_lengths,
                                          **kwargs)
        finally:
            handle.remove()
        end = _clock(self.device)
        texts, lengths = self._decoded(new)
        t = self.timing
        t.prefill_s += (marks[0] if marks else end) - start
        t.decode_s += end - (marks[0] if marks else end)
        t.prompts += len(batch)
        t.prompt_tokens += sum(batch.row_lengths or [])
        t.new_tokens += sum(lengths)
        return [cut_at_stop(text, config.stop) for text in texts]

    def decode(self, new: torch.Tensor) -> list[str]:
        """Decode ``[B, new]`` ids up to each row's first stop token (what follows is padding)."""
        return self._decoded(new)[0]

    def _decoded(self, new: torch.Tensor) -> tuple[list[str], list[int]]:
        stops = torch.tensor(self.stop_token_ids, device=new.device)
        ended = torch.isin(new, stops)
        lengths = torch.where(ended.any(1), ended.int().argmax(1), new.shape[1]).tolist()
        texts = self.model.tokenizer.batch_decode([row[:n] for row, n in zip(new.tolist(), lengths)], skip_special_tokens=True)
        return texts, lengths

    def stream(self, prompt: Prompt, config: GenerationConfig = GenerationConfig()) -> Iterator[str]:
        """The answer to one prompt as text pieces while it is generated; stop strings are held back until they can be
        told apart from text, so the pieces join to exactly :meth:`generate`'s answer."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.model.tokenizer, skip_special_tokens=True)
        batch = self.batch(self.samples([prompt]))
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self._generate_batch(batch, config, streamer)
            except BaseException as err:  # re-raised in the caller's thread
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from hold_back_stops(streamer, config.stop)
        thread.join()
        if errors:
            raise errors[0]

    # -- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, prompts: Sequence[Prompt], continuations: Sequence[str], batch_size: int = 8) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | prompt), whether greedy decoding gives it)`` per pair: the continuation is scored as
        the assistant's reply, without the template's stop token (multiple choice by option likelihood)."""
        if len(prompts) != len(continuations):
            raise ConfigError(f"loglikelihood: {len(prompts)} prompts but {len(continuations)} continuations.")
        samples = self.samples(prompts, continuations)
        stops = set(self.stop_token_ids)
        out: list[tuple[float, bool]] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = self.batch(chunk, padding_side="right")
            labels = batch.labels.clone()
            for row, sample in enumerate(chunk):  # the reply's trailing stop token is the template's, not the option's
                supervised = (sample.labels != IGNORE_INDEX).nonzero().flatten().tolist()
                while supervised and int(sample.labels[supervised[-1]]) in stops:
                    labels[row, supervised.pop()] = IGNORE_INDEX
            target = labels[:, 1:]
            rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
            output = self.model(batch)
            logp = torch.log_softmax(output.head(output.hidden[rows, cols]).float(), dim=-1)
            gold = target[rows, cols]
            token_logp = logp.gather(1, gold[:, None]).squeeze(1)
            greedy = logp.argmax(-1) == gold
            totals = torch.zeros(len(chunk), device=logp.device).index_add_(0, rows, token_logp)
            misses = torch.zeros(len(chunk), device=logp.device).index_add_(0, rows, (~greedy).float())
            out.extend((float(t), bool(m == 0)) for t, m in zip(totals.tolist(), misses.tolist()))
        return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cuts = [k for k in (text.find(s) for s in stops) if k >= 0]
    return text[: min(cuts)] if cuts else text


def hold_back_stops(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Re-chunk streamed text so no stop string (or its beginning, while undecided) is ever yielded."""
    pending = ""
    for piece in pieces:
        pending += piece
        cut = cut_at_stop(pending, stops)
        if len(cut) < len(pending):
            if cut:
                yield cut
            return
        keep = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    if pending:
        yield pending


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
