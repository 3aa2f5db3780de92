"""The model's own timm eval transform, split where the bytes get big.

timm's eval transform is ``[PIL resize/crop ops..., ToTensor, Normalize]``. Decode tasks run
the PIL part and ship ``uint8`` ``(H, W, 3)`` arrays (4x smaller than float32 through Ray's
object store); the model actor runs ``ToTensor`` + ``Normalize`` on the whole batch, on the
accelerator when there is one. The arithmetic is the same as torchvision's, in the same
order, so the result equals the unsplit transform exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T

from vitflow.errors import ModelError


class Preprocessor:
    """Eval preprocessing for one model.

    Args:
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``), as from :func:`vitflow.backbone.data_config`.

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

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``uint8`` array ``(H, W, 3)`` at the model's input size."""
        out = np.asarray(self._pil_steps(img), dtype=np.uint8)
        if out.shape != (self.input_size[1], self.input_size[2], 3):
            raise ValueError(f"preprocessed to {out.shape}, expected {self.input_size[1:]} x 3")
        return out

    def to_tensor(
        self, pixels: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """``uint8`` ``(B, H, W, 3)`` -> normalised ``float32`` ``(B, 3, H, W)`` on ``device``."""
        x = torch.as_tensor(pixels).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div(255)
        return x.sub(self.mean.to(x.device)).div(self.std.to(x.device))


def _transform_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: cfg[k] for k in keys if k in cfg}
