"""Training throughput: vitflow's run_train with 1 and 2 Ray Train workers.

Generates scikit-learn's handwritten digits as an image folder once (reused on reruns with
the same image size), then runs the same pretraining job twice through run_train():
scaling.num_workers = 1, then 2, with the same global batch and the same number of steps,
no kNN monitor, one checkpoint at the end, and a fresh output folder per run. Each run
starts (and stops) its own local Ray, exactly as `vitflow train` does.

For each run it prints:

  wall        - seconds for the whole run_train() call: job check, Ray start-up, worker
                start-up, DDP set-up, training, checkpoint, Ray shutdown, backbone export
                and the plots;
  steady      - median of the images_per_s values that rank 0 logs to RUN/metrics.jsonl
                every output.log_every steps, after discarding the first log interval
                (first-step warm-up); the global rate over all workers;
  train loop  - seconds between the first and the last metrics line (the timed part of
                the loop without its first interval);

and the ratios 2-worker/1-worker. With --gpu each worker gets one GPU (use_gpu true); the
2-worker run needs 2 GPUs and is skipped on a box with fewer. Asserts nothing.

Run:  .venv/bin/python benchmarks/train_throughput.py                  (simo2, ~4 min on 2 cores)
      .venv/bin/python benchmarks/train_throughput.py --method simclr
      .venv/bin/python benchmarks/train_throughput.py --gpu --steps 300 (on a GPU box)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

# Ray Train v2: every ray.train.report() hands its result to a queue of size 1 that the
# controller only drains when it polls the workers, once per health-check interval (2 s by
# default), so each report blocks about one interval, and the end of the run is noticed only
# at the next poll as well. With the default, a short benchmark run would carry seconds of
# pure waiting in its wall time; at 0.5 s the wall time is mostly the job itself. It must be
# in os.environ before run_train() starts Ray, so the controller actor inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import torch  # noqa: E402
from machine import describe, load  # benchmarks/machine.py (the script's folder is on sys.path)

from vitflow.config import load_config  # noqa: E402
from vitflow.synthetic import make_digits_folder  # noqa: E402
from vitflow.training.config import TrainConfig  # noqa: E402
from vitflow.training.report import read_metrics  # noqa: E402
from vitflow.training.trainer import run_train  # noqa: E402

WORKER_COUNTS = (1, 2)


def digits_folder(root: Path, size: int) -> Path:
    """The digits image folder at ``size`` px, generated once and reused."""
    params = {"size": size, "holdout_every": 5, "version": 1}
    stamp = root / "_params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"reusing digits folder {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        counts = make_digits_folder(root, size=size, holdout_every=params["holdout_every"])
        stamp.write_text(json.dumps(params))
        print(
            f"generated digits folder {root}: {counts['train']} train + {counts['val']} val "
            f"images ({time.perf_counter() - t0:.0f} s)"
        )
    return root


def job(args, data: Path, out: Path, workers: int) -> dict:
    """The benchmark job: jobs/simo2-digits.yaml's settings, sized for timing."""
    return {
        "method": args.method,
        "data": {"uri": str(data), "image_size": args.image_size},
        "model": {
            "name": args.model,
            "pretrained": False,
            "embedding_dim": 16,
            "head_hidden_dim": 0 if args.method == "simo2" else 512,
        },
        # 80 images per step for simo2 (10 digits x 8, whole classes split over the workers);
        # simclr: 40 images, two views each, so the same 80 forward passes per step.
        "simo2": {"samples_per_class": 8, "classes_per_batch": 10},
        "simclr": {"batch_size": 40},
        "optim": {"lr": 0.001, "steps": args.steps},
        "scaling": {"num_workers": workers, "use_gpu": args.gpu},
        "output": {
            "uri": str(out),
            "checkpoint_every": args.steps,
            "log_every": args.log_every,
        },
        "monitor": {"knn_every": 0},
    }


def steady_rate(metrics: list[dict]) -> tuple[float, int, float]:
    """(median images_per_s without the first interval, intervals used, their seconds)."""
    rows = sorted(
        (m for m in metrics if isinstance(m.get("images_per_s"), int | float)),
        key=lambda m: m["step"],
    )
    rest = rows[1:]
    if not rest:
        return float("nan"), 0, float("nan")
    seconds = rest[-1]["time"] - rows[0]["time"]
    return statistics.median(m["images_per_s"] for m in rest), len(rest), seconds


