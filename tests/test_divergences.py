"""Distillation math (specs/components.md §7.1–§7.3) against values worked out by hand in float64."""

import math

import pytest
import torch

from mllm_kit.objectives.divergences import (
    DIVERGENCES,
    divergence,
    dpo_loss,
    hidden_alignment,
    kto_pair_loss,
    relation_loss,
    soft_cross_entropy,
    zscore,
)

STUDENT = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]
TEACHER = [[1.5, 0.2, -0.3], [-1.0, 2.0, 0.5]]
DEFAULT_LAM = {"symmetric": 0.9, "js": 0.9, "skew_forward": 0.1, "skew_reverse": 0.1}


def _softmax(row):
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _expected(kind, s_row, t_row, lam):
    """The per-position value, written out over the probabilities."""
    ps, pt = _softmax(s_row), _softmax(t_row)
    if kind == "forward":
        return _kl(pt, ps)
    if kind == "reverse":
        return _kl(ps, pt)
    if kind == "symmetric":
        return (1 - lam) * _kl(pt, ps) + lam * _kl(ps, pt)
    if kind == "js":
        m = [(1 - lam) * a + lam * b for a, b in zip(pt, ps)]
        return lam * _kl(ps, m) + (1 - lam) * _kl(pt, m)
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    if kind == "skew_forward":
        return _kl(pt, [lam * a + (1 - lam) * b for a, b in zip(pt, ps)])
    if kind == "skew_reverse":
        return _kl(ps, [lam * b + (1 - lam) * a for a, b in zip(pt, ps)])
    raise AssertionError(kind)


def _logits():
    return torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_matches_hand_values_with_default_lam(kind):
    s, t = _logits()
    out = divergence(s, t, kind)
    assert out.shape == (2,) and out.dtype == torch.float64
    expected = [_expected(kind, sr, tr, DEFAULT_LAM.get(kind)) for sr, tr in zip(STUDENT, TEACHER)]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["symmetric", "js", "skew_forward", "skew_reverse"])
