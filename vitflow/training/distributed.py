"""Gathering tensors across DDP workers without breaking the gradient.

``torch.distributed.all_gather`` writes into pre-allocated buffers and is invisible to
autograd, so a loss built on gathered negatives (NT-Xent across workers, SimCLR: Chen et
al. 2020, arXiv:2002.05709) would only send gradient through this worker's own rows.
:func:`all_gather_with_grad` keeps the full gradient.

Gradient convention
-------------------
Every rank ``r`` computes a local loss ``L_r`` on the gathered batch; DDP then *averages*
parameter gradients over the ``W`` ranks, so the objective actually optimised is
``L = (1 / W) * sum_r L_r``. The exact gradient of ``L`` with respect to rank ``r``'s
input rows ``x_r`` is ``(1 / W) * sum_r' dL_r' / dx_r``: every rank's loss depends on
``x_r`` through the gather. The backward therefore **sums** the incoming gradient over
ranks (``all_reduce(SUM)``) and returns this rank's slice; after that rank ``r`` holds
``sum_r' dL_r' / dx_r`` and DDP's division by ``W`` completes the exact gradient of ``L``.
With equal local batches, ``L`` is the single-process loss on the global batch whenever
``L_r`` is a mean over this rank's anchors (the mean of equal-sized means is the global
mean), so training matches one process on the whole batch. Averaging instead of summing
in the backward would shrink the cross-rank part of the gradient by ``W``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, ``(0, 1)`` without one.

    Example:
        >>> rank_and_world()  # no process group in a plain Python session
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Autograd-aware all-gather along dim 0; see the module docstring for the convention."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        # all_gather needs contiguous buffers of identical shape on every rank.
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce works in place; cloning keeps autograd's buffer untouched.
        grad = grad.contiguous().clone()  # (W * B, ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]  # (B, ...)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, keeping gradients.

    Without an initialised process group (or with one rank) this returns ``x`` itself, so
    single-process code paths need no special case. Every rank must pass a tensor of the
    same shape (``all_gather`` requires it; class-balanced and fixed-size batches do), and
    every rank must run the backward too, since it is a collective.

    Args:
        x: this rank's rows ``(B, ...)``.

    Returns:
        ``(W * B, ...)``; rows ``[r * B:(r + 1) * B]`` come from rank ``r``. The backward
        sums gradients over ranks, matching DDP's gradient averaging (module docstring).

    Example:
        >>> import torch
        >>> all_gather_with_grad(torch.ones(2, 3)).shape  # one process: identity
        torch.Size([2, 3])
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)
