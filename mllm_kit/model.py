"""MLLM = vision encoder → connector → language model (DESIGN.md, "Data flow")."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_kit.batch import Batch
from mllm_kit.connectors.base import Connector, ConnectorOutput, add_aux, build_connector
from mllm_kit.encoders.base import VisionEncoder
from mllm_kit.data.transforms import BaseTransform, CropGridTransform
from mllm_kit.errors import ConfigError, MllmKitError
from mllm_kit.llm.base import LanguageModel
from mllm_kit.registry import ENCODERS, LLMS, Registry
from mllm_kit.saving import MLLM_CONFIG, load_mllm, save_mllm



@dataclass
class MLLMOutput:
    """What one forward produced, before the LM head.

    ``hidden [B, T, D]``: the LLM's final hidden states (after its last norm); ``head``: ``[..., D] → [..., V]``, the
    LM head (with any logit soft-capping). Objectives apply ``head`` only at the positions they read
    (:mod:`mllm_kit.objectives.head`), so nothing materialises ``[B, T, V]`` unless it asks for :attr:`logits`.
    ``aux_losses`` from the connector and LLM-side modules (MoE layers), weighted by the recipe; ``metrics``: detached
    statistics to log (e.g. per-expert token fractions); ``hidden_states``: every layer's, when asked for.
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """``[B, T, V]`` at every position (computed once, on first use)."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits


class ImageTokenMismatch(MllmKitError):
    """The number of image-token positions differs from the number of visual tokens produced."""


class MLLM(nn.Module):
    """Owns the three parts; writes visual tokens into the LLM input embeddings at image-token positions."""

    def __init__(self, encoder: VisionEncoder, connector: Connector, llm: LanguageModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.transforms: list[dict[str, Any]] = []
        self._aux_modules: list[nn.Module] = []
        self._context_modules: list[nn.Module] = []

    def record_transform(self, spec: Mapping[str, Any] | None) -> None:
        """Transforms that change the model's structure record their spec here, so that :meth:`from_pretrained`
        can rebuild the structure before loading the trained weights (``None`` records nothing, e.g. after
        ``merge_lora`` removed what ``add_lora`` added). Then the modules that transforms added are found again:

        * ``aux_losses`` / ``metrics`` (dicts, refreshed by each forward): summed into the loss parts / logged;
        * ``set_context(text_embeds [B, L, D], mask [B, L])``: called before each LLM forward with the token
          embeddings of each sample's instruction — what an instance-level gate reads (LoRA-MoE); see
          :meth:`embed_inputs`.
        """
        if spec is not None:
            self.transforms.append(dict(spec))
        modules = [*self.encoder.modules(), *self.llm.modules()]  # connectors report through ConnectorOutput
        self._aux_modules = [m for m in modules if isinstance(getattr(m, "aux_losses", None), dict)]
        self._context_modules = [m for m in modules if callable(getattr(m, "set_context", None))]

    @property
    def reads_instruction(self) -> bool:
        """Whether a module reads each sample's instruction (then datasets supply ``instruction_ids``)."""
        return bool(self._context_modules) or self._connector_reads_context

    @property
    def _connector_reads_context(self) -> bool:
        return callable(getattr(self.connector, "set_context", None))

    @classmethod
    def build(cls, encoder: Any, connector: Mapping[str, Any] | str | None = None, llm: Mapping[str, Any] | str | None = None) -> MLLM:
        """Build from resolved component specs — ``{"name": registered_name, **options}``, ``{"_target_":
        "pkg.mod.Class", **options}`` or a registered name — or from one :class:`~mllm_kit.config.ModelSpec`.
        Presets are expanded once, by :func:`mllm_kit.config.resolve_model` (recipe loading does it)::

            MLLM.build(resolve_model("clip_vit_l14_336", "mlp2x_gelu", "vicuna_7b_v15"))
        """
        if connector is None and llm is None:  # a ModelSpec
            encoder, connector, llm = encoder.encoder, encoder.connector, encoder.llm
        enc = ENCODERS.build(_registered(ENCODERS, encoder, "encoders"))
        lm = LLMS.build(_registered(LLMS, llm, "llms"))
        conn = build_connector(connector, enc.feature_dims, lm.hidden_size, enc.grid, enc.feature_grids,
                               enc.feature_names, enc.image_transform.size, enc.feature_depths)
        return cls(enc, conn, lm)

    # -- saving and loading ----------------------------------------------------------------------
    def enable_activation_checkpointing(self) -> None:
        """Recompute every LLM block in backward, and every encoder block when the encoder trains (a frozen one keeps
        no activations for backward anyway)."""
        self.llm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.enable_activation_checkpointing()

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` every encoder block and LLM decoder layer in place (``nn.Module.compile``: parameter names
        and checkpoints are unchanged). Blocks, not the whole model, because the model's forward has data-dependent
        steps (image-token scatter, MoE dispatch sizes) that would split or recompile one big graph; a block sees the
        same shapes every step of a padded or packed run, so it compiles once per sequence length."""
        for block in [*self.encoder.blocks, *self.llm.decoder_layers]:
            block.compile(**options)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model atomically (:func:`mllm_kit.saving.save_mllm` says what goes where)."""
        return save_mllm(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, connector: Mapping[str, Any] | None = None) -> MLLM:
        """Load what :meth:`save_pretrained` wrote. ``connector`` changes connector options that hold no
        weights (e.g. a Matryoshka model's inference ``scale``)."""
        return load_mllm(cls, directory, connector)

    # -- what the data pipeline needs to know -------------------------------------------------
    def tokens_per_image(self, image_size: tuple[int, int] | None = None) -> int:
        """N: visual tokens one image of ``image_size = (width, height)`` occupies in the LLM sequence. Most connectors
        give every image the same N (the size is not needed); with ``dynamic_tokens`` (AnyRes) it is required."""
        if self.connector.dynamic_tokens:
            if image_size is None:
                raise ConfigError(f"connector {type(self.connector).__name__} gives each image a number of visual tokens "
                                  f"that depends on its size; pass tokens_per_image(image_size=(width, height)).")
            return self.connector.tokens_for_image(tuple(image_size), self.encoder.num_tokens, self.encoder.grid)
        return self.connector.num_tokens(self.encoder.num_tokens, self.encoder.grid)

    def image_token_count(self) -> int | Callable[[tuple[int, int]], int]:
        """What the data pipeline expands each ``<image>`` to: N, or N as a function of the image's (width, height)."""
        return self.tokens_per_image if self.connector.dynamic_tokens else self.tokens_per_image()

    def make_image_transform(self, mode: str | None = None) -> BaseTransform | CropGridTransform:
        """The encoder's transform (``mode`` overrides its resize mode), with the high-resolution crops the
        connector reads when it reads any."""
        transform = self.encoder.image_transform
        if mode is not None:
            transform = transform.with_mode(mode)
        candidates = self.connector.crop_candidates()
        if candidates:
            return CropGridTransform(transform, tuple(candidates))
        return transform

    @contextlib.contextmanager
    def connector_options(self, **options: Any) -> Iterator[None]:
        """Set connector attributes for the passes inside the block (e.g. a Matryoshka ``scale``); restored after.
        An objective that runs several passes per batch asks for them (see :meth:`Objective.passes`)."""
        missing = [k for k in options if not hasattr(self.connector, k)]
        if missing:
            raise ConfigError(f"connector {type(self.connector).__name__} has no option(s) {missing} to set for a pass.")
        previous = {k: getattr(self.connector, k) for k in options}
        try:
            for k, v in options.items():
                setattr(self.connector, k, v)
            yield
        finally:
            for k, v in previous.items():
                setattr(self.connector, k, v)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    # -- forward ------------------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        text_context: torch.Tensor | None = None,
        crop_pixel_values: torch.Tensor | None = None,
        crop_grids: list[tuple[int, int]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> ConnectorOutput:
        """``[n_img, 3, H, W]`` (a mixture's: ``[n_img, Σ 3·Hᵢ·Wᵢ]``), optional high-resolution crops and each image's
        original ``(width, height)`` → connector output with ``tokens [n_img, N, D]`` (``[Σ Nᵢ, D]`` when dynamic)."""
        if crop_pixel_values is None:
            features = self.encoder.features(pixel_values)
        elif not self.connector.crop_candidates():
            raise ConfigError(f"the batch carries high-resolution crops but connector {type(self.connector).__name__} reads none.")
        else:
            features = self.connector.encode_views(self.encoder, pixel_values, crop_pixel_values, list(crop_grids or []))
        if not torch.is_autocast_enabled(pixel_values.device.type):  # autocast casts per op; otherwise the connector's dtype
            dtype = next((p.dtype for p in self.connector.parameters() if p.is_floating_point()), None)
            features = [f.to(dtype) for f in features] if dtype is not None else features
        if image_sizes is not None:
            for f in features:
                f.image_sizes = [tuple(size) for size in image_sizes]
        return self.connector(features, text_context=text_context)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        num_image_tokens: int | None = None,
        crop_pixel_values: torch.Tensor | None = None,
        crop_grids: list[tuple[int, int]] | None = None,
        instruction: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        images_per_sample: list[int] | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ConnectorOutput | None]:
        """Input embeddings ``[B, T, D]`` with visual tokens at image positions.

        When the connector returns ``injections`` (DeepStack) or ``rewrites`` (Cambrian's re-aggregation), they are armed
        on the LLM for the next forward.
        Modules that read each sample's instruction (see :meth:`record_transform`) get the embeddings of
        ``instruction = (ids [B, L], mask [B, L] or None)``, or, when it is an ``[B, T]`` mask alone (no ids), the
        embeddings of ``input_ids`` where it is set, image positions excluded. A connector that reads it (MoVA's gate)
        gets the same rows repeated per image (``images_per_sample``, default one image per sample). Packed rows
        (``segments`` ``[B, T]``, :class:`~mllm_kit.batch.Batch`) need the instruction ids, one row per sample.
        """
        embeds = self.llm.embed(input_ids)
        self.llm.injector.clear()
        if self._context_modules or self._connector_reads_context:
            ids, mask = instruction if instruction is not None else (None, None)
            if segments is not None and ids is None:
                raise ConfigError("packed rows hold several samples, so an instance-level gate needs each sample's "
                                  "instruction_ids (the dataset adds them for a model that reads the instruction).")
            if ids is not None:
                text = self.llm.embed(ids)
                mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            else:
                text = embeds
                mask = (input_ids != self.image_token_id) & (True if mask is None else mask.bool())
            for module in self._context_modules:  # a module takes segments only when it must gate packed rows
                if segments is None:
                    module.set_context(text, mask)
                else:
                    module.set_context(text, mask, segments)
            if self._connector_reads_context and pixel_values is not None and pixel_values.shape[0]:
                counts = images_per_sample if images_per_sample is not None else [1] * text.shape[0]
                if len(counts) != text.shape[0] or sum(counts) != pixel_values.shape[0]:
                    raise ConfigError(f"the connector reads each image's instruction, but images_per_sample {list(counts)} does "
                                      f"not fit {text.shape[0]} samples with {pixel_values.shape[0]} images.")
                per_image = torch.tensor(counts, device=text.device)
                self.connector.set_context(text.repeat_interleave(per_image, dim=0, output_size=sum(counts)),
                                           mask.repeat_interleave(per_image, dim=0, output_size=sum(counts)))
        if pixel_values is None or pixel_values.shape[0] == 0:
            if num_image_tokens:
                raise ImageTokenMismatch(f"batch has {num_image_tokens} image-token positions but no images.")
            if self.training:
                embeds = embeds + 0.0 * self._dummy_visual_sum(embeds)
            return embeds, None
        out = self.encode_images(pixel_values, crop_pixel_values=crop_pixel_values, crop_grids=crop_grids, image_sizes=image_sizes)
        tokens = out.tokens
        mask = input_ids == self.image_token_id
        positions = num_image_tokens if num_image_tokens is not None else int(mask.sum())
        produced = tokens.shape[0] * tokens.shape[1] if tokens.dim() == 3 else tokens.shape[0]
        if positions != produced:
            made = f"{tokens.shape[0]} images × {tokens.shape[1]} tokens = {produced}" if tokens.dim() == 3 else f"{produced} tokens"
            expected = ("model.tokens_per_image(image_size) ids (the count depends on each image's size)" if self.connector.dynamic_tokens
                        else f"model.tokens_per_image() = {self.tokens_per_image()} ids")
            raise ImageTokenMismatch(
                f"the batch has {positions} image-token positions but the connector produced {made}. Expand each <image> "
                f"to {expected} in the data pipeline, and never truncate inside an image span."
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype))
        if out.injections or out.rewrites:
            self.llm.injector.arm(out.injections, mask, positions, out.rewrites)
        return embeds, out

    def _dummy_visual_sum(self, like: torch.Tensor) -> torch.Tensor:
        # Text-only batches still run the vision path so that every rank calls the same sharded
        # modules under FSDP/ZeRO-3 (anchors.md §9.5); the result is multiplied by zero.
        if self._connector_reads_context:
            self.connector.set_context(like[:1], torch.ones(like[:1].shape[:2], dtype=torch.bool, device=like.device))
        out = self.encode_images(self.encoder.dummy_pixels(like.device))
        total = out.tokens.sum()
        for rewrite in (out.rewrites or {}).values():  # Cambrian's re-aggregators, with the tokens standing in as queries
            total = total + rewrite(out.tokens.reshape(-1, out.tokens.shape[-1])).sum()
        return total.to(like.dtype)

    def forward(self, batch: Batch, output_hidden_states: bool = False) -> MLLMOutput:
        embeds, visual = self.embed_inputs(batch.input_ids, batch.pixel_values, batch.num_image_tokens,
                                           batch.crop_pixel_values, batch.crop_grids, _instruction(batch),
                                           batch.image_sizes or None, batch.images_per_sample or None, batch.segments)
        out = self.llm.decode(embeds, batch.attention_mask, batch.position_ids, output_hidden_states=output_hidden_states)
        aux = dict(visual.aux_losses) if visual is not None else {}
        metrics = self._collect_llm_aux(aux)
        for name, value in getattr(self.connector, "metrics", {}).items():  # e.g. MoVA's per-expert gate weights
            metrics.update({f"{name}_e{i}": v for i, v in enumerate(value.unbind())} if value.dim() else {name: value})
        return MLLMOutput(hidden=out.last_hidden_state, head=self.llm.head, aux_losses=aux,
                          hidden_states=out.hidden_states if output_hidden_states else None, metrics=metrics)

    def _collect_llm_aux(self, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum the aux losses of modules that transforms added over layers (as MoE-LLaVA does) and average their
        statistics for logging; a statistic with one value per expert is logged as ``llm_<name>_e<i>``."""
        if not self._aux_modules:
            return {}
        stats: dict[str, list[torch.Tensor]] = {}
        for module in self._aux_modules:
            add_aux(aux, module.aux_losses)
            for name, value in getattr(module, "metrics", {}).items():
                stats.setdefault(name, []).append(value)
        metrics: dict[str, torch.Tensor] = {}
        for name, values in stats.items():
            mean = torch.stack(values).mean(dim=0)
            if mean.dim() == 0:
                metrics[f"llm_{name}"] = mean
            else:
                metrics.update({f"llm_{name}_e{i}": v for i, v in enumerate(mean.unbind())})
        return metrics

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        stop_token_ids: list[int] | None = None,
        crop_pixel_values: torch.Tensor | None = None,
        crop_grids: list[tuple[int, int]] | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        images_per_sample: list[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (by default) generation with a KV cache; prompts must be left-padded. Returns ``[B, new]`` ids.

        Injections (DeepStack) apply to the prefill pass only; decode steps reuse the cached keys and values.
        ``instruction_ids``/``instruction_mask`` ``[B, L]`` feed an instance-level gate (LoRA-MoE) as in training
        (datasets supply them); without them it reads the whole prompt.
        """
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ConfigError("generate() needs left-padded prompts (collate with padding_side='left').")
        # Without instruction ids an instance-level gate reads the whole prompt.
        instruction = (instruction_ids, instruction_mask) if instruction_ids is not None else (None, attention_mask)
        embeds, _ = self.embed_inputs(input_ids, pixel_values, crop_pixel_values=crop_pixel_values, crop_grids=crop_grids,
                                      instruction=instruction, image_sizes=image_sizes, images_per_sample=images_per_sample)
        tok = self.llm.tokenizer
        eos = stop_token_ids or [tok.eos_token_id]
        kwargs.setdefault("do_sample", False)
        self.llm.injector.once = True
        try:
            return self.llm.model.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
                **kwargs,
            )
        finally:
            self.llm.injector.clear()


def _registered(registry: Registry[Any], spec: Any, group: str) -> Any:
    if isinstance(spec, str) and spec not in registry and "." not in spec:
        raise ConfigError(f"{registry.kind} {spec!r} is not a registered name; if it is a preset, resolve it first: "
                          f"mllm_kit.config.resolve_component({group!r}, {spec!r}) (or resolve_model for all three parts).")
    return spec


def _instruction(batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What an instance-level gate reads: the batch's instruction ids, else its prompt before the first answer."""
    if batch.instruction_ids is not None:
        return batch.instruction_ids, batch.instruction_mask
    return None, batch.prompt_mask()
