"""JPEG decode + resize + crop speed, one process, one thread: which CPU path is fastest.

Makes photo-like JPEGs (vitflow.synthetic's gradient and shape, soft shapes, sensor-like
noise; quality 90) at camera sizes and pushes the same bytes through each path to the
224x224 ``uint8`` input of a ViT-S/16 eval transform (bicubic, resize 248, crop 224):

  pil exact     - decode_image + Preprocessor.resize_crop: the default, timm's transform
  pil draft     - decode_image(draft_size=pre.draft_size): libjpeg's DCT-domain 1/2..1/8
                  scaling, then the same resize/crop
  pil draft x2  - the same, never below twice that size (less scaling)
  simplejpeg    - simplejpeg.decode_jpeg (libjpeg-turbo), full size, then the same PIL ops
  simplejpeg/n  - the same with min_width/min_height = draft_size (its DCT scaling)
  torchvision   - torchvision.io.decode_jpeg on the CPU + Preprocessor.resize_crop_tensor
  device path   - vitflow.gpu_decode.decode_resize_batch(..., "cpu"): the GPU path's logic
                  (header parse, batched decode_jpeg, torch resize) run on the CPU

simplejpeg is optional: ``pip install --target DIR simplejpeg`` and put DIR on PYTHONPATH.
Prints images/s per path and image size; asserts nothing. A minute or two on 2 cores.

Run:  .venv/bin/python benchmarks/decode_speed.py [--sizes 800x600 1280x960 4032x3024] [--count 16]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
import torch
from machine import describe, load  # benchmarks/machine.py (the script's folder is on sys.path)
from photos import shapes_and_noise  # benchmarks/photos.py
from PIL import Image, ImageFilter

from vitflow.decode import decode_image
from vitflow.gpu_decode import decode_resize_batch
from vitflow.preprocess import Preprocessor
from vitflow.synthetic import synthetic_image

# vit_small_patch16_224's eval transform: Resize(248, bicubic) + CenterCrop(224).
VIT_S16 = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image: vitflow.synthetic's gradient and disk as the smooth scene, soft
    shapes with edges, and sensor-like noise; JPEG sizes like a camera's at quality 90."""
    scene = synthetic_image(rng, (max(w // 8, 8), max(h // 8, 8)), int(rng.integers(0, 360)))
    img = scene.filter(ImageFilter.GaussianBlur(1)).resize((w, h), Image.BICUBIC)
    return shapes_and_noise(img, rng, blur=1.5, colour_noise=True)


def photo_jpegs(size: tuple[int, int], count: int, seed: int = 0) -> list[bytes]:
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo(np.random.default_rng(seed + i), *size).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def paths(pre: Preprocessor) -> dict[str, Callable[[list[bytes]], object]]:
    """Each path: a batch of JPEG bytes -> its pixels (the work that is timed)."""
    draft = pre.draft_size

    def pil_exact(datas):
        return [pre.resize_crop(decode_image(d)) for d in datas]

    def pil_draft(datas):
        return [pre.resize_crop(decode_image(d, draft_size=draft)) for d in datas]

    twice = (2 * draft[0], 2 * draft[1])

    def pil_draft_x2(datas):
        return [pre.resize_crop(decode_image(d, draft_size=twice)) for d in datas]

    def torchvision_cpu(datas):
        from torchvision.io import ImageReadMode, decode_jpeg

        out = []
        for d in datas:
            x = decode_jpeg(
                torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
            out.append(pre.resize_crop_tensor(x[None]))
        return out

    def device_path(datas):
        return decode_resize_batch(datas, pre, "cpu").pixels

    found = {"pil exact": pil_exact, "pil draft": pil_draft, "pil draft x2": pil_draft_x2}
    try:
        import simplejpeg
    except ImportError:
        print("simplejpeg not installed: its paths are left out")
    else:

        def sj_full(datas):
            return [pre.resize_crop(Image.fromarray(simplejpeg.decode_jpeg(d))) for d in datas]

        def sj_scaled(datas):
            return [
                pre.resize_crop(
                    Image.fromarray(
                        simplejpeg.decode_jpeg(d, min_width=draft[0], min_height=draft[1])
                    )
                )
                for d in datas
            ]

        found.update({"simplejpeg": sj_full, "simplejpeg/n": sj_scaled})
    found.update({"torchvision": torchvision_cpu, "device path": device_path})
    return found


def best_rate(fn, datas: list[bytes], rounds: int) -> float:
    """Images per second of the fastest of ``rounds`` runs (the least disturbed by others)."""
    fn(datas[:2])  # warm-up: imports, allocator
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(datas)
        best = min(best, time.perf_counter() - t0)
    return len(datas) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["800x600", "1280x960", "4032x3024"])
    parser.add_argument("--count", type=int, default=16, help="images per size")
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()

    torch.set_num_threads(1)  # per-core numbers: a decode task holds one core
    pre = Preprocessor(VIT_S16)
    print(f"machine: {describe(gpu_used=False)}; load before: {load()}")
    print(f"transform: {pre._pil_steps.transforms}; draft_size {pre.draft_size}\n")
    found = paths(pre)
    header = f"{'path':<14}" + "".join(f"{s:>16}" for s in a.sizes)
    rows = {name: [] for name in found}
    sizes_kb = []
    for spec in a.sizes:
        w, h = (int(v) for v in spec.split("x"))
        count = a.count if w * h <= 2_000_000 else max(a.count // 3, 4)
        datas = photo_jpegs((w, h), count)
        sizes_kb.append(
            f"{spec}: {count} images, {np.mean([len(d) for d in datas]) / 1024:.0f} KB each"
        )
        for name, fn in found.items():
            rows[name].append(best_rate(fn, datas, a.rounds))
    print("; ".join(sizes_kb))
    print(f"images/s, one thread, best of {a.rounds}\n{header}")
    base = rows["pil exact"]
    for name, rates in rows.items():
        cells = "".join(f"{r:>9.1f} ({r / b:3.1f}x)" for r, b in zip(rates, base, strict=True))
        print(f"{name:<14}{cells}")
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
