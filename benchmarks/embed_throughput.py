"""Embedding throughput: vitflow vs a plain PyTorch loop vs the bare model forward.

Generates N photo-like JPEGs (default 1,000 at 1280x960, quality 90, in a few class
folders; reused on reruns with the same parameters) and pushes the same images, with the
same model and batch size, through three paths in one run:

  (a) plain loop  - one process: PIL open + convert('RGB'), the model's timm eval transform,
                    batching, torch.inference_mode() forward; torch uses all cores (or the GPU).
  (b) bare model  - only the forward passes of the same batches, on tensors decoded
                    beforehand (not timed): the upper limit for any pipeline.
  (c) vitflow     - run_embed() on the folder, end to end: listing, model check, local Ray
                    start-up and shutdown, decode tasks, model actors, parquet, manifest.

(a) and (b) compute the same features as vitflow (its FeatureExtractor with the default
feature set: last block, mean pool, L2), so only the data path differs. Prints images/s for
each and the ratios c/a and c/b; asserts nothing.

Run:  .venv/bin/python benchmarks/embed_throughput.py            (full run, several minutes)
      .venv/bin/python benchmarks/embed_throughput.py --quick    (200 images, smoke run)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

# Ray Data's progress bars only clutter the log of a benchmark; set the variable to 0 to see them.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from machine import describe, load  # benchmarks/machine.py (the script's folder is on sys.path)
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from timm.data import create_transform  # noqa: E402

from vitflow.backbone import data_config  # noqa: E402
from vitflow.config import FeatureConfig, load_config  # noqa: E402
from vitflow.embed import run_embed  # noqa: E402
from vitflow.features import FeatureExtractor  # noqa: E402

CLASSES = ("beach", "city", "forest", "indoor")


def make_photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour field + soft shapes + sensor-like noise: JPEG sizes like a camera's."""
    field = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 4, (h, w, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate_images(root: Path, n: int, w: int, h: int) -> list[Path]:
    """Write n JPEGs under root/<class>/, or reuse them if the same parameters made them."""
    params = {
        "n": n,
        "width": w,
        "height": h,
        "quality": 90,
        "classes": list(CLASSES),
        "version": 1,
    }
    stamp = root / "_params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"reusing {n} images in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        for i in range(n):
            folder = root / CLASSES[i % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            make_photo(np.random.default_rng(i), w, h).save(folder / f"img_{i:05d}.jpg", quality=90)
        stamp.write_text(json.dumps(params))
        print(f"generated {n} images in {root} ({time.perf_counter() - t0:.0f} s)")
    paths = sorted(root.glob("*/*.jpg"))
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(
        f"  {len(paths)} JPEGs, {w}x{h}, {mb:.0f} MB, {1e3 * mb / len(paths):.0f} KB each on average"
    )
    return paths


def plain_loop(paths, extractor, transform, bs, device):
    """(a) What a user would write. Returns (seconds, batches of decoded tensors for (b))."""
    batches = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), bs):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i : i + bs]])
            batches.append(x)
            extractor(x.to(device))["emb"].cpu()
    sync()
    return time.perf_counter() - t0, batches


