"""Readers stay light: loading an output imports pyarrow, pandas and fsspec, never torch,
timm or Ray (a cold `vitflow.load_embeddings` is a fraction of a second, not the ~6 s of
importing the pipeline)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitflow import columns


def write_output(out, n=5, dim=4):
    """A small, complete embed output written by hand in the documented layout."""
    from vitflow.manifest import write_manifest
    from vitflow.stages import output_schema
    from vitflow.storage import open_fs

    out.mkdir()
    flat = pa.array(np.arange(n * dim, dtype=np.float32))
    table = pa.table(
        {
            columns.ID: [f"{i:016x}" for i in range(n)],
            columns.PATH: [f"/x/{i}.jpg" for i in range(n)],
            columns.LABEL: ["a"] * n,
            columns.SPLIT: ["train"] * n,
            columns.STATUS: ["ok"] * n,
            columns.ERROR: pa.array([None] * n, pa.string()),
            columns.WIDTH: pa.array([8] * n, pa.int32()),
            columns.HEIGHT: pa.array([8] * n, pa.int32()),
            "emb": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=output_schema({"emb": dim}),
    )
    pq.write_table(table, out / "part-00000.parquet")
    fs, path = open_fs(str(out))
    write_manifest(
        fs, path, {"counts": {"listed": n, "ok": n, "error": 0}, "parts": {"part-00000.parquet": n}}
    )


@pytest.mark.timeout(60)
def test_load_embeddings_imports_neither_torch_nor_ray(tmp_path):
    write_output(tmp_path / "out")
    code = (
        "import sys, vitflow\n"
        f"df = vitflow.load_embeddings({str(tmp_path / 'out')!r})\n"
        "heavy = [m for m in ('torch', 'timm', 'ray', 'torchvision') if m in sys.modules]\n"
        "print(len(df), heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["5", "[]"]
