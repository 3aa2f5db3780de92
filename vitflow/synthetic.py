"""Generated image folders for the demo, tests and benchmarks (no downloads needed).

``python -m vitflow.synthetic DIR`` writes a small labelled corpus with train/val splits and,
with ``--bad-files``, one file of each kind of bad input the embed job must survive.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_EXT = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tiff",
    "GIF": ".gif",
}


def synthetic_image(rng: np.random.Generator, size: tuple[int, int], hue: int) -> Image.Image:
    """A photo-like RGB image: a colour gradient keyed to ``hue``, a shape, and noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            (np.sin(x / w * np.pi + hue) * 0.5 + 0.5) * 255,
            (y / max(h - 1, 1)) * 255,
            np.full_like(x, (hue * 53) % 256),
        ],
        axis=-1,
    )
    cx, cy, r = (
        rng.uniform(0.2, 0.8) * w,
        rng.uniform(0.2, 0.8) * h,
        rng.uniform(0.1, 0.3) * min(w, h),
    )
    disk = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    base[disk] = rng.uniform(0, 255, size=3)
    base += rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def bad_files() -> dict[str, bytes]:
    """One file per kind of bad input, by file name."""
    buf = io.BytesIO()
    synthetic_image(np.random.default_rng(0), (64, 48), 1).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    corrupt = bytearray(jpeg)
    corrupt[200:400] = bytes(200)  # zeroed entropy-coded data + markers
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 Mpx that compresses to a few KB
    return {
        "zero_bytes.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.jpg": bytes(corrupt[:300]) + b"\x00" * 50,
        "not_an_image.png": b"<html>this is not a picture</html>\n",
        "bomb.png": bomb.getvalue(),
    }


def make_image_folder(
    root: str | Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 6,
    splits: tuple[str, ...] | None = ("train", "val"),
    size: tuple[int, int] = (96, 72),
    formats: tuple[str, ...] = ("JPEG",),
    with_bad_files: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``root/[split/]class/NNN.ext`` images; returns counts ``{"good": n, "bad": m}``.

    Bad files (if asked for) go into ``root/train/cat`` (or ``root/cat``), so they are listed
    with a label and split like any other file.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    good = 0
    for split in splits or (None,):
        for ci, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                fmt = formats[(good) % len(formats)]
                img = synthetic_image(rng, size, hue=ci)
                img.save(
                    folder / f"{i:03d}{_EXT[fmt]}",
                    fmt,
                    **({"quality": 90} if fmt == "JPEG" else {}),
                )
                good += 1
    bad = 0
    if with_bad_files:
        folder = root / splits[0] / classes[0] if splits else root / classes[0]
        for name, data in bad_files().items():
            (folder / name).write_bytes(data)
            bad += 1
    return {"good": good, "bad": bad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--bad-files", action="store_true")
    args = p.parse_args()
    counts = make_image_folder(
        args.root, per_class=args.per_class, with_bad_files=args.bad_files, formats=FORMATS
    )
    print(f"wrote {counts['good']} images and {counts['bad']} bad files under {args.root}")


if __name__ == "__main__":
    main()


def make_digits_folder(
    root: str | Path, *, size: int = 32, holdout_every: int = 5
) -> dict[str, int]:
    """scikit-learn's handwritten digits (8x8, shipped inside the package: no download),
    upscaled to ``size`` px as ``root/{train,val}/<digit>/NNNN.png``.

    Every ``holdout_every``-th image of each class goes to ``val``. Returns image counts.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    counts = {"train": 0, "val": 0}
    seen: dict[int, int] = {}
    for i, (img, y) in enumerate(zip(digits.images, digits.target, strict=True)):
        k = seen.get(int(y), 0)
        seen[int(y)] = k + 1
        split = "val" if k % holdout_every == holdout_every - 1 else "train"
        folder = root / split / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB").save(
            folder / f"{i:04d}.png"
        )
        counts[split] += 1
    return counts


# The toy MAE of make_mae_checkpoint: vit_base_patch16_224.mae's layout at 32 px, patch 8.
TINY_MAE_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def make_mae_checkpoint(path: str | Path, seed: int = 0) -> dict:
    """Write a toy MAE checkpoint in the official layout (encoder and decoder keys side by
    side, random weights) to try ``model.mae_loss`` without downloading one; returns the
    ``model:`` section that loads it. The losses it gives mean nothing."""
    import timm
    import torch
    from safetensors.torch import save_file

    from vitflow.mae import MAEDecoder

    torch.manual_seed(seed)
    enc = timm.create_model(
        "vit_base_patch16_224.mae", pretrained=False, num_classes=0, **TINY_MAE_KWARGS
    )
    patches = (TINY_MAE_KWARGS["img_size"] // TINY_MAE_KWARGS["patch_size"]) ** 2
    dec = MAEDecoder(patches, TINY_MAE_KWARGS["patch_size"], 32, 16, depth=2, num_heads=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({**enc.state_dict(), **dec.state_dict()}, str(path))
    return {
        "name": "vit_base_patch16_224.mae",
        "kwargs": dict(TINY_MAE_KWARGS),
        "checkpoint": str(path),
        "mae_loss": {"decoder_heads": 2},
    }
