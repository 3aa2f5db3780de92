"""`vitflow export`: CSV (``filename,x1..xD``), ``.npy`` + ids, and one parquet file, each
read back with pandas / numpy / pyarrow equal to the vectors, streamed from several parts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_eval import digits_rows, write_output
from vitflow import columns
from vitflow.errors import VitflowError


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """4 parts; one path holds a comma and a quote, one a line break."""
    rows = digits_rows(per_class=30)
    rows[columns.PATH][5] = '/images/a, "b".png'
    rows[columns.PATH][6] = "/images/two\nlines.png"
    uri = write_output(tmp_path_factory.mktemp("export") / "out", rows, parts=4)
    ok = np.array([s == "ok" for s in rows[columns.STATUS]])
    return uri, rows, ok


def test_csv_round_trip(out, tmp_path):
    from vitflow.analysis.export import export_embeddings

    uri, rows, ok = out
    res = export_embeddings(uri, str(tmp_path / "pix.csv"), feature="pix", batch_rows=50)
    assert (res.rows, res.dim, res.format) == (ok.sum(), 64, "csv")
    text = (tmp_path / "pix.csv").read_text()
    assert text.splitlines()[0] == "filename," + ",".join(f"x{j}" for j in range(1, 65))
    df = pd.read_csv(tmp_path / "pix.csv")
    assert list(df["filename"]) == list(np.array(rows[columns.PATH], object)[ok])
    np.testing.assert_array_equal(df.iloc[:, 1:].to_numpy(np.float32), rows["pix"][ok])
    # numpy alone reads the numbers too (first column skipped)
    res = export_embeddings(uri, str(tmp_path / "proj.csv"), feature="proj", split="train")
    train = ok & (np.array(rows[columns.SPLIT], object) == "train")
    plain = np.array(rows[columns.PATH], object)[train]
    assert not any("," in p or "\n" in p for p in plain[:3])
    nums = np.loadtxt(
        [line.split(",", 1)[1] for line in (tmp_path / "proj.csv").read_text().splitlines()[1:4]],
        delimiter=",",
        dtype=np.float32,
    )
    np.testing.assert_array_equal(nums, rows["proj"][train][:3])
    assert res.rows == train.sum()


def test_npy_with_its_ids(out, tmp_path):
    from vitflow.analysis.export import export_embeddings

    uri, rows, ok = out
    res = export_embeddings(uri, str(tmp_path / "proj.npy"), feature="proj", batch_rows=40)
    x = np.load(tmp_path / "proj.npy")
    assert x.dtype == np.float32 and x.shape == (ok.sum(), 16)
    np.testing.assert_array_equal(x, rows["proj"][ok])
    assert res.ids_path == str(tmp_path / "proj.ids.parquet")
    ids = pq.read_table(res.ids_path)
    assert ids.column_names == [columns.ID, columns.PATH, columns.LABEL, columns.SPLIT]
    for c in ids.column_names:
        assert ids.column(c).to_pylist() == list(np.array(rows[c], object)[ok])


def test_one_parquet_file_and_a_transform(out, tmp_path, monkeypatch):
    from vitflow import load_embeddings
    from vitflow.analysis.export import export_embeddings
    from vitflow.analysis.transforms import fit_transform

    uri, rows, ok = out
    res = export_embeddings(
        uri, format="parquet", feature="pix", output=str(tmp_path / "a.parquet")
    )
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.field("pix").type == pa.list_(pa.float32(), 64)
    assert table.column(columns.ID).to_pylist() == list(np.array(rows[columns.ID])[ok])
    np.testing.assert_array_equal(np.stack(table.column("pix").to_pylist()), rows["pix"][ok])
    assert res.rows == ok.sum()

    fit_transform(uri, feature="pix", standardize=True, pca=5, name="five", overwrite=True)
    monkeypatch.chdir(tmp_path)
    res = export_embeddings(uri, format="csv", feature="pix", transform="five")
    assert res.path == "out-pix-five.csv" and res.dim == 5
    want = np.stack(load_embeddings(uri, feature="pix", transform="five")["pix"])
    np.testing.assert_array_equal(pd.read_csv(res.path).iloc[:, 1:].to_numpy(np.float32), want)


def test_refusals_and_the_cli(out, tmp_path):
    from typer.testing import CliRunner

    from vitflow.analysis.export import export_embeddings
    from vitflow.cli import app

    uri, _, ok = out
    with pytest.raises(VitflowError, match="not one of csv, npy, parquet"):
        export_embeddings(uri, str(tmp_path / "x.txt"), feature="pix")
    with pytest.raises(VitflowError, match="several features"):
        export_embeddings(uri, str(tmp_path / "x.csv"))
    target = tmp_path / "cli.npy"
    r = CliRunner().invoke(
        app, ["export", uri, "--format", "npy", "--feature", "proj", "--output", str(target)]
    )
    assert r.exit_code == 0, r.output
    assert f"{ok.sum()} rows x 16" in r.output and "cli.ids.parquet" in r.output
    assert np.load(target).shape == (ok.sum(), 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.ids.parquet", "cli.npy"]
