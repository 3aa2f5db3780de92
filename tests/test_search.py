"""Search: the faiss index against exact search (recall@10 stored with it), exact search
against brute-force numpy, a stale index refused, and, on a real embed run, a query image
embedded as the job did finding its own row first with similarity 1.

The index tests use the digits output of tests/test_plots.py (written by hand, no Ray).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_plots import ok_rows, write_digits_output
from vitflow import columns
from vitflow.errors import VitflowError

pytest.importorskip("faiss")


@pytest.fixture()
def digits(tmp_path):
    return write_digits_output(tmp_path, per_class=30)


@pytest.mark.timeout(60)
def test_exact_neighbours_equal_brute_force(digits):
    from vitflow.analysis.search import exact_neighbours, rows_at
    from vitflow.analysis.source import open_source

    uri, rows = digits
    x, _, ids = ok_rows(rows)
    src = open_source(uri)
    q = x[[0, 17, 250]] * 3.0  # scale does not matter: cosine
    sims, pos = exact_neighbours(src, "pix", q, 7, batch_rows=11)
    want = np.argsort(-(x @ x[[0, 17, 250]].T).T, axis=1, kind="stable")[:, :7]
    assert np.array_equal(pos, want)
    assert sims[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert rows_at(src, pos[1]).column(columns.ID).to_pylist() == ids[want[1]].tolist()


@pytest.mark.timeout(60)
def test_flat_index_is_exact_and_says_so(digits):
    from vitflow.analysis.search import build_index, search

    uri, rows = digits
    x, labels, ids = ok_rows(rows)
    meta = build_index(uri, feature="pix")
    assert meta["kind"] == "flat" and meta["rows"] == len(x) == 299
    assert meta["recall_at_10"]["value"] == 1.0 and meta["recall_at_10"]["queries"] == len(x)
    stored = json.load(open(f"{uri}/_index/pix.json"))
    assert stored["recall_at_10"] == meta["recall_at_10"]
    assert stored["metric"].startswith("inner product of L2-normalised")
    found = search(uri, id=ids[42], k=5)
    assert "flat index" in found.method
    want = np.argsort(-(x @ x[42]), kind="stable")[:5]
    assert [r["id"] for r in found.rows] == ids[want].tolist()
    assert found.rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert [r["label"] for r in found.rows] == labels[want].tolist()
    assert found.rows[0]["path"].endswith(".png")


@pytest.mark.timeout(60)
def test_ivf_index_reaches_the_recall_target_and_finds_the_row_itself(digits):
    from vitflow.analysis.search import RECALL_TARGET, build_index, search

    uri, rows = digits
    _, _, ids = ok_rows(rows)
    meta = build_index(uri, feature="pix", kind="ivf", recall_queries=200, seed=1)
    assert meta["kind"] == "ivf" and meta["factory"] == f"IVF{meta['nlist']},Flat"
    assert meta["nlist"] > 1 and meta["train_rows"] == 299
    r = meta["recall_at_10"]
    assert r["value"] >= RECALL_TARGET and r["queries"] == 200
    # nprobe is the first power of two (or nlist) that reached the target
    assert list(r["by_nprobe"])[-1] == str(meta["nprobe"])
    assert all(v < RECALL_TARGET for v in list(r["by_nprobe"].values())[:-1])
    found = search(uri, id=ids[7], k=3)
    assert found.rows[0]["id"] == ids[7] and "nprobe" in found.method


@pytest.mark.timeout(60)
def test_search_without_index_is_exact_and_a_stale_index_is_refused(digits):
    from vitflow.analysis.search import build_index, search
    from vitflow.manifest import write_manifest
    from vitflow.storage import open_fs

    uri, rows = digits
    _, _, ids = ok_rows(rows)
    assert "exact search" in search(uri, id=ids[0], k=2).method
    with pytest.raises(VitflowError, match="error row"):
        search(uri, id=rows[columns.ID][3])
    with pytest.raises(VitflowError, match="no row with id"):
        search(uri, id="0" * 16)
    with pytest.raises(VitflowError, match="give a query"):
        search(uri)
    build_index(uri)
    manifest = json.load(open(f"{uri}/_manifest.json"))
    manifest["identity"] = {"fingerprint": "b" * 64}  # re-embedded with other weights
    write_manifest(*open_fs(uri), manifest)
    with pytest.raises(VitflowError, match="built on other data.*vitflow index"):
        search(uri, id=ids[0])


# --- a real embed run: the query image embedded as the job did ---


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_query_image_finds_its_own_row_first(ray_local, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from tests.conftest import TINY
    from vitflow.analysis.search import build_index, search
    from vitflow.cli import app
    from vitflow.config import load_config
    from vitflow.embed import run_embed
    from vitflow.synthetic import make_image_folder

    name, kw = TINY["vit"]
    make_image_folder(tmp_path / "images", per_class=3, size=(80, 60), with_bad_files=True)
    torch.manual_seed(5)
    save_file(timm.create_model(name, num_classes=0, **kw).state_dict(), tmp_path / "w.safetensors")
    job = {
        "source": {"uri": str(tmp_path / "images")},
        "model": {"name": name, "kwargs": kw, "checkpoint": str(tmp_path / "w.safetensors")},
        "features": [
            {"name": "emb", "layers": 2, "pool": "mean"},
            {"name": "cls_last", "layers": [-1], "pool": "cls"},
        ],
        "output": {"uri": str(tmp_path / "out"), "rows_per_file": 8},
        "compute": {"batch_size": 4},
    }
    result = run_embed(load_config(base=job))
    out = str(tmp_path / "out")
    assert result.ok == 18
    meta = build_index(out, feature="emb")
    assert meta["recall_at_10"]["value"] == 1.0
    query = tmp_path / "images" / "val" / "dog" / "001.jpg"
    for feature in ("emb", "cls_last"):  # the indexed feature, and one searched exactly
        found = search(out, image=str(query), feature=feature, k=3)
        assert found.rows[0]["path"] == str(query), feature
        assert found.rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert found.rows[1]["similarity"] < found.rows[0]["similarity"]
    # the CLI prints the same neighbours; --id finds the row itself
    cli = CliRunner().invoke(app, ["search", out, "--image", str(query), "-k", "3", "-f", "emb"])
    assert cli.exit_code == 0, cli.output
    assert cli.output.splitlines()[1].split()[-1] == str(query)
    row_id = found.rows[0]["id"]
    by_id = CliRunner().invoke(app, ["search", out, "--id", row_id, "-k", "2", "-f", "emb"])
    assert by_id.exit_code == 0 and by_id.output.splitlines()[1].split()[-1] == str(query)
    # a bad query image is one sentence, as a job's error row would say
    empty = str(tmp_path / "images" / "train" / "cat" / "zero_bytes.jpg")
    bad = CliRunner().invoke(app, ["search", out, "-f", "emb", "--image", empty])
    assert bad.exit_code == 1 and "empty file" in bad.output
    # another feature spec (or other weights) would not give comparable vectors: refused
    other = tmp_path / "other.yaml"
    changed = {**job, "features": [{"name": "emb", "layers": 1, "pool": "mean"}]}
    other.write_text(json.dumps(changed))
    with pytest.raises(VitflowError, match="the feature spec"):
        search(out, image=str(query), feature="emb", job=str(other))
    torch.manual_seed(6)
    save_file(timm.create_model(name, num_classes=0, **kw).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(VitflowError, match="the model weights"):
        search(out, image=str(query), feature="emb")
