"""One training step's FLOPs: :class:`StepFlops` analyses a model once, then counts each batch from host-side numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from mllm_kit.batch import Batch
from mllm_kit.flops.connectors import Context, Features, approximate, connector_flops
from mllm_kit.flops.encoders import ENCODER_FLOPS, approximate_encoder, hidden_grads, members
from mllm_kit.flops.llm import decoder_flops, gate_flops, head_flops, scoring_flops, text_grad
from mllm_kit.flops.tally import CROP, IMAGE, PAIR, ROW, SAMPLE, TOKEN, VIEW, FlopsUnavailable, Needs, Rate, Tally
from mllm_kit.llm.steps import dropped_by
from mllm_kit.objectives.head import CHUNK_SIZE

PARTS = ("encoder", "connector", "llm", "head")
VISION = ("encoder", "connector")


@dataclass(frozen=True)
class PartFlops:
    """FLOPs of one part in one step: ``forward``, ``backward`` (the gradient products) and ``recompute`` (forwards run
    again under activation checkpointing)."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.model + self.recompute

    def __add__(self, other: PartFlops) -> PartFlops:
        return PartFlops(self.forward + other.forward, self.backward + other.backward, self.recompute + other.recompute)

    def __mul__(self, k: float) -> PartFlops:
        return PartFlops(self.forward * k, self.backward * k, self.recompute * k)


@dataclass(frozen=True)
class FlopCount:
    """Per-part FLOPs of a step (``encoder``, ``connector``, ``llm``: the decoder layers, ``head``: the LM head; a
    distillation step adds its teacher's forward as ``teacher.encoder``, ...). ``model_flops`` excludes recomputation (MFU), ``hardware_flops`` includes
    it (HFU); ``without_vision`` keeps the language model's parts only (what an LLM-only count would report)."""

    parts: Mapping[str, PartFlops] = field(default_factory=dict)

    def _sum(self, attr: str) -> float:
        return sum(getattr(p, attr) for p in self.parts.values())

    @property
    def forward(self) -> float:
        return self._sum("forward")

    @property
    def backward(self) -> float:
        return self._sum("backward")

    @property
    def recompute(self) -> float:
        return self._sum("recompute")

    @property
    def model_flops(self) -> float:
        return self._sum("model")

    @property
    def hardware_flops(self) -> float:
        return self._sum("hardware")

    @property
    def without_vision(self) -> FlopCount:
        return FlopCount({k: v for k, v in self.parts.items() if k.rpartition(".")[2] not in VISION})

    def __add__(self, other: FlopCount) -> FlopCount:
        names = list(dict.fromkeys([*self.parts, *other.parts]))
        return FlopCount({k: self.parts.get(k, PartFlops()) + other.parts.get(k, PartFlops()) for k in names})

    def __mul__(self, k: float) -> FlopCount:
        return FlopCount({name: p * k for name, p in self.parts.items()})

    def as_dict(self) -> dict[str, float]:
        out = {f"{name}_{kind}": getattr(p, kind) for name, p in self.parts.items() for kind in ("forward", "backward", "recompute")}
        return {**out, "model_flops": self.model_flops, "hardware_flops": self.hardware_flops}


@dataclass(frozen=True)
class Units:
    """Host-side counts of one batch, what the rates are per: encoder ``views`` (images + crops, or the blank image a
    text-only training batch runs), connector ``images`` and ``crops``, LLM ``tokens`` (positions, B·T), attention
    ``pairs``, instance-gate ``samples``, LM-head ``rows``; and for throughput ``real_tokens`` (positions that are not
    padding) and ``sequences``. ``streams``: after each token drop (:mod:`mllm_kit.efficiency`), the ``(tokens, pairs)``
    the later decoder layers run on."""

    views: int
    images: int
    crops: int
    tokens: int
    pairs: int
    samples: int
    rows: int
    real_tokens: int
    sequences: int
    streams: tuple[tuple[int, int], ...] = ()

    def of(self, unit: str) -> int:
        return {VIEW: self.views, IMAGE: self.images, CROP: self.crops, TOKEN: self.tokens, PAIR: self.pairs,
                SAMPLE: self.samples, ROW: self.rows}[unit]

    @classmethod
    def of_batch(cls, batch: Batch, training: bool = True, head_rows: int | None = None, useful: bool = False) -> Units:
        """Reads shapes and host lists only — never a device tensor's values, so counting costs no device sync.

        Attention pairs: a padded row attends over its whole padded length as the kernels compute it (B·T²: SDPA and
        eager attention get a padding mask and compute every score); a packed row (``seq_lens``) over each sample by
        itself — Σ nᵢ², the row's padding tail a sequence of its own — as flash-attention's varlen kernel computes it.
        Every position, padding included, goes through the projections. ``useful``: count the samples alone instead —
        positions that are not padding and each sample's own n² (``row_lengths`` / ``seq_lens``), what the batch's
        samples would cost run one by one.
        """
        b, width = (int(n) for n in batch.input_ids.shape)
        images = batch.num_images
        crops = 0 if batch.crop_pixel_values is None else int(batch.crop_pixel_values.shape[0])
        if images == 0 and training:
            images = 1  # a training batch without images runs the vision path on one blank image (× 0)
        if batch.seq_lens is not None:
            pairs = sum(sum(n * n for n in row) + (width - sum(row)) ** 2 for row in batch.seq_lens)
            real = sum(sum(row) for row in batch.seq_lens)
            sequences = sum(len(row) for row in batch.seq_lens)
        else:
            pairs = b * width * width
            real = sum(batch.row_lengths) if batch.row_lengths is not None else b * width
            sequences = b
        samples = int(batch.instruction_ids.shape[0]) if batch.instruction_ids is not None else sequences
        rows = head_rows if head_rows is not None else (batch.num_loss_tokens if batch.num_loss_tokens is not None else b * width)
        tokens = b * width
        if useful:
            if batch.seq_lens is not None:
                pairs = sum(n * n for row in batch.seq_lens for n in row)
            elif batch.row_lengths is not None:
                pairs = sum(n * n for n in batch.row_lengths)
            tokens = real
        return cls(views=images + crops, images=images, crops=crops, tokens=tokens, pairs=pairs, samples=samples,
                   rows=int(rows), real_tokens=int(real), sequences=sequences)


