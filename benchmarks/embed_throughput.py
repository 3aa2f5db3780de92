"""CPU, model-bound: vitflow vs a plain PyTorch loop vs the bare model forward (issue 10).

The same photo-like JPEGs (default 1,000 at 1280x960, quality 90, in four class folders;
made once under bench-out/), model and batch size through three paths in one run:

  (a) plain loop  - one process: PIL open + convert('RGB'), the model's timm eval transform,
                    batching, torch.inference_mode() forward; torch uses all cores (or the GPU).
  (b) bare model  - only the forward passes of the same batches, on tensors decoded
                    beforehand (not timed): the upper limit for any pipeline.
  (c) vitflow     - ``vitflow embed JOB.yaml`` in a process of its own (runs.run_vitflow),
                    timed end to end: Python start-up, model check, listing, local Ray start-up
                    and shutdown, decode tasks, model actors, parquet, output check, manifest.
                    Also its steady-state rate (the manifest's timing.steady_images_per_second).

(a) and (b) compute the same features as vitflow (its FeatureExtractor with the default
feature set: last block, mean pool, L2), so only the data path differs. Goal (issue 10):
c/a >= 0.9. Prints one table, writes bench-out/results/model_bound.json; asserts nothing.

Run:  .venv/bin/python benchmarks/embed_throughput.py            (full run, several minutes)
      .venv/bin/python benchmarks/embed_throughput.py --quick    (32 images, smoke run)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from machine import usable_cores  # noqa: E402  (benchmarks/ is on sys.path)
from photos import describe_set, photo_set, set_paths  # noqa: E402
from PIL import Image  # noqa: E402
from report import Case, Row  # noqa: E402
from runs import run_vitflow, wait_for_quiet  # noqa: E402
from timm.data import create_transform  # noqa: E402

from vitflow.backbone import data_config  # noqa: E402
from vitflow.config import FeatureConfig  # noqa: E402
from vitflow.features import FeatureExtractor  # noqa: E402

GOAL = 0.9


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
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    # vit_small_patch16_224 (22M params, 4.6 GFLOPs/image), a real ViT: ~12-14 img/s forward on
    # 2 EPYC cores, so (a), (b) and (c) take about 100 s each there.
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 images")
    ap.add_argument("--max-load", type=float, default=None, help="wait for a quieter machine")
    args = ap.parse_args()
    if args.quick:
        args.num_images = min(args.num_images, 32)

    work = Path(args.workdir).resolve()
    root = photo_set(work, args.num_images, args.width, args.height)
    paths = set_paths(root)
    n, bs = len(paths), args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(usable_cores())
    if args.max_load:
        wait_for_quiet(args.max_load, 600)

    case = Case(
        "model_bound",
        "CPU, model-bound: vitflow embed vs a plain PyTorch loop vs the bare forward",
        gpu_used=device.type == "cuda",
    )
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    dcfg = data_config(model)
    transform = create_transform(**dcfg, is_training=False)
    extractor = FeatureExtractor(model, [FeatureConfig()], dcfg["input_size"]).to(device)
    with torch.inference_mode():  # warm-up (allocator, kernels), not timed
        extractor(torch.zeros(min(bs, 8), *dcfg["input_size"], device=device))
    case.setup = [
        f"images   : {describe_set(paths, args.width, args.height)}",
        f"model    : {args.model}, random weights, input {tuple(dcfg['input_size'])}, batch "
        f"{bs}, feature: last block, mean pool, L2",
    ]

    print(f"(a) plain PyTorch loop on {device} ...", flush=True)
    sec_a, batches = plain_loop(paths, extractor, transform, bs, device)
    print(f"(b) bare forward on pre-decoded tensors on {device} ...", flush=True)
    sec_b = bare_forward(batches, extractor, device)
    del batches, extractor, model  # free the memory before vitflow's own processes start

    print("(c) vitflow embed (its own process and local Ray) ...", flush=True)
    job = {
        "kind": "embed",
        "source": {"uri": str(root)},
        "model": {"name": args.model, "weights": "random"},
        "compute": {"batch_size": bs},
    }
    run = run_vitflow(job, work=work / "model_bound", name="vitflow")
    rate_a = n / sec_a
    case.rows = [
        Row("(a) plain PyTorch loop (1 process, PIL + timm + forward)", n, sec_a),
        Row("(b) bare forward on pre-decoded tensors (the limit)", n, sec_b),
        Row(
            "(c) vitflow embed, end to end (CLI process, Ray start-up incl.)",
            run.listed,
            run.seconds,
        ),
        Row("(c) vitflow embed, steady state (manifest, 10%..90% of rows)", None, None, run.steady),
    ]
    case.ratio("c/a: vitflow end to end / plain loop", run.listed / run.seconds, rate_a, GOAL)
    case.ratio("c/a: vitflow steady state / plain loop", run.steady, rate_a, GOAL)
    case.ratio("c/b: vitflow end to end / bare forward", run.listed / run.seconds, n / sec_b)
    case.ratio("a/b: plain loop / bare forward", rate_a, n / sec_b)
    case.notes = [f"vitflow: {run.breakdown()}", f"kept in {run.folder}"]
    case.details = {"plain_seconds": sec_a, "bare_seconds": sec_b, "vitflow": run.details()}
    case.print()
    case.save(work, args.quick)


if __name__ == "__main__":
    main()
