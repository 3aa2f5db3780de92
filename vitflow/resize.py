"""timm's eval resize/crop, run with Pillow alone, so decode actors never import torch.

A model's eval transform is built by timm from torchvision and timm transform objects, which
need torch (and timm and torchvision) to import: about 5 s of CPU and 0.9 GB of memory in
every decode worker process, for ops that in the end are three Pillow calls. The driver,
which has torch anyway, builds timm's transform and turns its resize/crop steps into a
:class:`ResizeCrop` (:attr:`vitflow.preprocess.Preprocessor.plan`); decode actors get it as
JSON and run the same Pillow calls with the same size arithmetic:

- ``resize``: ``torchvision.transforms.Resize``: the shorter side to ``size[0]`` (the longer
  one ``int(size * long / short)``, capped by ``max_size``), or exactly ``(h, w)``; no
  resampling when the size does not change; ``Image.resize`` with the mode's filter.
- ``resize_keep_ratio``: timm's ``ResizeKeepRatio`` in eval (no random scale or aspect):
  both sides divided by a ratio between the tighter and the looser fit (``longest``).
- ``center_crop``: torchvision's ``CenterCrop`` and timm's ``CenterCropOrPad`` (constant
  padding): pad to at least the crop size with ``fill`` (``ImageOps.expand``), then crop
  at ``round((size - crop) / 2)``.

Any other step (a custom transform, random resizing, non-constant padding) has no plan, and
decode actors fall back to the torch transform. ``tests/test_preprocess.py`` holds the plan
to timm's transform pixel for pixel, over every crop mode and interpolation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Pillow's resampling filters by torchvision's interpolation names (torchvision's own
# ``pil_modes_mapping``; nearest-exact is plain nearest on PIL images).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
OPS = ("resize", "resize_keep_ratio", "center_crop")


@dataclass(frozen=True)
class ResizeCrop:
    """A model's eval resize/crop as plain data: Pillow ops in order, and the output size.

    Args:
        steps: each a dict with ``op`` (one of :data:`OPS`) and its arguments: ``size``
            (``[s]`` or ``[h, w]``), ``max_size``, ``interpolation`` (a key of
            :data:`PIL_FILTERS`), ``longest``, ``fill`` (three ints).
        output: ``(height, width)`` the last step writes.

    Example:
        >>> rc = ResizeCrop(({"op": "resize", "size": [36], "interpolation": "bicubic"},
        ...                  {"op": "center_crop", "size": [32, 32]}), (32, 32))
        >>> rc(Image.new("RGB", (64, 48))).shape
        (32, 32, 3)
    """

    steps: tuple[dict[str, Any], ...]
    output: tuple[int, int]

    def __post_init__(self):
        for s in self.steps:
            if s.get("op") not in OPS:
                raise ValueError(f"unknown resize/crop op {s.get('op')!r}; expected one of {OPS}")
            if s["op"] != "center_crop" and s.get("interpolation") not in PIL_FILTERS:
                raise ValueError(f"unknown interpolation {s.get('interpolation')!r}")

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``uint8`` ``(H, W, 3)`` at :attr:`output`."""
        for s in self.steps:
            img = _APPLY[s["op"]](img, s)
        out = np.asarray(img, dtype=np.uint8)
        if out.shape != (*self.output, 3):
            raise ValueError(f"preprocessed to {out.shape}, expected {self.output} x 3")
        return out

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The smallest ``(width, height)`` whose both sides are at least what the first
        resize writes, for any image: a JPEG decoded at reduced scale to it
        (:func:`vitflow.decode.decode_image`'s ``draft_size``) is never upsampled by that
        resize. None when the first step is not a resize (or caps its size)."""
        first = self.steps[0] if self.steps else {}
        size = first.get("size")
        if first.get("op") == "resize" and first.get("max_size") is None:
            # Shorter side to s: the shorter side, and so both, at least s.
            return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[1]), int(size[0]))
        if first.get("op") == "resize_keep_ratio":
            # longest=0 fits the tighter side to the target, longest=1 the looser: both sides
            # of either stay within the target size.
            return (int(size[1]), int(size[0]))
        return None

    def to_json(self) -> str:
        return json.dumps({"steps": list(self.steps), "output": list(self.output)})

    @classmethod
    def from_json(cls, text: str) -> ResizeCrop:
        d = json.loads(text)
        return cls(tuple(d["steps"]), tuple(d["output"]))


def _resize(img: Image.Image, s: dict[str, Any]) -> Image.Image:
    size, max_size = list(s["size"]), s.get("max_size")
    w, h = img.size
    if len(size) == 1:  # the shorter side to size[0], the longer in proportion
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size[0], int(size[0] * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        out_w, out_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        out_h, out_w = size
    return _resample(img, out_h, out_w, s["interpolation"])


def _resize_keep_ratio(img: Image.Image, s: dict[str, Any]) -> Image.Image:
    (target_h, target_w), longest = s["size"], float(s["longest"])
    w, h = img.size
    ratio_h, ratio_w = h / target_h, w / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return _resample(img, round(h / ratio), round(w / ratio), s["interpolation"])


def _resample(img: Image.Image, out_h: int, out_w: int, interpolation: str) -> Image.Image:
    if (out_h, out_w) == (img.height, img.width):
        return img  # as torchvision: the same size is no resampling at all
    return img.resize((out_w, out_h), PIL_FILTERS[interpolation])


def _center_crop(img: Image.Image, s: dict[str, Any]) -> Image.Image:
    crop_h, crop_w = s["size"]
    w, h = img.size
    if crop_w > w or crop_h > h:
        border = (
            (crop_w - w) // 2 if crop_w > w else 0,
            (crop_h - h) // 2 if crop_h > h else 0,
            (crop_w - w + 1) // 2 if crop_w > w else 0,
            (crop_h - h + 1) // 2 if crop_h > h else 0,
        )
        img = ImageOps.expand(img, border=border, fill=tuple(s.get("fill") or (0, 0, 0)))
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


_APPLY = {"resize": _resize, "resize_keep_ratio": _resize_keep_ratio, "center_crop": _center_crop}
