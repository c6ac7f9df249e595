"""Distillation objectives: LLaVA-KD's MDist + RDist with LLAVADI's hidden alignment (``kd``), LLaVA-MoD's mimic
loss (``mimic``). specs/components.md §7.1–§7.3; the math is in :mod:`mllm_kit.objectives.divergences`.

Both read the teacher's outputs on the same samples. Response positions are aligned through the labels: the
``M`` positions whose next token is supervised, in (sample, position) order, in the student's batch and in the
teacher's view (the dataset checked they supervise the same tokens). Visual positions — the image-token positions
of the LLM output — are aligned in order, which needs equal image-token counts (checked in :meth:`bind`). The LM
head runs only at those positions, in chunks (:mod:`mllm_kit.objectives.head`).

Normalisation: token terms over response positions (LM, response KL, hidden, mimic) are sums divided by the
trainer's global supervised-token normaliser, like the LM loss; the visual KL is the mean over the micro-batch's
visual positions, RDist the mean over its images (LLaVA-KD averages them per batch too).
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_kit.batch import Batch
from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.layers.mlp import build_mlp
from mllm_kit.model import MLLM, MLLMOutput
from mllm_kit.objectives.base import Objective
from mllm_kit.objectives.divergences import DIVERGENCES, HIDDEN_ALIGNMENTS, divergence, hidden_alignment, relation_loss, soft_cross_entropy
from mllm_kit.objectives.head import CHUNK_SIZE, chunked_sum, gather, next_token_rows, token_rows
from mllm_kit.registry import register_objective


def _choice(value: str, options: tuple[str, ...] | list[str], what: str) -> str:
    if value not in options:
        raise ConfigError(f"{what}: {value!r} is not one of {list(options)}.{did_you_mean(value, options)}")
    return value


class TeacherObjective(Objective):
    """What every objective that reads a teacher shares: the bound vocabulary width and image-token ids, the aligned
    response rows, and the teacher's logits at gathered rows (no gradient)."""

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

    def response_rows(self, outputs: MLLMOutput, batch: Batch, teacher: MLLMOutput | None,
                      normalizer: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(student hidden [M, Ds], teacher hidden [M, Dt], targets [M], normaliser)`` at the aligned response
        positions; the normaliser is the trainer's, or ``M`` outside training."""
        if teacher is None:
            raise ConfigError(f"objective {type(self).__name__}: no teacher outputs (the stage names no teacher).")
        view = batch.teacher_view()
        index, targets = next_token_rows(batch.labels, batch.num_loss_tokens)
        t_index, _ = next_token_rows(view.labels, view.num_loss_tokens)
        if t_index.shape[0] != index.shape[0]:
            raise ConfigError(f"samples {batch.sample_ids[:4]}: the teacher's view supervises {t_index.shape[0]} tokens, the "
                              f"student's {index.shape[0]}; both views must supervise the same reply tokens.")
        norm = normalizer if normalizer is not None else max(index.shape[0], 1)
        return gather(outputs.hidden, index), gather(teacher.hidden, t_index), targets, norm

    def logits(self, outputs: MLLMOutput, hidden: torch.Tensor) -> torch.Tensor:
        return outputs.head(hidden)[..., : self.vocab]

    def teacher_logits(self, teacher: MLLMOutput, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher.head(hidden)[..., : self.vocab]


@register_objective("kd")
class KDObjective(TeacherObjective):
    """LLaVA-KD (§7.1): ``L = lm·L_LM + response·L_res + visual·L_vis + relation·L_rel`` (the paper: all 1), plus
    LLAVADI's (§7.2) ``hidden·L_hid`` — the student's final hidden states mapped by a trainable 2-layer MLP adapter
    to the teacher's width, then MSE or cosine against the teacher's, on response positions.

    ``divergence``: forward (LLaVA-KD's choice), reverse, symmetric, js, tv, skew_forward, skew_reverse, with ``lam``
    (None: LLaVA-KD's defaults) and ``temperature`` (1, as LLaVA-KD; τ² scaling otherwise). The visual KL uses the
    same divergence at the LLM's output logits over the image-token positions. ``relation_space``: ``logits``
    (the paper: Z = visual-position logits) or ``hidden``; ``relation_normalize`` L2-normalises Z's rows first.
    """

    visual_terms = ("visual", "relation")

    def __init__(self, lm: float = 1.0, response: float = 1.0, visual: float = 0.0, relation: float = 0.0, hidden: float = 0.0,
                 divergence: str = "forward", temperature: float = 1.0, lam: float | None = None,
                 relation_space: str = "logits", relation_normalize: bool = False, hidden_loss: str = "mse",
                 chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        self.lm, self.response, self.visual, self.relation, self.hidden = (float(w) for w in (lm, response, visual, relation, hidden))
        self.divergence = _choice(divergence, DIVERGENCES, "objective kd: divergence")
        self.relation_space = _choice(relation_space, ("logits", "hidden"), "objective kd: relation_space")
        self.hidden_loss = _choice(hidden_loss, HIDDEN_ALIGNMENTS, "objective kd: hidden_loss")
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
        return divergence(zs, zt, self.divergence, self.temperature, self.lam)

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        hs, ht, targets, norm = self.response_rows(outputs, batch, teacher_outputs, normalizer)
        m = hs.shape[0]
        use_kd = self.response != 0.0

        def response_terms(h_s: torch.Tensor, h_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            zs = self.logits(outputs, h_s)
            ce = torch.nn.functional.cross_entropy(zs.float(), y, reduction="sum") if self.lm else zs.new_zeros((), dtype=torch.float32)
            kd = self._div(zs, self.teacher_logits(teacher_outputs, h_t)).sum() if use_kd else torch.zeros_like(ce)
            return torch.stack([ce, kd])

        lm_sum, res_sum = chunked_sum(response_terms, hs, ht, targets, chunk_size=self.chunk_size).unbind()
        loss = (self.lm * lm_sum + self.response * res_sum) / norm
        parts = {"lm_loss": (lm_sum / max(m, 1)).detach(), "kd_response": (res_sum / max(m, 1)).detach()}
        if self.hidden:
            hid_sum = chunked_sum(lambda a, b: hidden_alignment(self.adapter(a.to(self.adapter[0].weight.dtype)), b, self.hidden_loss).sum(),
                                  hs, ht, chunk_size=self.chunk_size)
            loss = loss + self.hidden * hid_sum / norm
            parts["kd_hidden"] = (hid_sum / max(m, 1)).detach()
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
class MimicObjective(TeacherObjective):
    """LLaVA-MoD's mimic distillation (§7.3): ``L_align = −(1/|M|) Σ_m Σ_v p_t(v) log p_s(v)`` — cross-entropy to the
    teacher's soft labels, no temperature — over response positions, or every attended position with
    ``all_tokens`` (instruction + vision + response; needs the teacher to read the student's own view).
    ``loss_type``: ``only_kd`` (L = L_align, dense→dense) or ``kd_lm`` (L = L_align + L_LM, dense→sparse). MoE aux
    losses are added by the trainer as for every objective (``aux_loss_coef``).
    """

    def __init__(self, loss_type: str = "only_kd", all_tokens: bool = False, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(chunk_size)
        self.loss_type = _choice(loss_type, ("only_kd", "kd_lm"), "objective mimic: loss_type")
        self.all_tokens = bool(all_tokens)

    def bind(self, student: MLLM, teacher: MLLM | None, where: str = "objective", separate_view: bool = False) -> None:
        super().bind(student, teacher, where, separate_view)
        if self.all_tokens and separate_view:
            raise ConfigError(f"{where}.all_tokens: mimicking every position needs the teacher to read the student's exact "
                              f"sequence, but it reads its own view (another template or image-token count); use all_tokens: false.")

    def __call__(self, outputs: MLLMOutput, batch: Batch, normalizer: float | None,
                 teacher_outputs: MLLMOutput | None = None) -> dict[str, torch.Tensor]:
        hs, ht, targets, norm = self.response_rows(outputs, batch, teacher_outputs, normalizer)
        m = hs.shape[0]
        with_lm = self.loss_type == "kd_lm"

        def terms(h_s: torch.Tensor, h_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            zs = self.logits(outputs, h_s)
            align = soft_cross_entropy(zs, self.teacher_logits(teacher_outputs, h_t)).sum()
            ce = torch.nn.functional.cross_entropy(zs.float(), y, reduction="sum") if with_lm or not self.all_tokens else torch.zeros_like(align)
            return torch.stack([align, ce])

        align_sum, lm_sum = chunked_sum(terms, hs, ht, targets, chunk_size=self.chunk_size).unbind()
        align = align_sum / norm
        parts = {"lm_loss": (lm_sum / max(m, 1)).detach()}
        if self.all_tokens:  # every attended position; the same sequence in both models (checked in bind)
            mask = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(batch.input_ids, dtype=torch.bool)
            index = token_rows(mask)
            h_all = gather(outputs.hidden, index)
            all_sum = chunked_sum(lambda a, b: soft_cross_entropy(self.logits(outputs, a), self.teacher_logits(teacher_outputs, b)).sum(),
                                  h_all, gather(teacher_outputs.hidden, index), chunk_size=self.chunk_size)
            align = all_sum / max(index.shape[0], 1)
        parts["mimic_align"] = align.detach() if self.all_tokens else (align_sum / max(m, 1)).detach()
        loss = align + (lm_sum / norm if with_lm else 0.0)
        return {"loss": loss, **parts}