def _needs(trainable: bool | None) -> Needs:
    if trainable is None:
        return lambda p: bool(p.requires_grad)
    return (lambda p: True) if trainable else (lambda p: False)


class StepFlops:
    """Closed-form FLOPs of a training step of ``model`` as it is now — which parameters train (``trainable``: None
    reads ``requires_grad``; False: a forward without gradients, e.g. a frozen teacher; True: everything trains),
    training mode, activation checkpointing. The analysis runs once; each call multiplies its per-unit rates by a
    batch's host-side :class:`Units`.

    ``strict=False`` counts a component without a formula as every parameter once per token (``approximate`` names
    it) instead of raising :class:`~mllm_kit.flops.FlopsUnavailable`. ``head_chunk``: the objective's chunk size — with
    more supervised rows than that, each chunk's head is checkpointed and runs again in backward (recompute).
    """

    def __init__(self, model: nn.Module, trainable: bool | None = None, strict: bool = True, head_chunk: int = CHUNK_SIZE) -> None:
        needs = _needs(trainable)
        self.training = bool(model.training)
        self.head_chunk = head_chunk
        self.approximate: list[str] = []
        tallies = {part: Tally(needs) for part in PARTS}
        encoder, connector, llm = model.encoder, model.connector, model.llm
        encoders = members(encoder)
        grids = encoder.feature_grids
        features = [Features(tokens=m.num_tokens if tuple(g) == tuple(m.grid) else g[0] * g[1], width=c, grid=tuple(g),
                             grads=tuple(hidden_grads(m, needs)), selected=m.selected_layer)
                    for m, c, g in zip(encoders, encoder.feature_dims, grids)]
        text = text_grad(llm, needs)
        try:
            visual = connector_flops(connector, features, tallies["connector"], Context(text_grad=text))
        except FlopsUnavailable:
            if strict:
                raise
            self.approximate.append(f"connector {type(connector).__name__}")
            tokens = connector.num_tokens(features[0].tokens, features[0].grid)
            visual = approximate(connector, features, tallies["connector"], Context(), tokens)
        try:
            ENCODER_FLOPS.lookup(encoder)(encoder, tallies["encoder"], visual.reads)
        except FlopsUnavailable:
            if strict:
                raise
            self.approximate.append(f"encoder {type(encoder).__name__}")
            approximate_encoder(encoder, tallies["encoder"])
        # A token-dropping method splits the decoder into streams: each is counted per its own positions.
        self.drops = list(model.efficiency.drops()) if getattr(model, "efficiency", None) is not None else []
        self.streams = [Tally(needs) for _ in self.drops]
        starts = [d.layer for d in self.drops]
        stream_of = lambda layer: sum(layer >= s for s in starts)  # noqa: E731
        tally_of = lambda layer: tallies["llm"] if stream_of(layer) == 0 else self.streams[stream_of(layer) - 1]  # noqa: E731
        layers = decoder_flops(llm, tallies["llm"], visual.grad or text, visual.injections, visual.rewrites, tally_of)
        for drop in self.drops:
            scoring_flops(llm, tally_of(drop.layer - 1), drop.scored_at)
        self.image_tokens = model.tokens_per_image if connector.dynamic_tokens else None
        gate_flops(llm, tallies["llm"], text)
        if visual.rewrite_flops is not None:
            visual.rewrite_flops(dict(enumerate(layers)), tallies["connector"])
        self.head_input_grad = layers[-1] if layers else visual.grad or text
        head_flops(llm, tallies["head"], self.head_input_grad)
        self.rates: dict[str, dict[str, Rate]] = {part: t.rates for part, t in tallies.items()}

    def units(self, batch: Batch, head_rows: int | None = None, useful: bool = False) -> Units:
        units = Units.of_batch(batch, self.training, head_rows, useful)
        return dataclasses.replace(units, streams=self._streams(batch, useful)) if self.drops and batch.num_images else units

    def _streams(self, batch: Batch, useful: bool) -> tuple[tuple[int, int], ...]:
        """``(tokens, pairs)`` of the positions each stream after a drop runs on — the arithmetic of
        :class:`~mllm_kit.llm.decoding.DecodeCall` on host counts: rows leave their padding (when their lengths are
        known) and their dropped image tokens behind, the batch narrows to its longest row (shorter rows end in filler
        slots); a packed row's samples attend within themselves."""
        n_img = batch.num_images
        counts = ([self.image_tokens(tuple(size)) for size in batch.image_sizes] if self.image_tokens is not None
                  else [(batch.num_image_tokens or 0) // n_img] * n_img)
        per_sample = batch.images_per_sample or [1] * len(batch)
        sample_of = [s for s, n in enumerate(per_sample) for _ in range(n)]
        lengths = [n for row in batch.seq_lens for n in row] if batch.seq_lens is not None else None
        width = int(batch.input_ids.shape[1])
        rows = [width] * len(batch) if batch.row_lengths is None else list(batch.row_lengths)
        original, out = list(counts), []
        for drop in self.drops:
            kept = drop.keep_counts(counts, original)
            cut = dropped_by(sample_of, counts, kept, len(per_sample))
            counts = kept
            if lengths is None:  # padded: a sample per row
                rows = [r - c for r, c in zip(rows, cut)]
                narrow = max(rows)
                out.append((narrow * len(rows), narrow * narrow * len(rows)) if not useful else (sum(rows), sum(r * r for r in rows)))
                continue
            lengths = [n - c for n, c in zip(lengths, cut)]
            start, row_sums = 0, []
            for row in batch.seq_lens:
                row_sums.append(sum(lengths[start : start + len(row)]))
                start += len(row)
            tails = [r - sum(row) for r, row in zip(rows, batch.seq_lens)]  # a padding tail stays if lengths are unknown
            narrow = max(s + t for s, t in zip(row_sums, tails))
            pairs = sum(n * n for n in lengths)
            if not useful:
                pairs += sum((narrow - s) ** 2 for s in row_sums)
            out.append((narrow * len(rows) if not useful else sum(lengths), pairs))
        return tuple(out)

    def count(self, units: Units) -> FlopCount:
        parts = {}
        for part, rates in self.rates.items():
            fwd = sum(r.forward * units.of(u) for u, r in rates.items())
            bwd = sum(r.backward * units.of(u) for u, r in rates.items())
            rec = sum(r.recompute * units.of(u) for u, r in rates.items())
            if part == "llm":
                for (tokens, pairs), tally in zip(units.streams, self.streams):
                    stream = dataclasses.replace(units, tokens=tokens, pairs=pairs)
                    fwd += sum(r.forward * stream.of(u) for u, r in tally.rates.items())
                    bwd += sum(r.backward * stream.of(u) for u, r in tally.rates.items())
                    rec += sum(r.recompute * stream.of(u) for u, r in tally.rates.items())
            if part == "head" and self.head_input_grad and units.rows > self.head_chunk:
                rec += fwd  # objectives/head.py: every chunk's logits are recomputed in backward
            parts[part] = PartFlops(fwd, bwd, rec)
        return FlopCount(parts)

    def __call__(self, batch: Batch, head_rows: int | None = None, useful: bool = False) -> FlopCount:
        """The step's FLOPs on ``batch`` as computed (padding included), or with ``useful`` its samples' alone."""
        return self.count(self.units(batch, head_rows, useful))


def step_flops(model: nn.Module, batch: Batch, trainable: bool | None = None, head_rows: int | None = None,
               useful: bool = False) -> FlopCount:
    """FLOPs of one forward + backward of ``model`` (an :class:`~mllm_kit.MLLM`) on ``batch``; ``head_rows``: the rows
    the objective applies the LM head to (default: the batch's supervised targets, as mllm-kit's objectives gather
    them; all positions when the batch has no count); ``useful``: without the padding (:meth:`Units.of_batch`).
    See :class:`StepFlops`."""
    return StepFlops(model, trainable)(batch, head_rows, useful)
