"""Image transforms for pretraining: SimCLR and SIMO2 augmentations, and the eval transform.

All three take RGB PIL images and end in ``ToTensor`` + ``Normalize``. The eval transform is
built by timm from :func:`eval_data_config`, the same dict the embed job hands to timm, so a
backbone is evaluated during training exactly as it will be fed in production.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T

MIN_IMAGE_SIZE = 8  # below this a 10% blur kernel and random crops lose all meaning


def _check_config(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Validate the shared constructor arguments; return them as plain ints/tuples."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"Expected image_size to be an int, but got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"Expected image_size >= {MIN_IMAGE_SIZE}, but got {image_size}")
    out = []
    for name, values in (("mean", mean), ("std", std)):
        values = tuple(float(v) for v in values)
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"Expected {name} to be 3 finite floats (RGB), but got {values}")
        out.append(values)
    if min(out[1]) <= 0:
        raise ValueError(f"Expected every std > 0, but got {out[1]}")
    return image_size, out[0], out[1]


def eval_data_config(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """The timm data config a backbone trained here must be fed with at inference.

    Shortest side resized to ``image_size`` (bicubic), then a centre crop: ``crop_pct=1.0``
    because the SIMO2 views are made the same way, so train and eval see the same framing.

    Args:
        image_size: square input side in pixels.
        mean: per-channel RGB mean used by ``Normalize``.
        std: per-channel RGB std used by ``Normalize``.

    Returns:
        ``{"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}``.

    Example:
        >>> eval_data_config(32, (0.5,) * 3, (0.5,) * 3)["input_size"]
        (3, 32, 32)
    """
    image_size, mean, std = _check_config(image_size, mean, std)
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


class EvalTransform:
    """timm's eval transform for :func:`eval_data_config`: resize, centre crop, normalise.

    Built with ``timm.data.create_transform(..., is_training=False)`` rather than by hand so
    it cannot drift from what the embed job (which calls timm on the same dict) does.

    Args:
        image_size: square output side.
        mean: per-channel RGB mean.
        std: per-channel RGB std.

    Example:
        >>> from PIL import Image
        >>> EvalTransform(32, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.data_config = eval_data_config(image_size, mean, std)
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> ``float32`` ``(3, S, S)``."""
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel side closest to 10% of the image side (SimCLR appendix A), >= 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


class SimCLRTransform:
    """Two independent SimCLR views of one image.

    The augmentation of Chen et al. 2020, "A Simple Framework for Contrastive Learning of
    Visual Representations" (arXiv:2002.05709), appendix A, scaled to ``image_size``:
    random resized crop (scale 0.08-1, bicubic), horizontal flip, colour jitter with
    p=0.8, grayscale with p=0.2, Gaussian blur (kernel ~10% of the side, sigma 0.1-2) with
    p=0.5. The jitter is ``(0.8s, 0.8s, 0.8s, 0.2s)``; ``s=0.5`` gives
    ``ColorJitter(0.4, 0.4, 0.4, 0.1)``, the strength the paper uses at small resolution
    (CIFAR-10, appendix B.9); its ImageNet runs use ``s=1``.

    Randomness comes from torch's global generator, so ``torch.manual_seed`` (per data
    loader worker) makes the views reproducible.

    Args:
        image_size: square output side.
        mean: per-channel RGB mean.
        std: per-channel RGB std.
        jitter_strength: colour distortion strength ``s``. Default 0.5.
        min_scale: smallest crop area fraction. Default 0.08.

    Example:
        >>> from PIL import Image
        >>> v0, v1 = SimCLRTransform(32, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (50, 40)))
        >>> v0.shape, v1.shape
        (torch.Size([3, 32, 32]), torch.Size([3, 32, 32]))
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        jitter_strength: float = 0.5,
        min_scale: float = 0.08,
    ):
        image_size, mean, std = _check_config(image_size, mean, std)
        if not jitter_strength >= 0:
            raise ValueError(f"Expected jitter_strength >= 0, but got {jitter_strength}")
        if not 0 < min_scale <= 1:
            raise ValueError(f"Expected 0 < min_scale <= 1, but got {min_scale}")
        s = jitter_strength
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(
                    image_size,
                    scale=(min_scale, 1.0),
                    interpolation=T.InterpolationMode.BICUBIC,
                ),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply(
                    [T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5
                ),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB image -> two views, each ``float32`` ``(3, S, S)``, drawn independently."""
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class SIMO2Transform:
    """One lightly augmented SIMO2 view: eval framing, colour jitter, horizontal flip.

    SIMO2 contrasts different images of the same class, so the views keep the whole
    object: the geometry is the eval transform's (shortest side to ``image_size``, bicubic,
    centre crop) and only photometric jitter and a flip are random.

    Args:
        image_size: square output side.
        mean: per-channel RGB mean.
        std: per-channel RGB std.
        jitter: brightness, contrast and saturation jitter. Default 0.4; 0 disables it.
        flip_p: probability of a horizontal flip. Default 0.5.

    Example:
        >>> from PIL import Image
        >>> SIMO2Transform(32, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        jitter: float = 0.4,
        flip_p: float = 0.5,
    ):
        image_size, mean, std = _check_config(image_size, mean, std)
        if not jitter >= 0:
            raise ValueError(f"Expected jitter >= 0, but got {jitter}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"Expected 0 <= flip_p <= 1, but got {flip_p}")
        self.transform = T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
                T.RandomHorizontalFlip(p=flip_p),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> ``float32`` ``(3, S, S)``."""
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"
