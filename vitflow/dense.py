"""Dense features finer than the patch grid: pixel-shift upscaling (issue 13, part 2).

A ViT's patch tokens form a map at the patch stride ``p`` (14 px for DINOv2, 16 for most
ViTs). Pixel-shift upscaling gets a finer map from the same model:

1. shift the input image by each offset, in the 4 (von Neumann) or 8 (Moore) directions,
   with wrap-around (``torch.roll``); the identity shift is always included;
2. compute the patch map of each shifted image;
3. place each map back at pixel resolution (each token covers its ``p x p`` pixels) and
   undo its shift;
4. average them.

The result is computed at an output stride ``s`` that divides the patch size and every
offset (by default their greatest common divisor), so each token is spread over
``p/s x p/s`` cells and every shift moves whole cells. The map held is ``(B, D, H/s, W/s)``:
at ``s = 1`` (DINOv2's patch 14 with offsets 7, 4, 2) that is the full width at every pixel,
~1 GB per 518 px image for a 1024-d model. A linear projection (a PCA fitted on a sample)
commutes with steps 3 and 4, so :func:`pixel_shift` projects each map first when given
one, and averages in the smaller space with the same result as projecting the average:
pass ``project`` (or a coarser stride) for wide models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

NEIGHBOURHOODS = {
    "von_neumann": ((0, 1), (1, 0), (0, -1), (-1, 0)),
    "moore": ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)),
}


def shift_offsets(pixels: Sequence[int], neighbourhood: str) -> list[tuple[int, int]]:
    """``(dy, dx)`` of every shifted copy: the identity first, then each offset in each
    direction of the neighbourhood (duplicates dropped, order kept).

    Example:
        >>> shift_offsets([2], "von_neumann")
        [(0, 0), (0, 2), (2, 0), (0, -2), (-2, 0)]
    """
    if neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(
            f"unknown neighbourhood {neighbourhood!r}; expected one of {sorted(NEIGHBOURHOODS)}"
        )
    if any(int(p) <= 0 for p in pixels):
        raise ValueError(f"shift pixels must be positive, got {list(pixels)}")
    out = [(0, 0)]
    for p in pixels:
        for dy, dx in NEIGHBOURHOODS[neighbourhood]:
            if (p * dy, p * dx) not in out:
                out.append((p * dy, p * dx))
    return out


def output_stride(patch: int, pixels: Sequence[int], stride: int | None = None) -> int:
    """The output stride: ``stride`` if given (it must divide the patch size and every
    offset), else the greatest common divisor of them all."""
    common = math.gcd(patch, *[int(p) for p in pixels])
    if stride is None:
        return common
    if stride <= 0 or common % stride:
        raise ValueError(
            f"output stride {stride} must divide the patch size {patch} and every shift "
            f"{list(pixels)} (their greatest common divisor is {common})"
        )
    return stride


def pixel_shift(
    patch_map: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    patch: int,
    pixels: Sequence[int],
    neighbourhood: str = "von_neumann",
    stride: int | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The pixel-shift average of a model's patch map.

    Args:
        patch_map: ``(B, 3, H, W)`` -> ``(B, D, H/p, W/p)``, the model's patch-token map.
        images: ``(B, 3, H, W)``, normalised model input; ``H`` and ``W`` multiples of
            ``patch``.
        patch: the patch size ``p``.
        pixels: shift offsets in pixels (e.g. ``[7, 4, 2]``).
        neighbourhood: ``von_neumann`` (4 directions) or ``moore`` (8).
        stride: output stride (default: gcd of ``patch`` and ``pixels``).
        project: optional linear map applied to each ``(B, D, h, w)`` patch map before it is
            placed and averaged (e.g. a PCA to ``k`` components), returning ``(B, k, h, w)``.

    Returns:
        ``(B, D or k, H/s, W/s)`` float32.
    """
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    s = output_stride(patch, pixels, stride)
    k = patch // s
    total: torch.Tensor | None = None
    offsets = shift_offsets(pixels, neighbourhood)
    for dy, dx in offsets:
        fmap = patch_map(torch.roll(images, shifts=(dy, dx), dims=(2, 3))).float()
        if tuple(fmap.shape[-2:]) != (h // patch, w // patch):
            raise ValueError(
                f"the patch map is {tuple(fmap.shape[-2:])}, expected "
                f"{(h // patch, w // patch)} for {h}x{w} images and patch size {patch}"
            )
        if project is not None:
            fmap = project(fmap)
        cells = fmap.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
        back = torch.roll(cells, shifts=(-dy // s, -dx // s), dims=(2, 3))
        total = back if total is None else total.add_(back)
    assert total is not None
    return total.div_(len(offsets))
