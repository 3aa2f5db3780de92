"""CPU, decode-bound: ``vitflow embed`` end to end vs the decode-bound ceiling (issue 10).

A model so fast that decode bounds the job (``mobilenetv3_small_050``, random weights) on
camera-sized photo-like JPEGs (default 2,000 at 1280x960, made once under bench-out/), in
one run:

  ceiling  - every core decoding + resizing/cropping with PIL (the model's exact timm eval
             transform) in a plain process pool, nothing else (runs.decode_ceiling). Timed
             before and again after vitflow: on a shared machine the two show how much the
             load moved; the ratios use their mean.
  forward  - the model alone on ready tensors, torch on every core: shows that the model is
             not the bound. With the ceiling it gives what one machine doing both can reach,
             1 / (1/decode + 1/forward), since here decode and model share the same cores.
  vitflow  - ``vitflow embed JOB.yaml`` in a process of its own (runs.run_vitflow): timed end
             to end, Python and Ray start-up and shutdown included; and its steady-state rate
             (the manifest's timing.steady_images_per_second, rows 10%..90% of the run).

Goal (issue 10): vitflow / ceiling >= 0.9. Prints one table, writes
bench-out/results/decode_bound.json; asserts nothing.

Run:  .venv/bin/python benchmarks/decode_bound.py            (a few minutes on 2 cores)
      .venv/bin/python benchmarks/decode_bound.py --quick    (48 images, smoke run)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from machine import usable_cores  # noqa: E402  (benchmarks/ is on sys.path)
from photos import describe_set, photo_set, set_paths  # noqa: E402
from report import Case, Row  # noqa: E402
from runs import decode_ceiling, forward_rate, run_vitflow, wait_for_quiet  # noqa: E402

from vitflow.backbone import data_config  # noqa: E402

GOAL = 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    ap.add_argument("--model", default="mobilenetv3_small_050")
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 48 images")
    ap.add_argument("--max-load", type=float, default=None, help="wait for a quieter machine")
    a = ap.parse_args()
    if a.quick:
        a.num_images = min(a.num_images, 48)
    work = Path(a.workdir).resolve()
    cores = usable_cores()

    import timm

    dcfg = data_config(timm.create_model(a.model, pretrained=False, num_classes=0))
    root = photo_set(work, a.num_images, a.width, a.height)
    paths = set_paths(root)
    if a.max_load:
        wait_for_quiet(a.max_load, 600)
    case = Case("decode_bound", "CPU, decode-bound: vitflow embed vs the decode-bound ceiling")
    case.setup = [
        f"images   : {describe_set(paths, a.width, a.height)}",
        f"model    : {a.model}, random weights, input {tuple(dcfg['input_size'])}, "
        f"feature: last block, mean pool, L2",
    ]
    n = len(paths)

    print(f"decode ceiling: {cores} processes ...", flush=True)
    sec_before = decode_ceiling(paths, dcfg, cores)
    print("bare forward ...", flush=True)
    fwd = forward_rate(a.model, batch_size=32, batches=4 if a.quick else 20, threads=cores)

    job = {
        "kind": "embed",
        "source": {"uri": str(root)},
        "model": {"name": a.model, "weights": "random"},
        "compute": {"device": "cpu"},
    }
    run = run_vitflow(job, work=work / "decode_bound", name="vitflow")
    print(f"decode ceiling again: {cores} processes ...", flush=True)
    sec_after = decode_ceiling(paths, dcfg, cores)
    sec_ceiling = (sec_before + sec_after) / 2
    ceiling = n / sec_ceiling
    both = 1 / (1 / ceiling + 1 / fwd)

    label = f"decode ceiling ({cores} processes, PIL + timm eval resize/crop)"
    case.rows = [
        Row(f"{label}, before", n, sec_before),
        Row(f"{label}, after", n, sec_after),
        Row("decode ceiling, mean of the two (used in the ratios)", n, sec_ceiling),
        Row(f"bare forward on ready tensors ({cores} threads, batch 32)", None, None, fwd),
        Row("one machine doing both: 1/(1/ceiling + 1/forward)", None, None, both),
        Row("vitflow embed, end to end (CLI process, Ray start-up incl.)", run.listed, run.seconds),
        Row("vitflow embed, steady state (manifest, 10%..90% of rows)", None, None, run.steady),
    ]
    case.ratio("vitflow end to end / decode ceiling", run.listed / run.seconds, ceiling, GOAL)
    case.ratio("vitflow steady state / decode ceiling", run.steady, ceiling, GOAL)
    case.ratio("vitflow's decode stage / decode ceiling", run.decode_rate, ceiling)
    case.ratio("vitflow steady state / (decode + forward on the same cores)", run.steady, both)
    case.notes = [f"vitflow: {run.breakdown()}", f"kept in {run.folder}"]
    case.details = {
        "decode_ceiling_seconds": sec_ceiling,
        "decode_ceiling_seconds_before_after": [sec_before, sec_after],
        "forward_img_s": fwd,
        "vitflow": run.details(),
    }
    case.print()
    case.save(work, a.quick)


if __name__ == "__main__":
    main()
