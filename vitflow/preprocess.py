"""The model's own timm eval transform, split where the bytes get big.

timm's eval transform is ``[PIL resize/crop ops..., ToTensor, Normalize]``. Decode tasks run
the PIL part and ship ``uint8`` ``(H, W, 3)`` arrays (4x smaller than float32 through Ray's
object store); the model actor runs ``ToTensor`` + ``Normalize`` on the whole batch, on the
accelerator when there is one. The arithmetic is the same as torchvision's, in the same
order, so the result equals the unsplit transform exactly.

Two faster paths change pixels and are opt-in: :attr:`Preprocessor.draft_size` lets a JPEG
decode at reduced scale (:func:`vitflow.decode.decode_image`), and
:meth:`Preprocessor.resize_crop_tensor` runs the same resize/crop ops on tensors (on the GPU,
after a batched GPU decode). ``benchmarks/decode_deviation.py`` measures how far each lands
from the exact path.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
from torchvision import transforms as T
from torchvision.transforms import functional as F

from vitflow.errors import ModelError
from vitflow.resize import PIL_FILTERS, ResizeCrop


class Preprocessor:
    """Eval preprocessing for one model.

    Args:
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``), as from :func:`vitflow.backbone.data_config`.

    Attributes:
        input_size: ``(3, H, W)``.
        draft_size: ``(width, height)`` for :func:`vitflow.decode.decode_image`'s
            ``draft_size``: both sides at least what the first resize writes, so a drafted
            JPEG is never upsampled by it; None for a transform without a leading resize
            (or without a :attr:`plan`).
        tensor_unsupported: Why :meth:`resize_crop_tensor` cannot run this transform
            (lanczos, box or nearest interpolation), or None when it can.
        plan: The resize/crop steps as a torch-free :class:`~vitflow.resize.ResizeCrop`
            (what decode actors run), or None for a step it does not know (then
            :meth:`resize_crop` runs timm's objects themselves).

    Example:
        >>> from PIL import Image
        >>> p = Preprocessor({"input_size": (3, 32, 32), "interpolation": "bicubic",
        ...                   "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9})
        >>> p.to_tensor(np.stack([p.resize_crop(Image.new("RGB", (50, 40)))])).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, data_config: dict[str, Any]):
        self.data_config = dict(data_config)
        self.transform = create_transform(**_transform_kwargs(data_config), is_training=False)
        steps = list(self.transform.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
        if cut is None or cut + 2 != len(steps) or not isinstance(steps[cut + 1], T.Normalize):
            raise ModelError(
                f"unexpected timm eval transform {self.transform}; expected PIL ops, then "
                "ToTensor and Normalize"
            )
        self._pil_steps = T.Compose(steps[:cut])
        norm = steps[cut + 1]
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.input_size = tuple(int(v) for v in data_config["input_size"])
        self.tensor_unsupported = _tensor_unsupported(steps[:cut])
        self.plan = _plan(steps[:cut], self.input_size)
        self.draft_size = self.plan.draft_size if self.plan is not None else None

    def resize_spec(self) -> str:
        """The resize/crop as JSON for :func:`vitflow.decode_task.decode_batch`: the
        torch-free :attr:`plan`, or the data config where there is none."""
        if self.plan is not None:
            return self.plan.to_json()
        return json.dumps({"data_config": self.data_config})

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``uint8`` array ``(H, W, 3)`` at the model's input size."""
        if self.plan is not None:
            return self.plan(img)
        out = np.asarray(self._pil_steps(img), dtype=np.uint8)
        if out.shape != (self.input_size[1], self.input_size[2], 3):
            raise ValueError(f"preprocessed to {out.shape}, expected {self.input_size[1:]} x 3")
        return out

    def resize_crop_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` ``(N, 3, H, W)`` images of one size -> ``uint8`` ``(N, h, w, 3)`` at the
        model's input size, on ``x``'s device (the GPU after a GPU decode).

        The geometry is :meth:`resize_crop`'s exactly (torchvision's and timm's own size and
        crop rules). The resampling is torch's antialiased interpolation, which uses PIL's
        filters (bicubic a=-0.5, bilinear triangle), in PIL's way: one axis, rounded half up
        to 8 bits, then the other, in the order Pillow picks. What remains is float32 against
        PIL's fixed point: pixels within a level or two of :meth:`resize_crop` (on noise, the
        worst case, at most 2 apart and 0.1 on average; on photos, almost all equal).

        Raises:
            ValueError: for a transform with an op or interpolation that has no tensor
                equivalent (:attr:`tensor_unsupported` says which); use :meth:`resize_crop`.
        """
        if self.tensor_unsupported is not None:
            raise ValueError(self.tensor_unsupported)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), but got {x.dtype} {tuple(x.shape)}")
        for t in self._pil_steps.transforms:
            h, w = x.shape[-2:]
            if isinstance(t, T.Resize):
                size = [t.size] if isinstance(t.size, int) else list(t.size)
                out_h, out_w = F._compute_resized_output_size((h, w), size, t.max_size)
                x = _resample(x, out_h, out_w, t.interpolation)
            elif isinstance(t, ResizeKeepRatio):
                out_h, out_w = ResizeKeepRatio.get_params(x, t.size, t.longest)
                x = _resample(x, out_h, out_w, t.interpolation)
            elif isinstance(t, CenterCropOrPad):
                x = _center_crop_or_pad(x, t.size, t.fill)
            else:
                x = t(x)  # CenterCrop: pads with 0 on tensors as on PIL images
        out = x.permute(0, 2, 3, 1).contiguous()
        if tuple(out.shape[1:]) != (self.input_size[1], self.input_size[2], 3):
            raise ValueError(
                f"preprocessed to {tuple(out.shape[1:])}, expected {self.input_size[1:]} x 3"
            )
        return out

    def to_tensor(
        self, pixels: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """``uint8`` ``(B, H, W, 3)`` -> normalised ``float32`` ``(B, 3, H, W)`` on ``device``."""
        x = torch.as_tensor(pixels).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div(255)
        return x.sub(self.mean.to(x.device)).div(self.std.to(x.device))


def _plan(steps: list[Any], input_size: tuple[int, ...]) -> ResizeCrop | None:
    """timm's resize/crop objects as a torch-free :class:`ResizeCrop`; None when a step is
    not one whose Pillow calls it knows exactly."""
    out: list[dict[str, Any]] = []
    for t in steps:
        mode = getattr(t, "interpolation", None)
        interp = mode.value if isinstance(mode, T.InterpolationMode) else None
        # Exact types only: a subclass may do anything in its forward.
        if type(t) is T.Resize and interp in PIL_FILTERS:
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            if t.max_size is not None and (len(size) != 1 or t.max_size <= size[0]):
                return None  # torchvision refuses it: let timm's object say so
            out.append({"op": "resize", "size": size, "max_size": t.max_size})
        elif (
            type(t) is ResizeKeepRatio
            and interp in PIL_FILTERS
            and not t.random_scale_prob
            and not t.random_aspect_prob
        ):
            out.append({"op": "resize_keep_ratio", "size": list(t.size), "longest": t.longest})
        elif type(t) is CenterCropOrPad and t.padding_mode == "constant":
            fill = 0 if t.fill is None else t.fill
            fill = fill if isinstance(fill, list | tuple) else [fill] * 3
            if len(fill) == 1:
                fill = list(fill) * 3
            out.append({"op": "center_crop", "size": list(t.size), "fill": [int(v) for v in fill]})
        elif type(t) is T.CenterCrop:
            out.append({"op": "center_crop", "size": list(t.size), "fill": [0, 0, 0]})
        else:
            return None
        if out[-1]["op"] != "center_crop":
            out[-1]["interpolation"] = interp
    return ResizeCrop(tuple(out), (int(input_size[1]), int(input_size[2])))


# torchvision runs these on tensors the way it runs them on PIL images; NEAREST differs
# (PIL and torch pick different source pixels) and the others have no tensor kernel.
_TENSOR_INTERPOLATIONS = (T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC)


def _tensor_unsupported(steps: list[Any]) -> str | None:
    """Why ``steps`` cannot run on tensors as they do on PIL images, or None when they can."""
    for t in steps:
        if isinstance(t, T.Resize | ResizeKeepRatio):
            if t.interpolation not in _TENSOR_INTERPOLATIONS:
                return (
                    f"{type(t).__name__} with {t.interpolation.value} interpolation has no "
                    "tensor equivalent of PIL's (only bilinear and bicubic); decode on the CPU"
                )
        elif isinstance(t, CenterCropOrPad):
            if t.padding_mode != "constant":
                return f"CenterCropOrPad with padding_mode {t.padding_mode!r} has no tensor path"
        elif not isinstance(t, T.CenterCrop):
            return f"{type(t).__name__} has no tensor path; decode on the CPU"
    return None


# Pillow 13 resizes height first when that shrinks much more than width (Resample.c,
# "horizontal_first"); earlier Pillows always resize width first.
_PIL_HEIGHT_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13


def _resample(x: torch.Tensor, out_h: int, out_w: int, mode: T.InterpolationMode) -> torch.Tensor:
    """PIL's two-pass resize on ``uint8`` ``(N, C, H, W)``: one axis, rounded to 8 bits, then
    the other, in the order Pillow picks."""
    h, w = x.shape[-2:]
    if (out_h, out_w) == (h, w):
        return x  # as torchvision's resize: no resampling at all
    height_first = _PIL_HEIGHT_FIRST_RULE and h - out_h > 0 and h - out_h > 2 * (w - out_w)
    passes = ((out_h, w), (out_h, out_w)) if height_first else ((h, out_w), (out_h, out_w))
    y = x.float()
    for size in passes:
        if tuple(y.shape[-2:]) != size:
            y = torch.nn.functional.interpolate(
                y, size=size, mode=mode.value, align_corners=False, antialias=True
            )
            # Half up, as PIL rounds: halves are common (bilinear weights of 1/4, 3/4).
            y = y.add_(0.5).floor_().clamp_(0, 255)
    return y.to(torch.uint8)


def _center_crop_or_pad(x: torch.Tensor, size: tuple[int, int], fill: Any) -> torch.Tensor:
    """timm's ``center_crop_or_pad`` on tensors, with a per-channel fill (torchvision's
    tensor ``pad`` takes one number only)."""
    crop_h, crop_w = size
    h, w = x.shape[-2:]
    if crop_w > w or crop_h > h:
        left, top = max(crop_w - w, 0) // 2, max(crop_h - h, 0) // 2
        canvas = torch.empty(
            (*x.shape[:-2], max(h, crop_h), max(w, crop_w)), dtype=x.dtype, device=x.device
        )
        canvas[:] = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        canvas[..., top : top + h, left : left + w] = x
        x = canvas
        h, w = x.shape[-2:]
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return x[..., top : top + crop_h, left : left + crop_w]


def _transform_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: cfg[k] for k in keys if k in cfg}
