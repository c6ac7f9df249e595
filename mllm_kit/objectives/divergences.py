"""Per-position math of the distillation losses: pure tensor functions, no model (specs/components.md §7.1–§7.3).

* :func:`divergence`: the teacher/student next-token divergence family of LLaVA-KD (§7.1; LLAVADI's forward,
  reverse and JS variants, §7.2), one value per position.
* :func:`zscore`: LLAVADI's logit standardisation (``--norm_logits``), applied before a divergence.
* :func:`soft_cross_entropy`: LLaVA-MoD's mimic loss (§7.3).
* :func:`relation_loss`: LLaVA-KD's RDist (§7.1).
* :func:`hidden_alignment`: LLAVADI's final-layer hidden-state alignment (§7.2).
* :func:`dpo_loss`, :func:`kto_pair_loss`: LLaVA-MoD's preference distillation (§7.3).

Nothing here masks or averages over positions: the objectives pick the positions and divide by their normalizer.
Inputs are computed in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES: tuple[str, ...] = ("forward", "reverse", "symmetric", "js", "tv", "skew_forward", "skew_reverse")

# LLaVA-KD's defaults for the mixing weight (distill_loss_utils): 0.9 for symmetric KL and JS, 0.1 for the skews.
_DEFAULT_LAM = {"symmetric": 0.9, "js": 0.9, "skew_forward": 0.1, "skew_reverse": 0.1}

HIDDEN_ALIGNMENTS: tuple[str, ...] = ("mse", "cosine")


def _promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to a common floating dtype of at least float32 (bf16/fp16 logits are upcast, float64 is kept)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: KL(p || q) = sum_v p (log p - log q)."""
    return (p * (log_p - log_q)).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward",
               temperature: float = 1.0, lam: float | None = None) -> torch.Tensor:
    """``[M, V]`` and ``[M, V]`` → ``[M]``: the divergence between teacher and student next-token distributions.

    With p_t, p_s the softmaxes of the teacher and student logits:

    * ``forward``: KL(p_t ‖ p_s); ``reverse``: KL(p_s ‖ p_t);
    * ``symmetric``: (1 − λ)·KL(p_t ‖ p_s) + λ·KL(p_s ‖ p_t), λ = 0.9;
    * ``js``: λ·KL(p_s ‖ m) + (1 − λ)·KL(p_t ‖ m) with m = (1 − λ)·p_t + λ·p_s, λ = 0.9 (λ = 0.5 is the usual JSD);
    * ``tv``: ½ Σ_v |p_t − p_s|;
    * ``skew_forward``: KL(p_t ‖ λ·p_t + (1 − λ)·p_s), λ = 0.1;
    * ``skew_reverse``: KL(p_s ‖ λ·p_s + (1 − λ)·p_t), λ = 0.1.

    ``lam=None`` takes those defaults (LLaVA-KD's ``distill_loss_utils``); the other kinds ignore ``lam``. With
    ``temperature`` τ ≠ 1 both logits are divided by τ and the result is multiplied by τ² (Hinton et al.); τ = 1 is
    LLaVA-KD's setting. Vocabulary entries where either logit is infinite (e.g. masked with −inf) contribute 0, as
    in LLaVA-KD. Any leading shape ``[..., V]`` works; the result drops the last dimension.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(DIVERGENCES)}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                         f"differ in shape; the vocabularies must match (truncate to the shared vocabulary first).")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if lam is None:
        lam = _DEFAULT_LAM.get(kind, 0.0)
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}.")
    s_logits, t_logits = _promote(student_logits, teacher_logits)
    inf = torch.isinf(s_logits) | torch.isinf(t_logits)
    # Masking the log-probabilities (not the products) keeps 0·(−inf) out of both the value and the gradient.
    log_s = torch.log_softmax(s_logits / temperature, dim=-1).masked_fill(inf, 0.0)
    log_t = torch.log_softmax(t_logits / temperature, dim=-1).masked_fill(inf, 0.0)
    p_s, p_t = log_s.exp().masked_fill(inf, 0.0), log_t.exp().masked_fill(inf, 0.0)

    def log_mix(w_t: float) -> torch.Tensor:
        # Filling masked entries with 1 before the log keeps 1/0 out of the backward pass.
        return torch.log((w_t * p_t + (1.0 - w_t) * p_s).masked_fill(inf, 1.0))

    if kind == "forward":
        out = _kl(p_t, log_t, log_s)
    elif kind == "reverse":
        out = _kl(p_s, log_s, log_t)
    elif kind == "symmetric":
        out = (1.0 - lam) * _kl(p_t, log_t, log_s) + lam * _kl(p_s, log_s, log_t)
    elif kind == "js":
        log_m = log_mix(1.0 - lam)
        out = lam * _kl(p_s, log_s, log_m) + (1.0 - lam) * _kl(p_t, log_t, log_m)
    elif kind == "tv":
        out = 0.5 * (p_t - p_s).abs().sum(-1)
    elif kind == "skew_forward":
        out = _kl(p_t, log_t, log_mix(lam))
    else:  # skew_reverse
        out = _kl(p_s, log_s, log_mix(1.0 - lam))
    return out * temperature**2 if temperature != 1.0 else out


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``[..., V]`` → ``[..., V]``: each row minus its mean over the vocabulary, divided by ``eps`` + its standard
    deviation (unbiased, ``V − 1``) — LLAVADI's ``normalize`` under ``--norm_logits`` (xushilin1/LLaVADI,
    ``projects/distill/distill_llava_llama.py``, ``DistillModel.forward``), applied to student and teacher logits alike.

    A softmax of the result is the softmax of the logits at the row's own temperature σ + ε. Infinite entries (masked
    logits) are left out of the mean and deviation and stay infinite, so the divergences still drop them.
    """
    (z,) = _promote(logits)
    finite = torch.isfinite(z)
    safe = torch.where(finite, z, 0.0)  # no inf enters an arithmetic op, so no NaN reaches the gradient either
    n = finite.sum(-1, keepdim=True)
    mean = safe.sum(-1, keepdim=True) / n.clamp_min(1)
    centred = torch.where(finite, safe - mean, 0.0)
    std = (centred.square().sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
    return torch.where(finite, centred / (eps + std), z)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``[M, V]``, ``[M, V]`` → ``[M]``: −Σ_v p_t(v) log p_s(v), LLaVA-MoD's mimic loss (§7.3).

    Equals KL(p_t ‖ p_s) + H(p_t), so it has the forward KL's gradient. Infinite logits contribute 0, as above.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                         f"differ in shape; the vocabularies must match (truncate to the shared vocabulary first).")
    s_logits, t_logits = _promote(student_logits, teacher_logits)
    inf = torch.isinf(s_logits) | torch.isinf(t_logits)
    log_s = torch.log_softmax(s_logits, dim=-1).masked_fill(inf, 0.0)
    p_t = torch.softmax(t_logits, dim=-1).masked_fill(inf, 0.0)
    return -(p_t * log_s).sum(-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, normalize_rows: bool = False) -> torch.Tensor:
    """``[I, N, Ds]``, ``[I, N, Dt]`` → ``[I]``: LLaVA-KD's RDist per image (§7.1).

    1 − cos(vec(Z_s Z_sᵀ), vec(Z_t Z_tᵀ)) over the N×N self-correlation matrices; with ``normalize_rows`` the rows
    of Z are L2-normalised first. Only N must match: Ds may differ from Dt (logit or hidden space).
    """
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"relation_loss expects [I, N, Ds] and [I, N, Dt] with the same I and N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}.")
    z_s, z_t = _promote(student, teacher)
    if normalize_rows:
        z_s, z_t = F.normalize(z_s, dim=-1), F.normalize(z_t, dim=-1)
    r_s = (z_s @ z_s.transpose(1, 2)).flatten(1)
    r_t = (z_t @ z_t.transpose(1, 2)).flatten(1)
    return 1.0 - F.cosine_similarity(r_s, r_t, dim=-1)