def worker_threads() -> str:
    """What torch in each Ray Train worker runs with (the loop reads VITFLOW_TORCH_THREADS)."""
    if os.environ.get("VITFLOW_TORCH_THREADS", "0") != "0":
        return f"{os.environ['VITFLOW_TORCH_THREADS']} (VITFLOW_TORCH_THREADS)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS)"
    return "1 (Ray sets OMP_NUM_THREADS to the 1 CPU each worker reserves)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("simo2", "simclr"), default="simo2")
    # resnet18 at 32 px, 80 images per step: ~0.3 s/step for one worker on 2 EPYC cores;
    # 300 steps keep the whole default run (two runs incl. Ray start-up) at about 4 minutes.
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--log-every", type=int, default=None, help="default: steps/10 (ten log intervals)"
    )
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (use_gpu true)")
    args = ap.parse_args()
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    logging.basicConfig(level=logging.WARNING)

    load_before = load()
    work = Path(args.workdir).resolve()
    data = digits_folder(work / f"digits-{args.image_size}", args.image_size)
    tag = f"{args.method}-{args.model.split('.')[0]}-{args.image_size}px" + (
        "-gpu" if args.gpu else ""
    )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0

    results: dict[int, dict] = {}
    skipped: dict[int, str] = {}
    for workers in WORKER_COUNTS:
        if args.gpu and workers > gpus:
            skipped[workers] = f"needs {workers} GPUs, this machine has {gpus}"
            print(f"\nskipping {workers} worker(s): {skipped[workers]}", flush=True)
            continue
        out = work / f"train-{tag}-w{workers}"
        shutil.rmtree(out, ignore_errors=True)  # a leftover run folder would be resumed
        cfg = load_config(base=job(args, data, out, workers), schema=TrainConfig)
        print(
            f"\nrun_train: {args.method}, {workers} worker(s), {args.steps} steps "
            f"(starts its own local Ray) ...",
            flush=True,
        )
        t0 = time.perf_counter()
        result = run_train(cfg)
        wall = time.perf_counter() - t0
        rate, n_used, loop_s = steady_rate(read_metrics(result.run_dir))
        results[workers] = {"wall": wall, "rate": rate, "n": n_used, "loop": loop_s}

    unit = "views/s" if args.method == "simclr" else "img/s"
    per_step = "40 images x 2 views" if args.method == "simclr" else "80 images (10 x 8)"
    print("\n" + "=" * 78)
    print("train throughput benchmark")
    print(f"machine     : {describe(args.gpu)}")
    print(f"load avg    : {load_before} (1/5/15 min) at start, {load()} at end")
    print(
        f"job         : {args.method}, {args.model} (random init), {args.image_size} px digits, "
        f"global batch {per_step}"
    )
    print(
        f"              {args.steps} steps, log every {args.log_every}, checkpoint at the end, "
        f"no kNN monitor, {'GPU' if args.gpu else 'CPU'}, 1 CPU reserved per worker"
    )
    print(
        f"              torch threads per worker: {worker_threads()}, "
        f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S']}"
    )
    print("-" * 78)
    for workers in WORKER_COUNTS:
        label = f"{workers} worker{'s' if workers > 1 else ' '}"
        if workers in skipped:
            print(f"{label}   : skipped ({skipped[workers]})")
            continue
        r = results[workers]
        print(
            f"{label}   : wall {r['wall']:6.1f} s | steady {r['rate']:8.1f} {unit} "
            f"(median of {r['n']} intervals) | train loop {r['loop']:6.1f} s"
        )
    print("-" * 78)
    if len(results) == 2:
        one, two = results[1], results[2]
        print(f"2w/1w steady throughput            : {two['rate'] / one['rate']:6.2f}x")
        print(f"2w/1w wall time                    : {two['wall'] / one['wall']:6.2f}x")
    else:
        print("2w/1w                              : n/a (only one run)")
    if not args.gpu and (os.cpu_count() or 1) <= 2:
        print(
            f"caveat      : this machine has {os.cpu_count()} cores; the 2 workers share them "
            "with Ray's own processes\n              and add a gradient all-reduce every step, "
            "so expect little or no speed-up\n              from the second worker here."
        )
    print("=" * 78)


if __name__ == "__main__":
    main()
