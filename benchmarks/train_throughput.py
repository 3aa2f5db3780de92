"""Training throughput: does ingest keep the model busy, and how do two workers scale?

One run measures, on photo-like JPEGs (benchmarks/photos.py, made once and reused) trained
at 224 px with SIMO2:

  ceiling     - the model-only step rate: forward (under compute.precision autocast), loss,
                backward and optimizer step on one pre-decoded batch, over and over. No
                decode, no augmentation, no reads: the most the model can take.
  pipeline    - vitflow's training loop (vitflow.training.loop.train_loop, the function every
                Ray Train worker runs) with its ingest: files read, decoded and augmented by
                DataLoader processes beside the worker (data.loader_workers), no cache, so
                every image is decoded every time it is drawn (a corpus larger than memory).
                The rate is the median of the images_per_s lines rank 0 logs, without the
                first interval (start-up).
  in-process  - the same loop with data.loader_workers 0: decode inside the training
                process, as before ingest ran beside it (the old behaviour, for reference).
  2 workers   - the pipeline with two DDP ranks (gloo on CPU, NCCL on GPU), started with
                torch.multiprocessing rather than Ray so that Ray's start-up stays out of
                the timing. Strong scaling: the same global batch (photos.py has 4 classes),
                so each rank takes half of it.

and prints the ratios pipeline / ceiling (goal >= 0.9 on CPU) and the 2-worker scaling
efficiency, rate(2 workers) / (2 x rate(1 worker)) (goal >= 0.8 on GPU; reported on CPU,
where the two ranks and their loaders share the same few cores). Asserts nothing.

Run:  .venv/bin/python benchmarks/train_throughput.py                   (CPU, ~3 min on 2 cores)
      .venv/bin/python benchmarks/train_throughput.py --device cuda      (GPU; 2 workers need 2)
      .venv/bin/python benchmarks/train_throughput.py --model resnet50 --steps 60 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import describe, load, usable_cores  # benchmarks/machine.py (script's folder)
from photos import describe_set, photo_set, set_paths  # benchmarks/photos.py

from vitflow.config import load_config
from vitflow.training.config import TrainConfig
from vitflow.training.loop import autocast_for, train_loop
from vitflow.training.losses import SIMO2Loss
from vitflow.training.model import build_model
from vitflow.training.report import read_metrics

CLASSES = 4  # photos.py's class folders


def job(args, data: Path, out: Path, *, workers: int, loader_workers: int) -> TrainConfig:
    base = {
        "method": "simo2",
        "data": {
            "uri": str(data),
            "image_size": args.image_size,
            "holdout_fraction": 0.0,
            "cache_images": 0,  # decode every draw: what a corpus larger than memory costs
            "loader_workers": loader_workers,
        },
        "model": {"name": args.model, "embedding_dim": 128, "head_hidden_dim": 0},
        "simo2": {"samples_per_class": args.samples_per_class, "classes_per_batch": CLASSES},
        "optim": {"lr": 1e-4, "steps": args.steps},
        "scaling": {"num_workers": workers, "use_gpu": args.device == "cuda"},
        "compute": {"precision": args.precision, "channels_last": args.device == "cuda"},
        "output": {"uri": str(out), "checkpoint_every": 10**6, "log_every": args.log_every},
        "monitor": {"knn_every": 0},
    }
    return load_config(base=base, schema=TrainConfig)


def ceiling(args, cfg: TrainConfig) -> float:
    """Images/s of the bare training step on one pre-decoded batch (rank 0 of 1): the median
    over log intervals, like the pipeline's rate."""
    device = torch.device(args.device)
    model = build_model(cfg).to(device)
    if cfg.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    loss_fn = SIMO2Loss()
    rows = CLASSES * args.samples_per_class
    x = torch.randn(rows, 3, args.image_size, args.image_size, device=device)
    if cfg.compute.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = autocast_for(cfg, device)

    def step():
        with autocast:
            z = model(x)
        loss = loss_fn(torch.nn.functional.normalize(z.float(), dim=-1), num_classes=CLASSES).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates = []  # one per log interval, the first (warm-up) left out as in the pipeline
    for _ in range(args.steps // args.log_every):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.log_every):
            step()
        sync(device)
        rates.append(rows * args.log_every / (time.perf_counter() - t0))
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steady_rate(run: Path) -> float:
    """Median images_per_s of rank 0's log lines, without the first (start-up) interval."""
    rates = [m["images_per_s"] for m in read_metrics(str(run)) if "images_per_s" in m]
    return statistics.median(rates[1:]) if len(rates) > 1 else float("nan")


def _rank(rank: int, world: int, port: int, cfg_json: dict, device: str) -> None:
    cfg = TrainConfig.model_validate(cfg_json)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores, as Ray Train workers with 1 CPU each would
        torch.set_num_threads(max(1, usable_cores() // world))
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            def wrap(m):
                return DDP(m, device_ids=[rank] if device == "cuda" else None)
        else:
            wrap = None
        train_loop(cfg, rank=rank, world=world, device=dev, wrap_model=wrap)
    finally:
        torch.distributed.destroy_process_group()


def pipeline(args, cfg: TrainConfig, workers: int) -> float:
    out = Path(cfg.output.uri)
    shutil.rmtree(out, ignore_errors=True)
    if workers == 1:
        train_loop(cfg, device=torch.device(args.device))
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(
            _rank,
            args=(workers, port, cfg.model_dump(mode="json"), args.device),
            nprocs=workers,
            join=True,
        )
    return steady_rate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpu", action="store_true", help="same as --device cuda (older spelling)")
    ap.add_argument(
        "--model", default=None, help="timm name; default resnet18 (cpu), resnet50 (cuda)"
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--photo-size", default="320x240", help="WxH of the JPEGs")
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--samples-per-class", type=int, default=None, help="default 4 cpu, 64 gpu")
    ap.add_argument("--steps", type=int, default=None, help="default 12 cpu, 60 gpu")
    ap.add_argument("--log-every", type=int, default=None, help="default steps/4")
    ap.add_argument(
        "--loader-workers", type=int, default=None, help="default: usable cores - 1 (min 1)"
    )
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--workdir", default="./bench-out")
    args = ap.parse_args()
    if args.gpu:
        args.device = "cuda"
    gpu = args.device == "cuda"
    args.model = args.model or ("resnet50" if gpu else "resnet18")
    args.samples_per_class = args.samples_per_class or (64 if gpu else 4)
    args.steps = args.steps or (60 if gpu else 12)
    args.log_every = args.log_every or max(1, args.steps // 4)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    cores = usable_cores()
    if args.loader_workers is None:
        args.loader_workers = max(1, cores - 1) if not gpu else max(1, min(8, cores // 2 - 1))
    logging.basicConfig(level=logging.WARNING)

    load_before = load()
    work = Path(args.workdir).resolve()
    w, h = (int(v) for v in args.photo_size.split("x"))
    data = photo_set(work, args.photos, w, h)
    paths = set_paths(data)
    runs = work / "train-throughput"

    def cfg_for(name: str, workers: int = 1, loader: int | None = None) -> TrainConfig:
        lw = args.loader_workers if loader is None else loader
        return job(args, data, runs / name, workers=workers, loader_workers=lw)

    t0 = time.perf_counter()
    print("ceiling (pre-decoded batch) ...", flush=True)
    ceil_start = ceiling(args, cfg_for("ceiling"))
    print(f"pipeline, 1 worker, {args.loader_workers} loader processes ...", flush=True)
    one = pipeline(args, cfg_for("w1"), 1)
    inproc = float("nan")
    if not args.skip_in_process:
        print("pipeline, 1 worker, decode in the training process ...", flush=True)
        inproc = pipeline(args, cfg_for("w1-inproc", loader=0), 1)
    two, why_not = float("nan"), ""
    if gpu and torch.cuda.device_count() < 2:
        why_not = f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"
    else:
        loader2 = args.loader_workers if gpu else max(1, args.loader_workers // 2)
        print(f"pipeline, 2 workers, {loader2} loader processes each ...", flush=True)
        two = pipeline(args, cfg_for("w2", workers=2, loader=loader2), 2)
    print("ceiling again (a busy machine moves it) ...", flush=True)
    ceil_end = ceiling(args, cfg_for("ceiling"))
    ceil = max(ceil_start, ceil_end)
    total = time.perf_counter() - t0

    rows = CLASSES * args.samples_per_class
    print("\n" + "=" * 78)
    print("train throughput benchmark")
    print(f"machine     : {describe(gpu)}")
    print(f"load avg    : {load_before} (1/5/15 min) at start, {load()} at end")
    print(f"data        : {describe_set(paths, w, h)}; trained at {args.image_size} px, no cache")
    print(
        f"job         : simo2, {args.model} (random init), {args.precision}, {rows} images per "
        f"step ({CLASSES} classes x {args.samples_per_class}; 2 workers: half each), "
        f"{args.steps} steps, "
        f"log every {args.log_every}"
    )
    print("-" * 78)
    print(
        f"ceiling (model only, pre-decoded)   : {ceil:8.1f} img/s"
        f"   (the higher of {ceil_start:.1f} before and {ceil_end:.1f} after the pipelines)"
    )
    print(
        f"pipeline, 1 worker ({args.loader_workers} loader proc.)  : {one:8.1f} img/s"
        f"   ratio to ceiling {one / ceil:5.2f}"
    )
    if not args.skip_in_process:
        print(
            f"decode in the training process      : {inproc:8.1f} img/s"
            f"   ratio to ceiling {inproc / ceil:5.2f}"
        )
    if why_not:
        print(f"pipeline, 2 workers                 : skipped ({why_not})")
    else:
        print(
            f"pipeline, 2 workers                 : {two:8.1f} img/s"
            f"   scaling efficiency {two / (2 * one):5.2f}"
        )
    print("-" * 78)
    print(f"whole benchmark: {total:.0f} s")
    if not gpu and cores <= 2:
        print(
            f"caveat      : {cores} cores: the loader processes and the model share them, and "
            "the 2-worker run\n              gives each rank half of them; scaling on CPU "
            "is reported, not a goal."
        )
    print("=" * 78)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cores()))
    main()
