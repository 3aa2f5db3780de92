"""Scale: vitflow's time at N and 10N images (linear) and the driver's peak memory (flat).

The decode-bound job of decode_bound.py (``mobilenetv3_small_050``, random weights) on small
photo-like JPEGs (default N = 400 and 10N = 4,000 at 320x240, made once under
bench-out/), each ``vitflow embed`` end to end in its own process (runs.run_vitflow). The
driver runs under benchmarks/driver.py, which records its own peak resident set size
(``getrusage(RUSAGE_SELF)``: the driver process alone, not Ray's processes or the workers).

Goals: t(10N) / t(N) <= 10.5 (linear; with the fixed start-up costs inside both times it is
easily met, so the table also shows the stream's own time and the marginal rate, the
images/s of the 9N images the bigger run adds), and the driver's peak RSS at 10N at most
1.1x that at N (flat: the driver holds counters, not rows). Prints one table, writes
bench-out/results/scale.json; asserts nothing.

Run:  .venv/bin/python benchmarks/scale.py                 (a few minutes on 2 cores)
      .venv/bin/python benchmarks/scale.py --n 2000        (N = 2,000 and 20,000)
      .venv/bin/python benchmarks/scale.py --quick         (16 and 160 images, smoke run)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from photos import describe_set, photo_set, set_paths  # noqa: E402  (benchmarks/ on sys.path)
from report import Case, Row  # noqa: E402
from runs import run_vitflow, wait_for_quiet  # noqa: E402

TIME_GOAL = 10.5
MEMORY_GOAL = 1.1


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--n", type=int, default=400, help="the small run; the big one is 10x")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--model", default="mobilenetv3_small_050")
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 and 160 images")
    ap.add_argument("--max-load", type=float, default=None, help="wait for a quieter machine")
    a = ap.parse_args()
    if a.quick:
        a.n = min(a.n, 16)
    work = Path(a.workdir).resolve()
    roots = {k: photo_set(work, k * a.n, a.width, a.height) for k in (1, 10)}
    sizes = {k: len(set_paths(r)) for k, r in roots.items()}
    if a.max_load:
        wait_for_quiet(a.max_load, 600)
    case = Case("scale", f"Scale: vitflow embed at N = {a.n} and 10N = {10 * a.n} images")
    case.setup = [
        f"images   : {describe_set(set_paths(roots[10]), a.width, a.height)} (N: the first {a.n})",
        f"model    : {a.model}, random weights",
    ]
    runs = {}
    for k, root in roots.items():
        job = {
            "kind": "embed",
            "source": {"uri": str(root)},
            "model": {"name": a.model, "weights": "random"},
            "compute": {"device": "cpu"},
        }
        runs[k] = run_vitflow(job, work=work / "scale", name=f"n{sizes[k]}")
    small, big = runs[1], runs[10]
    for k, run in runs.items():
        label = "N" if k == 1 else "10N"
        case.rows.append(
            Row(f"{label}: end to end (CLI process, Ray start-up incl.)", run.listed, run.seconds)
        )
        case.rows.append(
            Row(
                f"{label}: stream only (manifest timing.stream_seconds)",
                run.listed,
                run.timing.get("stream_seconds"),
            )
        )
        case.rows.append(
            Row(f"{label}: steady state (manifest, 10%..90% of rows)", None, None, run.steady)
        )
    extra = big.listed - small.listed
    case.rows.append(
        Row(
            "marginal: the 9N more images (end-to-end time difference)",
            extra,
            big.seconds - small.seconds,
        )
    )
    case.ratio("t(10N) / t(N), end to end", big.seconds, small.seconds, TIME_GOAL, at_most=True)
    case.ratio(
        "t(10N) / t(N), stream only",
        big.timing.get("stream_seconds"),
        small.timing.get("stream_seconds"),
        TIME_GOAL,
        at_most=True,
    )
    case.ratio(
        "driver peak RSS 10N / N",
        big.driver_peak_rss_mb,
        small.driver_peak_rss_mb,
        MEMORY_GOAL,
        at_most=True,
    )
    per_row = None
    if small.driver_peak_rss_mb is not None and big.driver_peak_rss_mb is not None and extra:
        per_row = (big.driver_peak_rss_mb - small.driver_peak_rss_mb) * 2**20 / extra
    case.notes = [
        f"driver peak RSS: {small.driver_peak_rss_mb} MB at N, {big.driver_peak_rss_mb} MB at "
        f"10N: {'?' if per_row is None else f'{per_row:.0f}'} bytes per added row (most of "
        "the peak is the interpreter, torch and the checked model; benchmarks/planning.py "
        "measures the listing's own bytes per row at 1M+ rows)",
        *(f"{r.name}: {r.breakdown()}" for r in runs.values()),
    ]
    case.details = {
        **{r.name: r.details() for r in runs.values()},
        "driver_bytes_per_added_row": per_row,
    }
    case.print()
    case.save(work, a.quick)


if __name__ == "__main__":
    main()
