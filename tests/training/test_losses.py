"""SIMO2 and NT-Xent against slow references written straight from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitflow.training.losses import NTXentLoss, SIMO2Loss, pair_loss


def _ell(e, f, t, eps):
    """One pair, exactly as the formula reads."""
    return (1 + torch.dot(e, f) ** 2 / (eps + torch.sum((e - f) ** 2))) ** (1 - 2 * t)


def simo2_reference(z, num_classes, orth_lean, eps):
    """SIMO2 with explicit loops over classes, samples and pairs."""
    k = z.shape[0] // num_classes
    zs = [[z[c * k + i] for i in range(k)] for c in range(num_classes)]
    same = sum(
        _ell(zs[c][i], zs[c][j], 1.0, eps)
        for c in range(num_classes)
        for i in range(k)
        for j in range(i + 1, k)
    )
    means_ = [sum(zs[c]) / k for c in range(num_classes)]
    means = sum(
        _ell(means_[a], means_[b], orth_lean, eps)
        for a in range(num_classes)
        for b in range(a + 1, num_classes)
    )
    diff = sum(
        _ell(zs[a][s], zs[b][s], orth_lean, eps)
        for s in range(k)
        for a in range(num_classes)
        for b in range(a + 1, num_classes)
    )
    return same + means + diff, same, means, diff


@pytest.mark.parametrize(
    ("c", "k", "d", "orth_lean"),
    [(2, 2, 3, 1 / 137), (3, 4, 8, 1 / 137), (5, 3, 16, 0.0), (4, 2, 5, 0.25), (2, 6, 4, 0.1)],
)
def test_simo2_matches_reference_value_and_gradient(c, k, d, orth_lean):
    torch.manual_seed(c * 100 + k * 10 + d)
    x = torch.randn(c * k, d, dtype=torch.float64, requires_grad=True)
    eps = 1 / 137
    out = SIMO2Loss(orth_lean=orth_lean, eps=eps)(F.normalize(x, dim=1), num_classes=c)
    ref = simo2_reference(F.normalize(x, dim=1), c, orth_lean, eps)

    for got, want in zip((out.loss, out.same, out.means, out.diff), ref, strict=True):
        torch.testing.assert_close(got, want)
    (g_out,) = torch.autograd.grad(out.loss, x)
    (g_ref,) = torch.autograd.grad(ref[0], x)
    torch.testing.assert_close(g_out, g_ref)


def test_simo2_closed_form_orthonormal():
    # Four orthonormal samples: every dot product is 0, so every pair contributes 1**p = 1.
    # same: 1 pair per class x 2 classes; means: 1 pair; diff: 1 pair per slot x 2 slots.
    z = torch.eye(4, dtype=torch.float64)
    out = SIMO2Loss(orth_lean=0.3)(z, num_classes=2)
    assert (out.same.item(), out.means.item(), out.diff.item()) == (2.0, 1.0, 2.0)
    assert out.loss.item() == 5.0


def test_simo2_closed_form_duplicate_and_tilted():
    # Class 0 = (e1, e1); class 1 = (e2, (e1 + e2)/sqrt2); eps = 1/137, orth_lean = 1/4.
    eps, lam, r = 1 / 137, 0.25, 1 / math.sqrt(2)
    e1, e2 = torch.eye(2, dtype=torch.float64)
    z = torch.stack([e1, e1, e2, r * (e1 + e2)])
    out = SIMO2Loss(orth_lean=lam, eps=eps)(z, num_classes=2)

    tilted = 0.5 / (eps + 2 - math.sqrt(2))  # e·f = 1/sqrt2, |e - f|² = 2 - sqrt2
    same = 1 / (1 + 1 / eps) + 1 / (1 + tilted)  # identical pair: e·f = 1, |e - f|² = 0
    # m0 = e1, m1 = (r/2) e1 + (1/2 + r/2) e2
    m_dot2 = (r / 2) ** 2
    m_dist2 = (1 - r / 2) ** 2 + (0.5 + r / 2) ** 2
    means = (1 + m_dot2 / (eps + m_dist2)) ** 0.5
    diff = 1.0 + (1 + tilted) ** 0.5  # slot 0: e1 ⟂ e2; slot 1: e1 vs tilted
    assert out.same.item() == pytest.approx(same, rel=1e-12)
    assert out.means.item() == pytest.approx(means, rel=1e-12)
    assert out.diff.item() == pytest.approx(diff, rel=1e-12)
    assert out.loss.item() == pytest.approx(same + means + diff, rel=1e-12)


def test_pair_loss_sums_rows():
    e, f = torch.randn(6, 4), torch.randn(6, 4)
    rows = sum(pair_loss(e[i : i + 1], f[i : i + 1], 0.3) for i in range(6))
    torch.testing.assert_close(pair_loss(e, f, 0.3), rows)


@pytest.mark.parametrize(
    ("shape", "num_classes", "match"),
    [
        ((6, 4), 4, "divisible by num_classes=4"),
        ((3, 4), 3, ">= 2 samples per class"),
        ((4, 4), 1, "num_classes >= 2"),
        ((4,), 2, r"\(C \* K, D\)"),
    ],
)
def test_simo2_rejects_bad_shapes(shape, num_classes, match):
    with pytest.raises(ValueError, match=match):
        SIMO2Loss()(torch.randn(shape), num_classes=num_classes)


def ntxent_reference(z0, z1, temperature):
    """SimCLR Algorithm 1: interleave views, loop over anchors, average over 2N anchors."""
    n = z0.shape[0]
    z = [v for k in range(n) for v in (z0[k], z1[k])]  # z[2k], z[2k+1] are one image's views
    sim = [[torch.dot(a, b) / (a.norm() * b.norm()) for b in z] for a in z]

    def ell(i, j):
        denom = sum(torch.exp(sim[i][k] / temperature) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(sim[i][j] / temperature) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize(("b", "d", "temperature"), [(2, 3, 0.5), (4, 8, 0.1), (5, 6, 1.0)])
def test_ntxent_matches_reference_value_and_gradient(b, d, temperature):
    torch.manual_seed(b * 10 + d)
    z0 = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    got = NTXentLoss(temperature=temperature)(z0, z1)
    want = ntxent_reference(z0, z1, temperature)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (z0, z1))
    g_want = torch.autograd.grad(want, (z0, z1))
    for a, w in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, w)


def test_ntxent_rejects_bad_inputs():
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="temperature > 0"):
        NTXentLoss(temperature=0.0)
