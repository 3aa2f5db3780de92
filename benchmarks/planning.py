"""Planning at internet scale, on paper: a synthetic manifest of N paths (no image is decoded).

Measures, for one process (the driver), in one run:

  - listing a manifest source of N rows (a parquet list, read in pieces);
  - the resume fingerprint of the listing (what --resume compares);
  - a reindex of an index that already holds every row, with nothing changed: the diff of
    the listing against the index snapshot, and no Ray started (asserted by the script:
    it fails if the engine is entered);
  - the driver's peak memory (ru_maxrss) and bytes per listed row.

Run:  .venv/bin/python benchmarks/planning.py                 (10M rows; several minutes, ~1.5 GB)
      .venv/bin/python benchmarks/planning.py --rows 200000   (a quick look)
Each size runs in its own process, so every peak is that size's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_manifest(root: Path, n: int) -> Path:
    """N camera-roll-like paths in 1,000 class folders, as a parquet list with sizes/mtimes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = root / "files.parquet"
    writer = None
    step = 1_000_000
    for start in range(0, n, step):
        i = np.arange(start, min(n, start + step))
        cls = pa.array(i % 1000).cast(pa.string())
        name = pa.array(i).cast(pa.string())
        split = pa.array(np.where(i % 10 == 0, "val", "train"))
        paths = pc.binary_join_element_wise(split, pc.utf8_lpad(cls, 4, "0"), name, "/")
        paths = pc.binary_join_element_wise(paths, ".jpg", "")
        table = pa.table(
            {
                "path": paths,
                "size": pa.array(200_000 + (i % 7919), pa.int64()),
                "mtime": pa.array(1.7e9 + i).cast(pa.string()),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def job(manifest: Path, out: Path):
    from vitflow.config import load_config

    return load_config(
        base={
            "kind": "reindex",
            "source": {"uri": str(manifest)},
            "model": {
                "name": "vit_small_patch16_224",
                "kwargs": {"img_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 1},
                "weights": "random",
            },
            "features": [{"name": "emb", "layers": 1, "pool": "mean"}],
            "output": {"uri": str(out)},
        }
    )


def build_index(cfg) -> None:
    """An index that holds every listed row (tiny vectors), committed as one version: what a
    finished nightly reindex leaves."""
    import pyarrow as pa

    from vitflow import columns
    from vitflow.index_table import FileStager, commit_files
    from vitflow.reindex import plan_reindex

    plan = plan_reindex(cfg)
    dim = plan.embed.dims["emb"]
    file_schema = pa.schema([f.remove_metadata() for f in plan.schema])
    stager = FileStager(plan.uri, plan.storage_options, plan.run_id)
    adds = []
    for part in plan.todo.batches(batch_rows=1_000_000):
        m = part.num_rows
        cols = {
            columns.ID: part[columns.ID],
            columns.PATH: part[columns.PATH],
            columns.LABEL: part[columns.LABEL],
            columns.SPLIT: part[columns.SPLIT],
            columns.STATUS: pa.array(["ok"] * m),
            columns.ERROR: pa.nulls(m, pa.string()),
            columns.WIDTH: pa.array([224] * m, pa.int32()),
            columns.HEIGHT: pa.array([224] * m, pa.int32()),
            "size": part["size"],
            "mtime": part["mtime"],
            "emb": pa.array([[0.0] * dim] * m, pa.list_(pa.float32())),
        }
        rows = pa.table([cols[f.name].cast(f.type) for f in file_schema], schema=file_schema)
        adds.append(stager.write(rows))
    commit_files(
        plan.uri,
        plan.storage_options,
        version=None,
        schema=plan.schema,
        adds=adds,
        app_id=f"bench.{plan.run_id}",
        metadata={"vitflow.operation": "benchmark"},
    )


def setup(n: int, work: Path) -> None:
    """The manifest and an index holding every row: made in a process of its own, so the
    measured process's peak memory is the planning's alone."""
    manifest = make_manifest(work, n)
    build_index(job(manifest, work / "index"))


def measure(n: int, work: Path) -> dict:
    """List, fingerprint and reindex-with-nothing-changed, in this (fresh) process."""
    import vitflow.engine as engine
    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.config import SourceConfig
    from vitflow.embed import job_fingerprint
    from vitflow.reindex import run_reindex
    from vitflow.sources import list_images

    manifest = work / "files.parquet"
    cfg = job(manifest, work / "index")
    weights = backbone_bytes(create_backbone(cfg.model))
    base_mb = peak_mb()
    t0 = time.perf_counter()
    listing = list_images(SourceConfig(uri=str(manifest)))
    list_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    job_fingerprint(cfg, weights, listing)
    fp_s = time.perf_counter() - t0
    listing_mb = peak_mb()
    del listing

    def no_ray(*a, **k):
        raise AssertionError("a reindex with nothing changed started Ray work")

    engine.ray_session = no_ray
    t0 = time.perf_counter()
    result = run_reindex(cfg)
    reindex_s = time.perf_counter() - t0
    assert (result.added, result.updated, result.deleted) == (0, 0, 0), result
    assert result.unchanged == n
    peak = peak_mb()
    return {
        "rows": n,
        "list_s": round(list_s, 1),
        "fingerprint_s": round(fp_s, 1),
        "reindex_nothing_changed_s": round(reindex_s, 1),
        "driver_base_mb": round(base_mb),
        "peak_mb_listing": round(listing_mb),
        "peak_mb_reindex": round(peak),
        "bytes_per_row_listing": round((listing_mb - base_mb) * 2**20 / n),
        "bytes_per_row_reindex": round((peak - base_mb) * 2**20 / n),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000_000])
    p.add_argument("--step", choices=("setup", "measure"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step == "setup":
        setup(args.rows[0], Path(args.work))
        return
    if args.step == "measure":
        print(json.dumps(measure(args.rows[0], Path(args.work))))
        return
    results = []
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="vitflow-plan-") as work:
            for step in ("setup", "measure"):
                r = subprocess.run(
                    [sys.executable, __file__, "--rows", str(n), "--step", step, "--work", work],
                    capture_output=True,
                    text=True,
                )
                if r.returncode:
                    sys.exit(f"{n} rows, {step} failed:\n{r.stderr[-3000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    out = Path("bench-out")
    out.mkdir(exist_ok=True)
    (out / "planning.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
