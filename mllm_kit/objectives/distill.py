"""Distillation objectives: LLaVA-KD's MDist + RDist with LLAVADI's hidden alignment (``kd``), LLaVA-MoD's mimic
loss (``mimic``). specs/components.md §7.1–§7.3 (LLAVADI as its released code has it, not §7.2's summary); the math is
in :mod:`mllm_kit.objectives.divergences`.

Both read the teacher's outputs on the same samples, at the positions ``positions`` names (all ``[B, T]`` masks):

* ``next_token``: the positions whose *next* token is supervised (the LM loss's positions; LLaVA-KD's response
  positions, "labels ≠ −100 after the causal shift");
* ``labels``: the positions whose *own* token is supervised — the unshifted label mask that LLaVA-MoD
  (``llavamod/train/align_trainer.py``, ``compute_align_loss``) and LLAVADI's response mode apply to the logits. It is
  ``next_token`` moved one position on: each reply's first token is not a target (the prompt's last position is left
  out), and the reply's last position (its stop token, whose logits predict what follows the reply) is read;
* ``all``: every attended position of the samples that supervise a token — instruction, image and reply (LLaVA-MoD's
  ``distill_all_tokens``, LLAVADI's ``--align_logits_all`` / ``--align_all_hidden_embeds``). It needs the teacher to
  read the student's exact sequence (checked in :meth:`DistillObjective.bind`).

Rows come in (sample, position) order; in a teacher view of its own (another template or image-token count) they are
found the same way from its labels, and the dataset checked that both views supervise the same tokens, so the rows
align. Visual positions — the image-token positions of the LLM output — are aligned in order, which needs equal
image-token counts (checked in :meth:`TeacherObjective.bind`). The LM head runs only at the rows read, in chunks
(:mod:`mllm_kit.objectives.head`).

Normalisation. The LM term is the sum over supervised targets divided by the trainer's global supervised-token
normaliser (DESIGN.md, "the LM loss"). The distillation terms at those rows (response KL, hidden, mimic) follow
``reduction``:

* ``token`` (default): the sum over the rows divided by the same global normaliser — every supervised token of an
  optimiser step weighs alike, across micro-batches and ranks. ``next_token`` and ``labels`` read as many rows as
  there are supervised targets, so this is their mean over the global batch. ``all`` reads rows the trainer does not
  count: its sum is divided by the micro-batch's own row count (LLaVA-MoD's mean over its micro-batch), so an
  optimiser step averages the micro-batch means.
* ``sample``: each sample's mean over its rows, averaged over the micro-batch's samples (LLAVADI's
  ``distill_loss /= labels.shape[0]``; LLaVA-MoD's at its micro-batch of one sample). The trainer's normaliser is not
  used: Lightning divides the loss by the accumulation count and DDP averages over ranks, so an optimiser step averages
  the micro-batch means — as the Hugging Face Trainer does in both official codes — which is the mean over the step's
  samples when its micro-batches are equally large (a shorter last micro-batch weighs its samples more, as there).

The visual KL is the mean over the micro-batch's visual positions, RDist the mean over its images (LLaVA-KD averages
them per batch too).
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.layers.mlp import build_mlp
from mllm_kit.model import MLLM, MLLMOutput
from mllm_kit.objectives.base import Objective
from mllm_kit.objectives.divergences import (
    DIVERGENCES,
    HIDDEN_ALIGNMENTS,
    divergence,
    hidden_alignment,
    relation_loss,
    soft_cross_entropy,
    zscore,
)
from mllm_kit.objectives.head import CHUNK_SIZE, chunked_sum, gather, token_rows
from mllm_kit.registry import register_objective

POSITIONS: tuple[str, ...] = ("next_token", "labels", "all")
REDUCTIONS: tuple[str, ...] = ("token", "sample")
LOGIT_NORMS: tuple[str, ...] = ("none", "zscore")


def _choice(value: str, options: tuple[str, ...] | list[str], what: str) -> str:
    if value not in options:
        raise ConfigError(f"{what}: {value!r} is not one of {list(options)}.{did_you_mean(value, options)}")
    return value


class TeacherObjective(Objective):
    """What every objective that reads a teacher shares: the bound vocabulary width and image-token ids, and the
    teacher's logits at gathered rows (no gradient)."""

    needs_teacher = True
    visual_terms: tuple[str, ...] = ()  # option names whose non-zero weight reads visual positions

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = int(chunk_size)
        self.vocab: int | None = None  # bound: the logit width both heads share
        self.image_token_ids = (-1, -1)

    def reads_visual(self) -> list[str]:
        return [t for t in self.visual_terms if getattr(self, t)]

    def bind(self, student: MLLM, teacher: MLLM | None, where: str = "objective", separate_view: bool = False) -> None:
        super().bind(student, teacher, where, separate_view)
        visual = self.reads_visual()
        ns, nt = student.tokens_per_image(), teacher.tokens_per_image()
        if visual and ns != nt:
            raise ConfigError(f"{where}.{visual[0]}: the {', '.join(visual)} term(s) read the visual positions of both models and "
                              f"need equal image-token counts, but the student has {ns} tokens per image and the teacher {nt}; "
                              f"set {' and '.join(f'{t}: 0' for t in visual)} (response terms align through the labels), or give "
                              f"both the same encoder grid and connector.")
        # Logits beyond the narrower head are padding of one of the two vocabularies (the tokenizers were checked).
        self.vocab = min(student.llm.vocab_size, teacher.llm.vocab_size)
        self.image_token_ids = (student.image_token_id, teacher.image_token_id)

    def logits(self, outputs: MLLMOutput, hidden: torch.Tensor) -> torch.Tensor:
        return outputs.head(hidden)[..., : self.vocab]

    def teacher_logits(self, teacher: MLLMOutput, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher.head(hidden)[..., : self.vocab]


def _sample_index(batch: Batch) -> torch.Tensor:
    """``[B, T]``: the sample of every position (packed rows hold several)."""
    if batch.segments is not None:
        return batch.segments
    b, t = batch.input_ids.shape
    return torch.arange(b, device=batch.input_ids.device).unsqueeze(1).expand(b, t)


def position_masks(batch: Batch, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(read [B, T], next_token [B, T])`` bool: the positions the distillation terms read (module docstring) and those
    whose next token is supervised (the LM loss's)."""
    labels = batch.labels
    supervised_next = torch.zeros_like(labels, dtype=torch.bool)
    supervised_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if positions == "next_token":
        return supervised_next, supervised_next
    if positions == "labels":
        return labels != IGNORE_INDEX, supervised_next
    attended = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(supervised_next)
    sample = _sample_index(batch)
    # A sample without a supervised token has no row in the modes above; here it is skipped as LLAVADI's KL skips it
    # (`if answer_masks[i].sum() == 0: continue`).
    has_target = torch.zeros(len(batch.sample_ids) or len(batch), dtype=torch.bool, device=labels.device)
    has_target[sample[supervised_next]] = True
    return attended & has_target[sample], supervised_next


class DistillObjective(TeacherObjective):
    """A teacher objective over token positions: ``positions`` and ``reduction`` as in the module docstring, and the
    rows both models are read at."""

    def __init__(self, positions: str = "next_token", reduction: str = "token", chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        name = getattr(self, "registry_name", type(self).__name__)
        self.positions = _choice(positions, POSITIONS, f"objective {name}: positions")
        self.reduction = _choice(reduction, REDUCTIONS, f"objective {name}: reduction")

    def bind(self, student: MLLM, teacher: MLLM | None, where: str = "objective", separate_view: bool = False) -> None:
        super().bind(student, teacher, where, separate_view)
        if self.positions == "all" and separate_view:
            raise ConfigError(f"{where}.positions: 'all' reads every position of both models at once, which needs the teacher to "
                              f"read the student's exact sequence, but it reads its own view (another template, image transform "
                              f"or image-token count); use positions: next_token or labels, or give the teacher the student's view.")

    def rows(self, outputs: MLLMOutput, batch: Batch, teacher: MLLMOutput | None, normalizer: float | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(student hidden [U, Ds], teacher hidden [U, Dt], next-token targets [U] (−100: none), weights [U], scales)``.

        The ``U`` rows are the positions read (``positions``) and those the LM term reads, in (sample, position) order.
        ``weights`` is each row's weight in the distillation terms (0 for a row only the LM term reads; under ``sample``
        one over its sample's row count × the micro-batch's samples). ``scales``: ``loss`` turns Σ weights·term into the
        term's loss, ``log`` into its logged mean; ``lm`` / ``lm_log`` do that for the summed cross-entropy.
        """
        if teacher is None:
            raise ConfigError(f"objective {type(self).__name__}: no teacher outputs (the stage names no teacher).")
        read, supervised_next = position_masks(batch, self.positions)
        count = batch.num_loss_tokens if self.positions == "next_token" else None  # host-known: no device sync
        index = token_rows(read | supervised_next, count)
        t_index = index
        if batch.teacher is not None:  # its own view: the same rows, found from its labels
            view = batch.teacher
            if self.positions == "all":
                raise ConfigError(f"objective {type(self).__name__}: positions 'all' needs the teacher to read the student's batch.")
            t_read, t_next = position_masks(view, self.positions)
            t_index = token_rows(t_read | t_next, view.num_loss_tokens if self.positions == "next_token" else None)
            if t_index.shape[0] != index.shape[0]:
                raise ConfigError(f"samples {batch.sample_ids[:4]}: the teacher's view supervises other positions than the "
                                  f"student's ({t_index.shape[0]} rows against {index.shape[0]}); both views must supervise the "
                                  f"same reply tokens.")
        next_labels = torch.full_like(batch.labels, IGNORE_INDEX)
        next_labels[:, :-1] = batch.labels[:, 1:]
        targets = next_labels.reshape(-1)[index]
        weights = read.reshape(-1)[index].float()
        n_read = max(int(read.sum()) if count is None else count, 1)
        n_lm = max(batch.num_loss_tokens if batch.num_loss_tokens is not None else int(supervised_next.sum()), 1)
        lm = normalizer if normalizer is not None else n_lm
        if self.reduction == "sample":
            sample = _sample_index(batch).reshape(-1)[index]
            samples = len(batch.sample_ids) or len(batch)
            per_sample = torch.zeros(samples, device=weights.device).index_add_(0, sample, weights)
            weights = weights / (per_sample[sample].clamp_min(1.0) * samples)
            scales = {"loss": 1.0, "log": 1.0}
        else:
            norm = normalizer if normalizer is not None and self.positions != "all" else n_read
            scales = {"loss": 1.0 / norm, "log": 1.0 / n_read}
        scales.update(lm=1.0 / lm, lm_log=1.0 / n_lm)
        return gather(outputs.hidden, index), gather(teacher.hidden, t_index), targets, weights, scales


@register_objective("kd")
class KDObjective(DistillObjective):
    """LLaVA-KD (§7.1): ``L = lm·L_LM + response·L_res + visual·L_vis + relation·L_rel`` (the paper: all 1), plus
    LLAVADI's ``hidden·L_hid`` — the student's final hidden states mapped by a trainable 2-layer MLP adapter
    (Linear, GELU, Linear: LLAVADI's ``embed_projector``) to the teacher's width, then MSE or cosine against the
    teacher's final hidden states.

    ``divergence``: forward (LLaVA-KD's and LLAVADI's choice), reverse, symmetric, js, tv, skew_forward, skew_reverse,
    with ``lam`` (None: LLaVA-KD's defaults) and ``temperature`` (1, as both; τ² scaling otherwise). ``logit_norm``:
    ``zscore`` standardises each position's logits over the vocabulary before the divergence (LLAVADI's
    ``--norm_logits``; :func:`~mllm_kit.objectives.divergences.zscore`), ``none`` (default) leaves them. The response
    KL and the hidden term read ``positions`` (default ``next_token``; LLAVADI's released script: ``all``) and are
    normalised by ``reduction`` (module docstring). The visual KL uses the same divergence at the LLM's output logits
    over the image-token positions. ``relation_space``: ``logits`` (the paper: Z = visual-position logits) or
    ``hidden``; ``relation_normalize`` L2-normalises Z's rows first.
    """

    registry_name = "kd"
    visual_terms = ("visual", "relation")

    def __init__(self, lm: float = 1.0, response: float = 1.0, visual: float = 0.0, relation: float = 0.0, hidden: float = 0.0,
                 divergence: str = "forward", temperature: float = 1.0, lam: float | None = None,
                 relation_space: str = "logits", relation_normalize: bool = False, hidden_loss: str = "mse",
                 positions: str = "next_token", reduction: str = "token", logit_norm: str = "none",
                 chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(positions, reduction, chunk_size)
        self.lm, self.response, self.visual, self.relation, self.hidden = (float(w) for w in (lm, response, visual, relation, hidden))
        self.divergence = _choice(divergence, DIVERGENCES, "objective kd: divergence")
        self.relation_space = _choice(relation_space, ("logits", "hidden"), "objective kd: relation_space")
        self.hidden_loss = _choice(hidden_loss, HIDDEN_ALIGNMENTS, "objective kd: hidden_loss")
        self.logit_norm = _choice(logit_norm, LOGIT_NORMS, "objective kd: logit_norm")
        if temperature <= 0:
            raise ConfigError(f"objective kd: temperature must be positive, got {temperature}.")
        self.temperature, self.lam, self.relation_normalize = float(temperature), lam, bool(relation_normalize)
        self.adapter: nn.Module | None = None

    def bind(self, student: MLLM, teacher: MLLM | None, where: str = "objective", separate_view: bool = False) -> None:
        super().bind(student, teacher, where, separate_view)
        if self.hidden:
            ds, dt = student.llm.hidden_size, teacher.llm.hidden_size
            self.adapter = build_mlp(ds, dt, depth=2, act="gelu")

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"hidden_adapter": self.adapter} if self.adapter is not None else {}

    def _div(self, zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        if self.logit_norm == "zscore":
            zs, zt = zscore(zs), zscore(zt)
        return divergence(zs, zt, self.divergence, self.temperature, self.lam)

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        hs, ht, targets, weights, scale = self.rows(outputs, batch, teacher_outputs, normalizer)
        use_kd = self.response != 0.0

        def response_terms(h_s: torch.Tensor, h_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            zs = self.logits(outputs, h_s)
            ce = (torch.nn.functional.cross_entropy(zs.float(), y, ignore_index=IGNORE_INDEX, reduction="sum") if self.lm
                  else zs.new_zeros((), dtype=torch.float32))
            kd = (self._div(zs, self.teacher_logits(teacher_outputs, h_t)) * w).sum() if use_kd else torch.zeros_like(ce)
            return torch.stack([ce, kd])

        lm_sum, res_sum = chunked_sum(response_terms, hs, ht, targets, weights, chunk_size=self.chunk_size).unbind()
        loss = self.lm * lm_sum * scale["lm"] + self.response * res_sum * scale["loss"]
        parts = {"lm_loss": (lm_sum * scale["lm_log"]).detach(), "kd_response": (res_sum * scale["log"]).detach()}
        if self.hidden:
            dtype = self.adapter[0].weight.dtype
            hid_sum = chunked_sum(lambda a, b, w: (hidden_alignment(self.adapter(a.to(dtype)), b, self.hidden_loss) * w).sum(),
                                  hs, ht, weights, chunk_size=self.chunk_size)
            loss = loss + self.hidden * hid_sum * scale["loss"]
            parts["kd_hidden"] = (hid_sum * scale["log"]).detach()
        if self.reads_visual() and batch.num_images:
            vis, rel = self._visual_terms(outputs, batch, teacher_outputs)
            loss = loss + self.visual * vis + self.relation * rel
            parts.update(kd_visual=vis.detach(), kd_relation=rel.detach())
        return {"loss": loss, **parts}

    def _visual_terms(self, outputs: MLLMOutput, batch: Batch, teacher: MLLMOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual KL averaged over visual positions, RDist averaged over images) of the micro-batch."""
        view = batch.teacher_view()
        s_img, t_img = self.image_token_ids
        index = token_rows(batch.input_ids == s_img, batch.num_image_tokens)
        t_index = token_rows(view.input_ids == t_img, view.num_image_tokens)
        images = batch.num_images
        hs = gather(outputs.hidden, index).unflatten(0, (images, -1))  # [I, N, Ds]: spans are contiguous, N per image
        ht = gather(teacher.hidden, t_index).unflatten(0, (images, -1))

        def per_images(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
            zs, zt = self.logits(outputs, h_s), self.teacher_logits(teacher, h_t)  # [i, N, V]
            vis = self._div(zs.flatten(0, 1), zt.flatten(0, 1)).sum() if self.visual else zs.new_zeros((), dtype=torch.float32)
            if not self.relation:
                return torch.stack([vis, torch.zeros_like(vis)])
            a, b = (zs, zt) if self.relation_space == "logits" else (h_s, h_t)
            return torch.stack([vis, relation_loss(a, b, self.relation_normalize).sum()])

        per_chunk = max(1, self.chunk_size // max(hs.shape[1], 1))
        vis_sum, rel_sum = chunked_sum(per_images, hs, ht, chunk_size=per_chunk).unbind()
        return vis_sum / max(index.shape[0], 1), rel_sum / images


@register_objective("mimic")
class MimicObjective(DistillObjective):
    """LLaVA-MoD's mimic distillation (§7.3): ``L_align = −(1/|M|) Σ_{m∈M} Σ_v p_t(v) log p_s(v)`` — cross-entropy to
    the teacher's soft labels, no temperature — over ``M`` = ``positions``: ``labels`` (default: LLaVA-MoD's unshifted
    label mask, ``compute_align_loss``), ``next_token`` (the LM loss's positions, one earlier) or ``all`` (every attended
    position, LLaVA-MoD's ``distill_all_tokens``; needs the teacher to read the student's own view). ``reduction`` as
    in the module docstring (LLaVA-MoD's released scripts run one sample per micro-batch: ``sample``).
    ``loss_type``: ``only_kd`` (L = L_align, dense→dense) or ``kd_lm`` (L = L_align + L_LM, dense→sparse). MoE aux
    losses are added by the trainer as for every objective (``aux_loss_coef``).
    """

    registry_name = "mimic"

    def __init__(self, loss_type: str = "only_kd", positions: str = "labels", reduction: str = "token",
                 chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(positions, reduction, chunk_size)
        self.loss_type = _choice(loss_type, ("only_kd", "kd_lm"), "objective mimic: loss_type")

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        hs, ht, targets, weights, scale = self.rows(outputs, batch, teacher_outputs, normalizer)

        def terms(h_s: torch.Tensor, h_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            zs = self.logits(outputs, h_s)
            align = (soft_cross_entropy(zs, self.teacher_logits(teacher_outputs, h_t)) * w).sum()
            ce = torch.nn.functional.cross_entropy(zs.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
            return torch.stack([align, ce])

        align_sum, lm_sum = chunked_sum(terms, hs, ht, targets, weights, chunk_size=self.chunk_size).unbind()
        loss = align_sum * scale["loss"] + (lm_sum * scale["lm"] if self.loss_type == "kd_lm" else 0.0)
        return {"loss": loss, "mimic_align": (align_sum * scale["log"]).detach(), "lm_loss": (lm_sum * scale["lm_log"]).detach()}
