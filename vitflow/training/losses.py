"""Contrastive pretraining losses: SIMO2 (class-balanced) and NT-Xent (SimCLR).

Both take projection-head outputs. SIMO2 expects rows already L2-normalised and laid out
class-major (see :class:`vitflow.training.sampler.ClassBalancedBatchSampler`); NT-Xent
normalises its inputs itself, as in the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitflow.training.distributed import all_gather_with_grad, rank_and_world

ORTH_LEAN = 1 / 137  # SIMO2 default; t slightly above 0 makes the term a gentle push apart
PAIR_EPS = 1 / 137  # keeps the ratio finite when two rows coincide (e.g. duplicate samples)


def pair_loss(e: torch.Tensor, f: torch.Tensor, t: float, eps: float = PAIR_EPS) -> torch.Tensor:
    """Sum over paired rows of ``(1 + (e·f)² / (eps + |e − f|²)) ** (1 − 2t)``.

    With ``t = 1`` the exponent is −1, so minimising rewards large similarity and small
    distance (pull together); with ``t`` near 0 it rewards ``e·f → 0`` (orthogonality).

    Args:
        e: rows ``(..., D)``.
        f: rows paired with ``e``, same shape.
        t: lean of the term: 1 for "same", ``orth_lean`` for "different".
        eps: added to the squared distance.

    Returns:
        A scalar: the sum over all pairs.
    """
    dot = (e * f).sum(dim=-1)  # (...)
    dist2 = (e - f).pow(2).sum(dim=-1)  # (...)
    return (1 + dot.pow(2) / (eps + dist2)).pow(1 - 2 * t).sum()


class SIMO2Output(NamedTuple):
    """SIMO2 loss and its three terms, each a scalar tensor (logged separately)."""

    loss: torch.Tensor
    same: torch.Tensor
    means: torch.Tensor
    diff: torch.Tensor


def _pair_terms(x: torch.Tensor, t: float, eps: float) -> torch.Tensor:
    """``pair_loss`` summed over every pair ``i < j`` of rows within each group of ``x``.

    Computed from the Gram matrix (``|e − f|² = |e|² + |f|² − 2 e·f``), so the memory is
    ``G × N × N`` scalars instead of ``G × N²/2`` row pairs of width ``D``: at ImageNet-sized
    batches (hundreds of classes) the row-pair tensor would not fit.

    Args:
        x: rows ``(G, N, D)``: ``G`` independent groups of ``N`` rows.
        t: lean of the term, as in :func:`pair_loss`.
        eps: added to the squared distance.
    """
    n = x.shape[1]
    dot = x @ x.transpose(1, 2)  # (G, N, N)
    sq = x.pow(2).sum(dim=-1)  # (G, N)
    # Rounding can make the expanded distance of near-equal rows slightly negative.
    dist2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * dot).clamp_min(0)  # (G, N, N)
    i, j = torch.triu_indices(n, n, 1, device=x.device)  # (P,)
    return (1 + dot[:, i, j].pow(2) / (eps + dist2[:, i, j])).pow(1 - 2 * t).sum()


class SIMO2Loss(nn.Module):
    """Class-balanced SIMO2 loss on L2-normalised projections, over the global batch.

    Follows the SIMO2 description (class-balanced contrastive learning from SimO: Bouhsine
    et al. 2024, "SimO Loss: Anchor-Free Contrastive Loss for Fine-Grained Supervised
    Contrastive Learning", arXiv:2410.05233): intra-class similarity, inter-class
    orthogonality and class-mean separation. With
    ``ℓ_t(e, f) = (1 + (e·f)² / (eps + |e − f|²)) ** (1 − 2t)`` and a batch of ``C``
    classes × ``K`` samples ``z[c, k]``:

    - ``same  = Σ_c Σ_{i<j} ℓ_1(z[c, i], z[c, j])``
    - ``means = Σ_{a<b} ℓ_λ(m_a, m_b)`` with ``m_c = mean_k z[c, k]`` (not re-normalised)
    - ``diff  = Σ_k Σ_{a<b} ℓ_λ(z[a, k], z[b, k])``
    - ``loss  = same + means + diff``, ``λ = orth_lean``.

    Terms are sums, not means, so their scale grows with ``C`` and ``K``.

    Under DDP each rank holds whole classes of the global batch (see
    :class:`~vitflow.training.sampler.ClassBalancedBatchSampler`); the projections of all
    ranks are gathered (:func:`~vitflow.training.distributed.all_gather_with_grad`, in rank
    order, which is the global batch's class order) and every rank computes the loss of the
    whole global batch. The between-class terms therefore pair classes of different ranks,
    the value is the same on every rank and for any worker count, and DDP's gradient
    averaging over ranks yields exactly the single-process gradient (the convention of
    :mod:`vitflow.training.distributed`). The pair terms cost ``O(K·C²)`` dot products, far
    below one forward pass, so every rank repeats them rather than exchanging partial sums.

    Args:
        orth_lean: ``t`` of the "different" and "means" terms (default 1/137).
        eps: added to squared distances (default 1/137).
        gather_distributed: gather projections from all ranks when a process group with more
            than one rank is initialised (default True).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z = F.normalize(torch.randn(3 * 4, 8), dim=1)  # 3 classes x 4 samples
        >>> out = SIMO2Loss()(z, num_classes=3)
        >>> out.loss.shape
        torch.Size([])
    """

    def __init__(
        self, orth_lean: float = ORTH_LEAN, eps: float = PAIR_EPS, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"Expected eps > 0, but got {eps}")
        self.orth_lean = orth_lean
        self.eps = eps
        self.gather_distributed = gather_distributed

    def forward(self, z: torch.Tensor, num_classes: int) -> SIMO2Output:
        """Compute the loss of the global batch.

        Args:
            z: this rank's L2-normalised projections ``(C * K, D)``, class-major: rows
                ``[c * K:(c + 1) * K]`` are class ``c``'s samples. Every rank passes the
                same shape.
            num_classes: ``C``, the classes in this rank's ``z``; the global batch has
                ``C * world_size`` classes.
        """
        if z.ndim != 2:
            raise ValueError(f"Expected z of shape (C * K, D), but got {tuple(z.shape)}")
        rows, dim = z.shape
        if num_classes < 1 or rows % num_classes:
            raise ValueError(
                f"Expected rows divisible by num_classes={num_classes}, but got {rows} rows"
            )
        k = rows // num_classes
        if k < 2:
            raise ValueError(
                f"Expected >= 2 samples per class (the same-class term needs pairs), but got {k}"
            )
        _, world = rank_and_world() if self.gather_distributed else (0, 1)
        if world > 1:
            z = all_gather_with_grad(z)  # (W * C * K, D): rank r's classes after rank r-1's
            num_classes *= world
        if num_classes < 2:
            raise ValueError(
                f"Expected num_classes >= 2 (the inter-class terms need pairs), but got {num_classes}"
            )
        zc = z.reshape(num_classes, k, dim)  # (C, K, D)
        same = _pair_terms(zc, 1.0, self.eps)  # pairs within each class
        means = _pair_terms(zc.mean(dim=1).unsqueeze(0), self.orth_lean, self.eps)  # (1, C, D)
        diff = _pair_terms(zc.transpose(0, 1), self.orth_lean, self.eps)  # (K, C, D): slot k
        return SIMO2Output(loss=same + means + diff, same=same, means=means, diff=diff)


class NTXentLoss(nn.Module):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", arXiv:2002.05709. Each of the ``2N`` views is an anchor whose positive
    is the other view of the same image and whose negatives are the other ``2N − 2`` views:
    ``l(i, j) = −log exp(sim(i, j)/τ) / Σ_{k≠i} exp(sim(i, k)/τ)``. Under DDP the negatives
    come from every worker (``N = W · B``) and each worker averages over its own ``2B``
    anchors; DDP's gradient averaging then yields the global-batch loss (see
    :mod:`vitflow.training.distributed`).

    Args:
        temperature: ``τ`` (default 0.5, the paper's CIFAR-10 value).
        gather_distributed: gather negatives from all workers when a process group with
            more than one rank is initialised (default True).

    Example:
        >>> import torch
        >>> loss = NTXentLoss()(torch.randn(4, 8), torch.randn(4, 8))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"Expected temperature > 0, but got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """Mean NT-Xent over this worker's ``2B`` anchors.

        Args:
            z0: projections of the first views ``(B, D)``; not necessarily normalised.
            z1: projections of the second views ``(B, D)``; row ``i`` pairs with ``z0[i]``.
        """
        if z0.ndim != 2 or z0.shape != z1.shape:
            raise ValueError(
                f"Expected two (B, D) tensors of equal shape, but got {tuple(z0.shape)} "
                f"and {tuple(z1.shape)}"
            )
        b = z0.shape[0]
        z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)  # (B, D)
        rank, world = rank_and_world() if self.gather_distributed else (0, 1)
        if world > 1:
            g0, g1 = all_gather_with_grad(z0), all_gather_with_grad(z1)  # (N, D), N = W * B
        else:
            g0, g1 = z0, z1
        n = g0.shape[0]
        anchors = torch.cat([z0, z1])  # (2B, D)
        candidates = torch.cat([g0, g1])  # (2N, D): first views of all workers, then second
        logits = anchors @ candidates.T / self.temperature  # (2B, 2N)

        # Local row i sits at global row rank * B + i of each half of `candidates`.
        local = torch.arange(b, device=z0.device) + rank * b  # (B,)
        self_col = torch.cat([local, local + n])  # (2B,)
        pos_col = torch.cat([local + n, local])  # (2B,): the other view
        rows = torch.arange(2 * b, device=z0.device)
        # -inf drops self-similarity from the softmax: 2N - 1 candidates remain.
        is_self = torch.zeros_like(logits, dtype=torch.bool)  # (2B, 2N)
        is_self[rows, self_col] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        return F.cross_entropy(logits, pos_col)
