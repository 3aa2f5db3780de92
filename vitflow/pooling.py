"""Pooling of block outputs into vectors, aggregation across layers, and normalisation.

Token outputs (ViT family) arrive as patch tokens ``(B, N, D)`` plus prefix tokens
``(B, P, D)`` (CLS first, then register tokens); spatial outputs (CNN stages, Hiera) arrive
as maps ``(B, C, H, W)``. Every function here is a closed form, tested against plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEM_P = 3.0  # GeM exponent from Radenovic et al., "Fine-tuning CNN Image Retrieval..." (2018)
GEM_EPS = 1e-6


def pool_tokens(patch: torch.Tensor, prefix: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Pool one layer's tokens.

    Args:
        patch: patch tokens ``(B, N, D)``; never includes CLS or register tokens.
        prefix: prefix tokens ``(B, P, D)`` with CLS at index 0, or None when the model
            has none. Callers check that a CLS token exists before asking for ``cls``.
        pool: ``cls`` (prefix token 0), ``mean`` (mean of patch tokens) or ``cls_mean``
            (the two concatenated, CLS first).

    Returns:
        ``(B, D)`` or ``(B, 2D)`` for ``cls_mean``.
    """
    if pool == "mean":
        return patch.mean(dim=1)
    if prefix is None or prefix.shape[1] == 0:
        raise ValueError(f"pool={pool!r} needs a CLS token, but this layer has no prefix tokens")
    cls = prefix[:, 0]
    if pool == "cls":
        return cls
    if pool == "cls_mean":
        return torch.cat([cls, patch.mean(dim=1)], dim=-1)
    raise ValueError(f"Expected a token pool (cls, mean, cls_mean), but got {pool!r}")


def pool_map(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Globally pool a feature map ``(B, C, H, W)`` to ``(B, C)``.

    ``avg`` is the spatial mean, ``max`` the spatial max, ``gem`` generalised mean
    pooling with p=3: ``mean(clamp(x, eps) ** p) ** (1 / p)``.
    """
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    if pool == "gem":
        # GeM is defined on non-negative activations; the clamp keeps the root real.
        return x.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    raise ValueError(f"Expected a map pool (avg, max, gem), but got {pool!r}")


def aggregate_layers(pooled: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-layer vectors: ``concat`` along features (layer order kept) or ``mean``."""
    if how == "concat":
        return torch.cat(pooled, dim=-1)
    if how == "mean":
        if len({p.shape[-1] for p in pooled}) > 1:
            dims = [p.shape[-1] for p in pooled]
            raise ValueError(
                f"aggregate=mean needs layers of one width, but got widths {dims}; "
                "use aggregate: concat or pick layers of equal width"
            )
        return torch.stack(pooled, dim=0).mean(dim=0)
    raise ValueError(f"Expected aggregate concat or mean, but got {how!r}")


def normalize_vectors(x: torch.Tensor, how: str) -> torch.Tensor:
    """``l2``: unit length rows (a zero row stays zero); ``none``: unchanged."""
    if how == "l2":
        return F.normalize(x, p=2.0, dim=-1, eps=1e-12)
    if how == "none":
        return x
    raise ValueError(f"Expected normalize l2 or none, but got {how!r}")