def hidden_alignment(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``[M, D]``, ``[M, D]`` → ``[M]``: LLAVADI's final-layer hidden-state alignment (§7.2).

    ``mse``: the mean over D of the squared error; ``cosine``: 1 − cosine similarity. The student states must
    already be mapped to the teacher's width (the trainable adapter lives in the objective).
    """
    if kind not in HIDDEN_ALIGNMENTS:
        raise ValueError(f"unknown hidden alignment kind {kind!r}; expected one of {', '.join(HIDDEN_ALIGNMENTS)}.")
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and teacher hidden states {tuple(teacher.shape)} "
                         f"differ in shape; map the student to the teacher's width first.")
    h_s, h_t = _promote(student, teacher)
    if kind == "mse":
        return (h_s - h_t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(h_s, h_t, dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """``[P]`` summed sequence log-probs each → ``[P]``: the sigmoid DPO loss (§7.3).

    −log σ(β·((π_w − ref_w) − (π_l − ref_l))); in LLaVA-MoD the reference is the dense teacher.
    """
    pi_w, pi_l, ref_w, ref_l = _promote(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def kto_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                  reference_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """``[P]`` → ``[P]``: the paired KTO loss of LLaVA-MoD's launch script (§7.3).

    With Δ_w = π_w − ref_w and Δ_l = π_l − ref_l per pair, KL_w = max(0, mean_P Δ_w) and KL_l likewise, the loss of
    pair i is ½·[(1 − σ(β(Δ_w,i − KL_l))) + (1 − σ(β(KL_w − Δ_l,i)))]. The ½ is there because LLaVA-MoD's trainer
    (TRL-style) concatenates the 2P chosen and rejected terms and takes their mean, so the mean of this ``[P]``
    equals that loss. As there, the KL estimates are batch statistics that are *not* detached: gradient flows
    through them to every pair (and to none while the clamp is at 0).
    """
    pi_w, pi_l, ref_w, ref_l = _promote(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    delta_w, delta_l = pi_w - ref_w, pi_l - ref_l
    kl_w, kl_l = delta_w.mean().clamp(min=0), delta_l.mean().clamp(min=0)
    chosen = 1.0 - torch.sigmoid(beta * (delta_w - kl_l))
    rejected = 1.0 - torch.sigmoid(beta * (kl_w - delta_l))
    return 0.5 * (chosen + rejected)
