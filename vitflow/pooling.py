"""Pooling of block outputs into vectors, aggregation across layers, and normalisation.

Token outputs (ViT family) arrive as patch tokens ``(B, N, D)`` plus prefix tokens
``(B, P, D)`` (CLS first, then register tokens); spatial outputs (CNN stages, Hiera) arrive
as maps ``(B, C, H, W)``. Every function here is a closed form, tested against plain torch.

Every pool lives in ONE registry, :data:`POOLS`, as timm keeps a pool's names, function and
output-width rule together (``timm/layers/adaptive_avgmax_pool.py``): its name, the kind of
output it applies to, whether it needs a CLS token, its output width and its function. The
job config's allowed values, the feature checks and their messages all derive from it.
torch is imported inside the functions only, so the config reads the registry without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

GEM_P = 3.0  # GeM exponent from Radenovic et al., "Fine-tuning CNN Image Retrieval..." (2018)
GEM_EPS = 1e-6

PoolKind = Literal["token", "map"]
#: How each kind of layer output is named in messages.
KIND_WORDS: dict[str, str] = {"token": "tokens", "map": "spatial feature maps"}


@dataclass(frozen=True)
class Pool:
    """One way to turn a layer's output into a vector.

    Attributes:
        name: what a job writes as ``pool:``.
        kind: ``token`` (called as ``fn(patch (B, N, D), prefix (B, P, D) | None)``) or ``map``
            (called as ``fn(x (B, C, H, W))``).
        needs_cls: the pool reads the CLS token (prefix token 0).
        width_mult: output width = ``width_mult`` x the layer's width (D or C), as timm's
            ``adaptive_pool_feat_mult``.
        fn: the pooling itself.
        about: one phrase for docs and ``--help``.
    """

    name: str
    kind: PoolKind
    needs_cls: bool
    width_mult: int
    fn: Callable[..., torch.Tensor]
    about: str

    def width(self, in_dim: int) -> int:
        """Output width for a layer of width ``in_dim`` (D for tokens, C for maps)."""
        return self.width_mult * in_dim


def _cls(patch: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    return prefix[:, 0]


def _mean(patch: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    return patch.mean(dim=1)  # patch tokens only: never CLS or register tokens


def _cls_mean(patch: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([prefix[:, 0], patch.mean(dim=1)], dim=-1)  # (B, 2D), CLS first


def _avg(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


def _gem(x: torch.Tensor) -> torch.Tensor:
    # GeM is defined on non-negative activations; the clamp keeps the root real.
    return x.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


POOLS: dict[str, Pool] = {
    p.name: p
    for p in (
        Pool("cls", "token", True, 1, _cls, "the CLS token"),
        Pool("mean", "token", False, 1, _mean, "patch tokens only, never CLS or registers"),
        Pool("cls_mean", "token", True, 2, _cls_mean, "both, concatenated"),
        Pool("avg", "map", False, 1, _avg, "spatial mean"),
        Pool("max", "map", False, 1, _max, "spatial max"),
        Pool("gem", "map", False, 1, _gem, f"generalised mean, p={GEM_P:g}"),
    )
}

#: Other names a pool answers to on one kind of output: the ``mean`` of a feature map is its
#: spatial average, so ``pool: mean`` works for ViTs and CNNs alike.
ALIASES: dict[tuple[PoolKind, str], str] = {("map", "mean"): "avg"}

#: Every value a job may write as ``pool:`` (registry names, then aliases).
POOL_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*POOLS, *(a for _, a in ALIASES)]))


def pool_names(kind: PoolKind, *, has_cls: bool = True) -> tuple[str, ...]:
    """Registry names of the pools for ``kind``; without those that need a CLS token when
    the model has none."""
    return tuple(p.name for p in POOLS.values() if p.kind == kind and (has_cls or not p.needs_cls))


def spell_choices(names: tuple[str, ...] | list[str]) -> str:
    """``cls, mean or cls_mean``: a list of pool names as a message says it."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def describe_pools() -> str:
    """One line per kind, for the config's field description."""
    parts = []
    for kind, word in KIND_WORDS.items():
        names = " | ".join(f"{p.name} ({p.about})" for p in POOLS.values() if p.kind == kind)
        aliases = [f"{a} = {c}" for (k, a), c in ALIASES.items() if k == kind]
        parts.append(f"{word}: {names}" + (f"; {', '.join(aliases)}" if aliases else ""))
    return ". ".join(p[0].upper() + p[1:] for p in parts) + "."


def find_pool(name: str, kind: PoolKind) -> Pool | None:
    """The pool ``name`` means on output of ``kind`` (aliases resolved), or None when it is
    not a pool for that kind (or not a pool at all)."""
    pool = POOLS.get(ALIASES.get((kind, name), name))
    return pool if pool is not None and pool.kind == kind else None


def _get(name: str, kind: PoolKind) -> Pool:
    pool = find_pool(name, kind)
    if pool is None:
        what = "a token pool" if kind == "token" else "a map pool"
        raise ValueError(f"Expected {what} ({spell_choices(pool_names(kind))}), but got {name!r}")
    return pool


def pool_tokens(patch: torch.Tensor, prefix: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Pool one layer's tokens.

    Args:
        patch: patch tokens ``(B, N, D)``; never includes CLS or register tokens.
        prefix: prefix tokens ``(B, P, D)`` with CLS at index 0, or None when the model
            has none. Callers check that a CLS token exists before asking for ``cls``.
        pool: a token pool of :data:`POOLS`: ``cls`` (prefix token 0), ``mean`` (mean of
            patch tokens) or ``cls_mean`` (the two concatenated, CLS first).

    Returns:
        ``(B, width)`` with width ``POOLS[pool].width(D)``: D, or 2D for ``cls_mean``.
    """
    p = _get(pool, "token")
    if p.needs_cls and (prefix is None or prefix.shape[1] == 0):
        raise ValueError(f"pool={pool!r} needs a CLS token, but this layer has no prefix tokens")
    return p.fn(patch, prefix)


def pool_map(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Globally pool a feature map ``(B, C, H, W)`` to ``(B, C)``.

    ``avg`` (also spelled ``mean``) is the spatial mean, ``max`` the spatial max, ``gem``
    generalised mean pooling with p=3: ``mean(clamp(x, eps) ** p) ** (1 / p)``.
    """
    return _get(pool, "map").fn(x)


def aggregate_layers(pooled: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-layer vectors: ``concat`` along features (layer order kept) or ``mean``."""
    import torch

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
    import torch.nn.functional as F

    if how == "l2":
        return F.normalize(x, p=2.0, dim=-1, eps=1e-12)
    if how == "none":
        return x
    raise ValueError(f"Expected normalize l2 or none, but got {how!r}")