def bare_forward(batches, extractor, device):
    """(b) Forward passes only, inputs already decoded and on the device."""
    on_device = [x.to(device) for x in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in on_device:
            extractor(x)["emb"].cpu()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    # vit_small_patch16_224 (22M params, 4.6 GFLOPs/image), a real ViT: ~12-14 img/s forward on
    # 2 EPYC cores; the full default run took 405 s there, 92 s of it the one-time image
    # generation, so it stays under the ~8 min at which vit_tiny_patch16_224 would be the default.
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 images")
    args = ap.parse_args()
    if args.quick:
        args.num_images = min(args.num_images, 200)
    logging.basicConfig(level=logging.WARNING)

    load_before = load()
    work = Path(args.workdir).resolve()
    image_dir = work / f"images-{args.num_images}-{args.width}x{args.height}"
    paths = generate_images(image_dir, args.num_images, args.width, args.height)
    n, bs = len(paths), args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)

    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    dcfg = data_config(model)
    transform = create_transform(**dcfg, is_training=False)
    extractor = FeatureExtractor(model, [FeatureConfig()], dcfg["input_size"]).to(device)
    with torch.inference_mode():  # warm-up (allocator, kernels), not timed
        extractor(torch.zeros(min(bs, 8), *dcfg["input_size"], device=device))

    print(f"\n(a) plain PyTorch loop on {device} ...", flush=True)
    sec_a, batches = plain_loop(paths, extractor, transform, bs, device)
    print(f"(b) bare forward on pre-decoded tensors on {device} ...", flush=True)
    sec_b = bare_forward(batches, extractor, device)
    del batches

    print("(c) vitflow run_embed (starts its own local Ray) ...", flush=True)
    out_dir = work / "embeddings"
    cfg = load_config(
        base={
            "source": {"uri": str(image_dir)},
            "model": {"name": args.model, "weights": "random"},
            "output": {"uri": str(out_dir)},
            "compute": {"batch_size": bs},
        }
    )
    t0 = time.perf_counter()
    result = run_embed(cfg, overwrite=True)
    sec_c = time.perf_counter() - t0
    timing, execution = result.manifest["timing"], result.manifest["execution"]
    actors = execution["actors"]
    model_s = timing["model_seconds"]
    # Model actors' own forward time (sum over actors): its rate is what the pipeline reaches
    # once Ray is up and decode keeps the actors fed; the rest of the wall time is start-up,
    # pipeline fill/drain, waiting on decode, writing and checking.
    steady = result.ok / model_s * actors["num_actors"] if model_s else float("nan")

    rate_a, rate_b, rate_c = n / sec_a, n / sec_b, n / sec_c
    print("\n" + "=" * 78)
    print("embed throughput benchmark")
    print(f"machine     : {describe(device.type == 'cuda')}")
    print(f"load avg    : {load_before} (1/5/15 min) at start, {load()} at end")
    print(
        f"model       : {args.model}, input {tuple(dcfg['input_size'])}, batch size {bs}, "
        f"random weights, feature: last block, mean pool, L2"
    )
    print(f"images      : {n} JPEG q90, {args.width}x{args.height}, {len(CLASSES)} class folders")
    print("-" * 78)
    print(f"(a) plain PyTorch loop (1 process)   : {rate_a:7.2f} img/s  ({sec_a:6.1f} s)")
    print(f"(b) bare forward, pre-decoded        : {rate_b:7.2f} img/s  ({sec_b:6.1f} s)")
    print(
        f"(c) vitflow run_embed, end to end    : {rate_c:7.2f} img/s  ({sec_c:6.1f} s, "
        f"incl. Ray start/stop)"
    )
    print(
        f"    vitflow's own wall_seconds       : {timing['wall_seconds']:7.1f} s  "
        f"({timing['images_per_second']} img/s in the manifest)"
    )
    print(
        f"    model actors' forward time       : {model_s:7.1f} s  -> {steady:.2f} img/s "
        f"(steady-state limit of (c))"
    )
    print(
        f"    rows ok/error                    : {result.ok}/{result.error}; actors: "
        f"{actors['num_actors']} x {actors['num_cpus']} CPU, {actors['num_gpus']} GPU, "
        f"{actors['torch_threads']} torch threads, {actors['device']}; "
        f"batches {execution.get('batches')}"
    )
    print("-" * 78)
    print(f"c/a (vitflow vs plain loop)          : {rate_c / rate_a:6.2f}x")
    print(f"c/b (vitflow vs bare forward)        : {rate_c / rate_b:6.2f}x")
    print(f"a/b (plain loop vs bare forward)     : {rate_a / rate_b:6.2f}x")
    print("=" * 78)


if __name__ == "__main__":
    main()
