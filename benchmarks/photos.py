"""Photo-like JPEGs for the benchmarks, made once and shared by every case.

``photo_set(work, n, w, h)`` returns a folder of ``n`` JPEGs in four class folders. The
JPEGs live in one pool per size (``work/photos-WxH/``), made with every core and only as
far as the largest set asked for so far; image ``i`` is always the same picture (seeded by
``i``). A set is a folder of hard links to the pool's first ``n`` files, so the 400-, 1,000-
and 2,000-image sets of one size cost one generation, and a rerun costs none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import usable_cores
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("beach", "city", "forest", "indoor")
QUALITY = 90
VERSION = 1  # bump when make_photo changes: pools made by the old one are remade


def shapes_and_noise(
    img: Image.Image, rng: np.random.Generator, *, blur: float, colour_noise: bool
) -> Image.Image:
    """Soft ellipses and rectangles with edges on a smooth scene, then sensor-like noise
    (the same in every channel, or per channel): what makes JPEG sizes like a camera's."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(blur))
    noise = rng.normal(0, 4, (h, w, 3 if colour_noise else 1)).astype(np.int16)
    return Image.fromarray(
        np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    )


def make_photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour field + soft shapes + sensor-like noise: JPEG sizes like a camera's."""
    field = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    return shapes_and_noise(img, rng, blur=2, colour_noise=False)


def _write(args: tuple[str, int, int, int]) -> None:
    pool, i, w, h = args
    tmp = Path(pool) / f".img_{i:06d}.tmp"
    make_photo(np.random.default_rng(i), w, h).save(tmp, format="JPEG", quality=QUALITY)
    tmp.rename(Path(pool) / f"img_{i:06d}.jpg")  # a killed run never leaves half a JPEG


def _grow_pool(pool: Path, n: int, w: int, h: int) -> None:
    params = {"width": w, "height": h, "quality": QUALITY, "version": VERSION}
    stamp = pool / "_params.json"
    state = json.loads(stamp.read_text()) if stamp.exists() else {}
    if state.get("params") != params:
        shutil.rmtree(pool, ignore_errors=True)
        state = {"params": params, "made": 0}
    made = state["made"]
    if made >= n:
        return
    pool.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [(str(pool), i, w, h) for i in range(made, n)]
    with ProcessPoolExecutor(max_workers=usable_cores()) as ex:
        list(ex.map(_write, todo, chunksize=16))
    stamp.write_text(json.dumps({"params": params, "made": n}))
    print(f"generated {n - made} photos {w}x{h} in {pool} ({time.perf_counter() - t0:.0f} s)")


def photo_set(work: Path, n: int, w: int, h: int) -> Path:
    """A folder of ``n`` photo-like JPEGs (``w`` x ``h``, quality 90) in class folders."""
    pool = work / f"photos-{w}x{h}"
    root = work / "sets" / f"{w}x{h}-n{n}"
    done = root.with_name(root.name + ".done")  # outside the folder: the listing stays clean
    if not done.exists():
        _grow_pool(pool, n, w, h)
        shutil.rmtree(root, ignore_errors=True)
        for i in range(n):
            folder = root / CLASSES[i % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            src, dst = pool / f"img_{i:06d}.jpg", folder / f"img_{i:06d}.jpg"
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or no hard links: copy
                shutil.copyfile(src, dst)
        done.touch()
    return root


def set_paths(root: Path) -> list[Path]:
    """The set's JPEGs, sorted, read once so that every path starts from the page cache."""
    paths = sorted(root.glob("*/*.jpg"))
    for p in paths:
        p.read_bytes()
    return paths


def describe_set(paths: list[Path], w: int, h: int) -> str:
    mb = sum(p.stat().st_size for p in paths) / 1e6
    kb = 1e3 * mb / max(1, len(paths))
    return (
        f"{len(paths)} JPEGs q{QUALITY}, {w}x{h}, {mb:.0f} MB ({kb:.0f} KB each), "
        f"{len(CLASSES)} class folders"
    )
