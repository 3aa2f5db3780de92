"""Projection heads of contrastive training, shared by training and the embed job
(``source: head`` features of an exported backbone)."""

from __future__ import annotations

import torch
from torch import nn

HEAD_PREFIX = "projection_head."


class ProjectionHead(nn.Module):
    """MLP projection head of SimCLR (Chen et al. 2020, arXiv:2002.05709, section 2.1).

    ``hidden_dim > 0``: Linear -> BatchNorm -> ReLU -> Linear; ``hidden_dim == 0``: one
    Linear layer (the SIMO2 reference uses a single dense projection).

    Args:
        in_dim: width of the backbone's pooled features.
        out_dim: embedding width (the loss operates here).
        hidden_dim: hidden width, or 0 for a linear head.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or hidden_dim < 0:
            raise ValueError(
                f"Expected positive head sizes, but got {in_dim=}, {out_dim=}, {hidden_dim=}"
            )
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        if hidden_dim:
            self.layers = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, in_dim) -> (B, out_dim)

    def spec(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim}
