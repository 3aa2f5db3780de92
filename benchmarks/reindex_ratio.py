"""Reindex cost: a run with 1% of the files changed vs a full build of the same corpus.

Generates N photo-like JPEGs (default 300 at 320x240, in train/val x 3 class folders;
reused on reruns with the same parameters), then, each timed end to end like a scheduled
CLI run (listing, model check, Ray start-up and shutdown, embedding, one Delta commit):

  (a) full build  - ``run_reindex`` into a new Delta table: every file embedded.
  (b) 1% changed  - rewrite a third of the changed files with new content, add a third,
                    delete the rest; ``run_reindex`` on the table of (a).
  (c) no change   - ``run_reindex`` again: listing + diff only, no Ray, no commit.

Prints the seconds of each and the ratios b/a and c/a; asserts nothing. Every run starts its
own local Ray, as separate scheduler runs would (``--shared-ray`` starts one for all).

Run:  .venv/bin/python benchmarks/reindex_ratio.py                 (300 images, ~1 min on 2 cores)
      .venv/bin/python benchmarks/reindex_ratio.py --images 1000 --model vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

# Ray Data's progress bars only clutter the log of a benchmark.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

from vitflow.config import load_config  # noqa: E402
from vitflow.reindex import run_reindex  # noqa: E402
from vitflow.synthetic import make_image_folder, synthetic_image  # noqa: E402


def corpus(root: Path, images: int, size: tuple[int, int]) -> Path:
    """``images`` JPEGs under ``root`` (6 folders: train/val x 3 classes), made once."""
    src = root / f"images-{images}-{size[0]}x{size[1]}"
    if not src.exists():
        tmp = src.with_name(src.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_image_folder(tmp, per_class=-(-images // 6), size=size)
        for extra in sorted(tmp.rglob("*.jpg"))[images:]:
            extra.unlink()
        tmp.rename(src)
    return src


def change(src: Path, fraction: float, size: tuple[int, int]) -> int:
    """Rewrite, add and delete about ``fraction`` of the files (a third each)."""
    files = sorted(src.rglob("*.jpg"))
    n = max(3, round(len(files) * fraction))
    rng = np.random.default_rng(1)
    picked = [files[i] for i in rng.choice(len(files), size=n, replace=False)]
    for i, path in enumerate(picked):
        kind = i % 3
        if kind == 0:  # new content, same name
            synthetic_image(rng, size, hue=7).save(path, "JPEG", quality=90)
        elif kind == 1:  # a new file beside it
            synthetic_image(rng, size, hue=8).save(path.with_name(f"new-{i}.jpg"), "JPEG")
        else:
            path.unlink()
    return n


def timed(cfg) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = run_reindex(cfg)
    return time.perf_counter() - t0, {
        **json.loads(result.summary_json()),
        "embedded": result.embedded,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--changed", type=float, default=0.01, help="share of files changed")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", default="bench-out/reindex")
    p.add_argument("--shared-ray", action="store_true", help="one local Ray for all runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    size = (320, 240)
    root = Path(args.workdir)
    base = corpus(root, args.images, size)
    src = root / "run" / "images"
    index = root / "run" / "index"
    shutil.rmtree(root / "run", ignore_errors=True)
    shutil.copytree(base, src)
    cfg = load_config(
        base={
            "source": {"uri": str(src)},
            "model": {"name": args.model, "weights": "random"},  # seeded random init, no download
            "output": {"uri": str(index)},
            "compute": {"batch_size": args.batch_size},
        }
    )
    if args.shared_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), logging_level=logging.WARNING)

    full_s, full = timed(cfg)
    changed = change(src, args.changed, size)
    inc_s, inc = timed(cfg)
    noop_s, noop = timed(cfg)

    print(f"machine: {describe(False)}; model {args.model}")
    print(f"corpus: {args.images} JPEGs {size[0]}x{size[1]}; changed {changed} files")
    print(f"(a) full build   {full_s:8.2f} s  {full}")
    print(f"(b) {args.changed:.0%} changed   {inc_s:8.2f} s  {inc}")
    print(f"(c) no change    {noop_s:8.2f} s  {noop}")
    print(f"ratio b/a = {inc_s / full_s:.3f}   ratio c/a = {noop_s / full_s:.4f}")


if __name__ == "__main__":
    main()