def test_divergence_explicit_lam(kind):
    s, t = _logits()
    expected = [_expected(kind, sr, tr, 0.3) for sr, tr in zip(STUDENT, TEACHER)]
    assert torch.allclose(divergence(s, t, kind, lam=0.3), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_js_at_half_is_the_usual_jensen_shannon():
    s, t = _logits()
    ps, pt = _softmax(STUDENT[0]), _softmax(TEACHER[0])
    m = [(a + b) / 2 for a, b in zip(ps, pt)]
    assert abs(divergence(s, t, "js", lam=0.5)[0].item() - (0.5 * _kl(ps, m) + 0.5 * _kl(pt, m))) < 1e-6


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_and_gradient_vanish_when_teacher_equals_student(kind):
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    out = divergence(s, s.detach().clone(), kind)
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.allclose(out, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_divides_logits_and_scales_by_tau_squared(kind):
    s, t = _logits()
    assert torch.allclose(divergence(s, t, kind, temperature=2.0), 4 * divergence(s / 2, t / 2, kind), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_minus_inf_entries_are_dropped_with_finite_gradients(kind):
    s, t = _logits()
    pad = torch.full((2, 1), float("-inf"), dtype=torch.float64)
    s_pad = torch.cat([s, pad], dim=1).requires_grad_(True)
    out = divergence(s_pad, torch.cat([t, pad], dim=1), kind)
    (grad,) = torch.autograd.grad(out.sum(), s_pad)
    assert torch.allclose(out, divergence(s, t, kind), atol=1e-6, rtol=0)
    assert torch.isfinite(grad).all()


def test_low_precision_inputs_are_computed_in_float32():
    s, t = _logits()
    assert divergence(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_unknown_kind_names_the_valid_ones():
    s, t = _logits()
    with pytest.raises(ValueError) as err:
        divergence(s, t, "wasserstein")
    assert all(k in str(err.value) for k in DIVERGENCES)
    with pytest.raises(ValueError, match="mse"):
        hidden_alignment(s, t, "l1")


def test_soft_cross_entropy_is_forward_kl_plus_teacher_entropy():
    s, t = _logits()
    entropy = torch.tensor([-sum(p * math.log(p) for p in _softmax(row)) for row in TEACHER], dtype=torch.float64)
    assert torch.allclose(soft_cross_entropy(s, t), divergence(s, t, "forward") + entropy, atol=1e-6, rtol=0)
    ce = [-sum(a * math.log(b) for a, b in zip(_softmax(tr), _softmax(sr))) for sr, tr in zip(STUDENT, TEACHER)]
    assert torch.allclose(soft_cross_entropy(s, t), torch.tensor(ce, dtype=torch.float64), atol=1e-6, rtol=0)


def test_zscore_is_llavadis_standardisation_and_keeps_masked_entries_out():
    # Row [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-7); [0, 0, 4]: mean 4/3, std 4/sqrt(3).
    got = zscore(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], dtype=torch.float64))
    s = 4 / math.sqrt(3) + 1e-7
    want = torch.tensor([[-1 / (1 + 1e-7), 0.0, 1 / (1 + 1e-7)], [-4 / 3 / s, -4 / 3 / s, 8 / 3 / s]], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    masked = torch.tensor([[1.0, -math.inf, 2.0, 3.0]], requires_grad=True)
    out = zscore(masked)
    assert out[0, 1] == -math.inf
    torch.testing.assert_close(out[0, [0, 2, 3]], got[0].float(), atol=1e-6, rtol=0)
    out[0, [0, 2, 3]].pow(2).sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_relation_loss_hand_values():
    z_s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)  # Z Z^T = [[1, 1], [1, 2]]
    z_t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # Z Z^T = I
    out = relation_loss(z_s, z_t)
    assert out.shape == (1,)
    assert abs(out.item() - (1 - 3 / math.sqrt(14))) < 1e-6
    # Unit rows: Z_s Z_s^T = [[1, 1/sqrt2], [1/sqrt2, 1]].
    assert abs(relation_loss(z_s, z_t, normalize_rows=True).item() - (1 - 2 / math.sqrt(6))) < 1e-6


def test_relation_loss_vanishes_for_equal_inputs_and_allows_different_widths():
    z = torch.tensor([[[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]], dtype=torch.float64)
    for normalize in (False, True):
        assert abs(relation_loss(z, z.clone(), normalize_rows=normalize).item()) < 1e-6
    # Same Gram matrix from a wider teacher: zero-padding the features does not change Z Z^T.
    wide = torch.cat([z, torch.zeros(1, 2, 2, dtype=torch.float64)], dim=-1)
    assert abs(relation_loss(z, wide).item()) < 1e-6


def test_hidden_alignment_hand_values_and_zero_at_equality():
    h_s = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    h_t = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(hidden_alignment(h_s, h_t, "mse"), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(hidden_alignment(h_s, h_t, "cosine"), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-6)
    for kind in ("mse", "cosine"):
        h = h_s.clone().requires_grad_(True)
        out = hidden_alignment(h, h_s.clone(), kind)
        (grad,) = torch.autograd.grad(out.sum(), h)
        assert torch.allclose(out, torch.zeros(2, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)


def test_dpo_is_log2_when_policy_equals_reference_and_matches_a_hand_value():
    w = torch.tensor([-3.0, -7.5], dtype=torch.float64)
    l = torch.tensor([-4.0, -1.0], dtype=torch.float64)
    assert torch.allclose(dpo_loss(w, l, w.clone(), l.clone()), torch.full((2,), math.log(2), dtype=torch.float64), atol=1e-6)
    # margin = (-1 - -2) - (-3 - -2) = 2, beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    one = lambda x: torch.tensor([x], dtype=torch.float64)
    assert abs(dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-2.0), beta=0.5).item() - math.log1p(math.exp(-1))) < 1e-6


def test_kto_pair_hand_value_and_gradient_through_the_kl_estimates():
    sig = lambda x: 1 / (1 + math.exp(-x))
    pol_w = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    pol_l = torch.tensor([-3.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    # Delta_w = [1, 0] -> KL_w = 0.5; Delta_l = [-1, 2] -> KL_l = 0.5; beta = 1.
    out = kto_pair_loss(pol_w, pol_l, ref, ref, beta=1.0)
    expected = [0.5 * ((1 - sig(0.5)) + (1 - sig(1.5))), 0.5 * ((1 - sig(-0.5)) + (1 - sig(-1.5)))]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    # Not detached: d mean / d Delta_w_j = (1/4) * (-sigma'(a_j) - (1/2) * sum_i sigma'(b_i)), sigma' = s(1 - s).
    (grad,) = torch.autograd.grad(out.mean(), pol_w)
    d = lambda x: sig(x) * (1 - sig(x))
    want = -(d(0.5) + d(1.5)) / 4
    assert torch.allclose(grad, torch.full((2,), want, dtype=torch.float64), atol=1e-6, rtol=0)
