"""MLLM = vision encoder → connector → language model (DESIGN.md, "Data flow")."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_kit.batch import Batch
from mllm_kit.connectors.base import Connector, ConnectorOutput, build_connector
from mllm_kit.context import ForwardContext
from mllm_kit.data.transforms import BaseTransform, CropGridTransform
from mllm_kit.encoders.base import VisionEncoder
from mllm_kit.errors import ConfigError, MllmKitError
from mllm_kit.layers.reports import Reports, add_aux, expert_metrics
from mllm_kit.llm.base import LanguageModel
from mllm_kit.llm.decoding import bound, recompute_context
from mllm_kit.llm.steps import LayerStep
from mllm_kit.registry import ENCODERS, LLMS, Registry
from mllm_kit.saving import load_mllm, save_mllm


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
        self.efficiency: Any = None  # a token-efficiency method (mllm_kit.efficiency): its drop steps join every call
        self._reporters: list[nn.Module] = []
        self._step_sources: list[nn.Module] = []

    def record_transform(self, spec: Mapping[str, Any] | None) -> None:
        """Transforms that change the model's structure record their spec here, so that :meth:`from_pretrained`
        can rebuild the structure before loading the trained weights (``None`` records nothing, e.g. after
        ``merge_lora`` removed what ``add_lora`` added). Then the modules that transforms added are found again, by
        what their classes declare:

        * ``reports_aux = True``: its forward takes ``report`` — a callable it gives its aux losses and metrics (MoE
          layers), bound for each forward and summed over layers into :attr:`MLLMOutput.aux_losses`;
        * ``layer_steps(ctx) -> [LayerStep]``: contributes steps to each call (the LoRA-MoE instance gate, which reads
          ``ctx.instruction``: each sample's instruction embeddings).
        """
        if spec is not None:
            self.transforms.append(dict(spec))
        modules = [*self.encoder.modules(), *self.llm.modules()]  # connectors report through ConnectorOutput
        self._reporters = [m for m in modules if getattr(type(m), "reports_aux", False)]
        self._step_sources = [m for m in modules if callable(getattr(m, "layer_steps", None))]

    @property
    def reads_instruction(self) -> bool:
        """Whether a module reads each sample's instruction (then datasets supply ``instruction_ids``)."""
        return bool(self._step_sources) or bool(getattr(self.connector, "reads_instruction", False))

    def set_efficiency(self, spec: Mapping[str, Any] | str | None, where: str = "model.efficiency") -> None:
        """Use a token-efficiency method (``{"method": "fastv", "layer": 2, "ratio": 0.5}``, a registered name, or
        ``{"_target_": ...}``) in every later forward and generation; ``None`` turns it off. Checked against this
        model here (``where`` names the recipe key in errors)."""
        from mllm_kit.efficiency import build_efficiency

        self.efficiency = build_efficiency(spec, self, where)

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
        no activations for backward anyway). The recompute re-installs the hooks of the call that ran the forward
        (:func:`~mllm_kit.llm.decoding.recompute_context`), so arguments bound for that call reach the same modules."""
        self.llm.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_context})
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
        text_context: tuple[torch.Tensor, torch.Tensor] | None = None,
        crop_pixel_values: torch.Tensor | None = None,
        crop_grids: list[tuple[int, int]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        connector_options: Mapping[str, Any] | None = None,
    ) -> ConnectorOutput:
        """``[n_img, 3, H, W]`` (a mixture's: ``[n_img, Σ 3·Hᵢ·Wᵢ]``), optional high-resolution crops and each image's
        original ``(width, height)`` → connector output with ``tokens [n_img, N, D]`` (``[Σ Nᵢ, D]`` when dynamic).
        ``text_context``: each image's instruction embeddings and mask (``[n_img, L, D]``, ``[n_img, L]``) for a
        connector that reads it; ``connector_options``: per-call connector arguments (a Matryoshka ``scale``)."""
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
        options = dict(connector_options or {})
        try:
            return self.connector(features, text_context=text_context, **options)
        except TypeError as err:
            if options and "unexpected keyword" in str(err):
                raise ConfigError(f"connector {type(self.connector).__name__} takes no per-call option(s) {sorted(options)}: "
                                  f"{err}") from None
            raise

    def embed_inputs(self, batch: Batch, connector_options: Mapping[str, Any] | None = None,
                     generating: bool = False) -> tuple[torch.Tensor, ForwardContext]:
        """Input embeddings ``[B, T, D]`` with visual tokens at the image positions, and the call's context.

        The context carries what layer steps read (:class:`~mllm_kit.context.ForwardContext`), the connector's output,
        and, when a module reads it (a LoRA-MoE instance gate, MoVA's gate), each sample's instruction embeddings: of
        ``batch.instruction_ids`` (one row per sample), else of the prompt before the first answer (image positions
        excluded). Packed rows need the instruction ids.
        """
        input_ids = batch.input_ids
        embeds = self.llm.embed(input_ids)
        instruction = self._instruction(batch, embeds) if self.reads_instruction else None
        image_mask = input_ids == self.image_token_id
        pixel_values = batch.pixel_values
        visual = None
        if pixel_values is None or pixel_values.shape[0] == 0:
            if batch.num_image_tokens:
                raise ImageTokenMismatch(f"batch has {batch.num_image_tokens} image-token positions but no images.")
            if self.training:
                embeds = embeds + 0.0 * self._dummy_visual_sum(embeds)
        else:
            text_context = None
            if instruction is not None and getattr(self.connector, "reads_instruction", False):
                text_context = _per_image(instruction, batch.images_per_sample or [1] * len(batch), pixel_values.shape[0])
            visual = self.encode_images(pixel_values, text_context, batch.crop_pixel_values, batch.crop_grids or None,
                                        batch.image_sizes or None, connector_options)
            tokens = visual.tokens
            positions = batch.num_image_tokens if batch.num_image_tokens is not None else int(image_mask.sum())
            produced = tokens.shape[0] * tokens.shape[1] if tokens.dim() == 3 else tokens.shape[0]
            if positions != produced:
                made = f"{tokens.shape[0]} images × {tokens.shape[1]} tokens = {produced}" if tokens.dim() == 3 else f"{produced} tokens"
                expected = ("model.tokens_per_image(image_size) ids (the count depends on each image's size)" if self.connector.dynamic_tokens
                            else f"model.tokens_per_image() = {self.tokens_per_image()} ids")
                raise ImageTokenMismatch(
                    f"the batch has {positions} image-token positions but the connector produced {made}. Expand each <image> "
                    f"to {expected} in the data pipeline, and never truncate inside an image span."
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), tokens.to(embeds.dtype))
        ctx = ForwardContext(
            input_ids=input_ids, image_mask=image_mask, tokens_per_image=self._tokens_per_image(batch, visual),
            images_per_sample=tuple(batch.images_per_sample or ([1] * len(batch) if batch.num_images else [0] * len(batch))),
            attention_mask=batch.attention_mask, position_ids=batch.position_ids, segments=batch.segments,
            seq_lens=tuple(tuple(r) for r in batch.seq_lens) if batch.seq_lens is not None else None,
            row_lengths=tuple(batch.row_lengths) if batch.row_lengths is not None else None,
            instruction_mask=batch.prompt_mask(), labels=batch.labels, num_answer_spans=batch.num_answer_spans,
            instruction=instruction, visual=visual, generating=generating)
        return embeds, ctx

    def layer_steps(self, ctx: ForwardContext) -> list[LayerStep]:
        """What this call does inside the LLM: the connector's steps (DeepStack injections, SVA rewrites), the stage
        transforms' (gates) and the token-efficiency method's (drops)."""
        steps = list(ctx.visual.steps) if ctx.visual is not None else []
        for source in self._step_sources:
            steps.extend(source.layer_steps(ctx))
        if self.efficiency is not None and ctx.num_images:
            steps.extend(self.efficiency.layer_steps(ctx))
        return steps

    def _tokens_per_image(self, batch: Batch, visual: ConnectorOutput | None) -> tuple[int, ...]:
        if visual is None:
            return ()
        n = batch.num_images
        if self.connector.dynamic_tokens:
            return tuple(self.tokens_per_image(tuple(size)) for size in batch.image_sizes)
        return (visual.tokens.shape[1],) * n

    def _instruction(self, batch: Batch, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [S, L, D], mask [S, L])`` of each sample's instruction (see :meth:`embed_inputs`)."""
        if batch.instruction_ids is not None:
            ids = batch.instruction_ids
            mask = batch.instruction_mask.bool() if batch.instruction_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            return self.llm.embed(ids), mask
        if batch.segments is not None:
            raise ConfigError("packed rows hold several samples, so an instance-level gate needs each sample's "
                              "instruction_ids (the dataset adds them for a model that reads the instruction).")
        mask = batch.prompt_mask()
        if mask is None:
            mask = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(batch.input_ids, dtype=torch.bool)
        return embeds, mask & (batch.input_ids != self.image_token_id)

    def _dummy_visual_sum(self, like: torch.Tensor) -> torch.Tensor:
        # Text-only batches still run the vision path so that every rank calls the same sharded
        # modules under FSDP/ZeRO-3 (anchors.md §9.5); the result is multiplied by zero.
        context = None
        if getattr(self.connector, "reads_instruction", False):
            context = (like[:1], torch.ones(like[:1].shape[:2], dtype=torch.bool, device=like.device))
        out = self.encode_images(self.encoder.dummy_pixels(like.device), context)
        total = out.tokens.sum()
        for step in out.steps:  # Cambrian's re-aggregators, with the tokens standing in as queries
            fn = getattr(step, "fn", None)
            if fn is not None:
                total = total + fn(out.tokens.reshape(-1, out.tokens.shape[-1])).sum()
        return total.to(like.dtype)

    def forward(self, batch: Batch, output_hidden_states: bool = False,
                connector_options: Mapping[str, Any] | None = None) -> MLLMOutput:
        """One forward: embed (encoder → connector → visual tokens), then the decoder with this call's layer steps.
        ``connector_options``: per-call connector arguments (an objective's pass, e.g. ``{"scale": 36}``)."""
        reports = Reports()
        with bound(self._reporters, report=reports.add):
            embeds, ctx = self.embed_inputs(batch, connector_options)
            steps = self.layer_steps(ctx)
            out = self.llm.decode(embeds, ctx, steps, output_hidden_states=output_hidden_states)
        aux = dict(ctx.visual.aux_losses) if ctx.visual is not None else {}
        metrics = {}
        for name, value in (ctx.visual.metrics if ctx.visual is not None else {}).items():  # e.g. MoVA's gate weights
            metrics.update(expert_metrics(name, value))
        for step in steps:
            reports.add(step.aux_losses, step.metrics)
        add_aux(aux, reports.aux_losses)
        for name, value in reports.mean_metrics().items():
            metrics.update(expert_metrics(f"llm_{name}", value))
        return MLLMOutput(hidden=out.last_hidden_state, head=self.llm.head, aux_losses=aux,
                          hidden_states=out.hidden_states if output_hidden_states else None, metrics=metrics)

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
        row_lengths: list[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (by default) generation with a KV cache; prompts must be left-padded. Returns ``[B, new]`` ids.

        The call's layer steps act in the prefill pass (injections, rewrites and drops touch the prompt); decode passes
        run on the KV cache the prefill wrote (after a drop: the kept tokens' keys only). ``instruction_ids`` /
        ``instruction_mask`` ``[B, L]`` feed an instance-level gate (LoRA-MoE) as in training (datasets supply them);
        without them it reads the whole prompt. ``row_lengths``: each prompt's length (host; lets a token drop leave the
        padding out of the later layers).
        """
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ConfigError("generate() needs left-padded prompts (collate with padding_side='left').")
        n = 0 if pixel_values is None else pixel_values.shape[0]
        batch = Batch(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      images_per_sample=list(images_per_sample) if images_per_sample is not None else ([1] * len(input_ids) if n else []),
                      num_image_tokens=None, crop_pixel_values=crop_pixel_values, crop_grids=list(crop_grids or []),
                      image_sizes=list(image_sizes or []), instruction_ids=instruction_ids, instruction_mask=instruction_mask,
                      row_lengths=list(row_lengths) if row_lengths is not None else None)
        reports = Reports()
        with bound(self._reporters, report=reports.add):
            embeds, ctx = self.embed_inputs(batch, generating=True)
            steps = self.layer_steps(ctx)
            if kwargs.get("num_beams", 1) > 1 and any(s.layer >= 0 for s in steps):
                raise ConfigError("beam search reorders the KV cache, which the call's layer steps (injections, token "
                                  "dropping) do not follow; use num_beams=1.")
            tok = self.llm.tokenizer
            kwargs.setdefault("do_sample", False)
            with self.llm.stepping(ctx, steps):
                return self.llm.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                               eos_token_id=stop_token_ids or [tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                               **kwargs)


def _per_image(instruction: tuple[torch.Tensor, torch.Tensor], images_per_sample: Sequence[int],
               num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's instruction rows repeated once per image of that sample (a connector gates per image)."""
    text, mask = instruction
    counts = list(images_per_sample)
    if len(counts) != text.shape[0] or sum(counts) != num_images:
        raise ConfigError(f"the connector reads each image's instruction, but images_per_sample {counts} does not fit "
                          f"{text.shape[0]} samples with {num_images} images.")
    per_image = torch.tensor(counts, device=text.device)
    return (text.repeat_interleave(per_image, dim=0, output_size=num_images),
            mask.repeat_interleave(per_image, dim=0, output_size=num_images))


def _registered(registry: Registry[Any], spec: Any, group: str) -> Any:
    if isinstance(spec, str) and spec not in registry and "." not in spec:
        raise ConfigError(f"{registry.kind} {spec!r} is not a registered name; if it is a preset, resolve it first: "
                          f"mllm_kit.config.resolve_component({group!r}, {spec!r}) (or resolve_model for all three parts).")
    return spec
