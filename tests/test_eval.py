"""`vitflow eval`: the blocked kNN and the linear probe against hand-written numpy /
scikit-learn references on the same rows, on an embed output and a Delta index alike.

The outputs are written by hand in the documented layout (parquet parts + _manifest.json,
or a Delta table through vitflow's own index writer): no Ray, no model. The vectors are
scikit-learn's digits (pixels, and a fixed random projection of them), whose classes differ
visibly.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitflow import columns
from vitflow.errors import VitflowError

C_GRID = (0.01, 1.0)  # two strengths keep the probe's fits few (the default grid has six)
SPEC = {"layers": [2, 3], "pool": "mean", "aggregate": "concat", "norm": False}


# --- outputs written by hand ---


def digits_rows(n_classes=10, per_class=None, split=True, seed=0):
    """Rows of scikit-learn's digits: ``pix`` (64 pixels) and ``proj`` (a fixed random
    projection to 16 dims); every 5th row of a class is ``val`` (with ``split``). Three
    rows are made awkward: an error row, a row without a label, a row of another split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < n_classes)
    if per_class:
        keep = np.concatenate([keep[d.target[keep] == c][:per_class] for c in range(n_classes)])
        keep.sort()
    x = d.data[keep].astype(np.float32)
    y = d.target[keep]
    n = len(keep)
    proj = np.random.default_rng(seed).normal(size=(64, 16)).astype(np.float32)
    rows = {
        columns.ID: [hashlib.sha256(f"img{i}".encode()).hexdigest()[:16] for i in keep],
        columns.PATH: [f"/images/{y[i]}/{keep[i]:04d}.png" for i in range(n)],
        columns.LABEL: [str(v) for v in y],
        columns.SPLIT: [("val" if i % 5 == 4 else "train") if split else None for i in range(n)],
        columns.STATUS: ["ok"] * n,
        columns.ERROR: [None] * n,
        "pix": x,
        "proj": x @ proj,
    }
    rows[columns.STATUS][3] = "error"
    rows[columns.ERROR][3] = "cannot identify image file"
    rows[columns.LABEL][7] = None
    if split:
        rows[columns.SPLIT][11] = "extra"
    return rows


def output_schema(dims):
    """The embeddings table's schema, as the README documents it (``stages.output_schema``,
    spelled out here so the tests never import the pipeline)."""
    meta = [
        pa.field(columns.ID, pa.string(), nullable=False),
        pa.field(columns.PATH, pa.string(), nullable=False),
        pa.field(columns.LABEL, pa.string()),
        pa.field(columns.SPLIT, pa.string()),
        pa.field(columns.STATUS, pa.string(), nullable=False),
        pa.field(columns.ERROR, pa.string()),
        pa.field(columns.WIDTH, pa.int32()),
        pa.field(columns.HEIGHT, pa.int32()),
    ]
    return pa.schema(meta + [pa.field(k, pa.list_(pa.float32(), d)) for k, d in dims.items()])


def as_table(rows):
    """The rows as the embeddings table; error rows' vectors are null."""
    vectors = [k for k in rows if k not in columns.META_COLUMNS]
    dims = {k: rows[k].shape[1] for k in vectors}
    n = len(rows[columns.ID])
    bad = pa.array([s != "ok" for s in rows[columns.STATUS]])
    data = {c: rows.get(c) for c in columns.META_COLUMNS}
    data[columns.WIDTH] = pa.array([8] * n, pa.int32())
    data[columns.HEIGHT] = pa.array([8] * n, pa.int32())
    for k in vectors:
        flat = pa.array(np.ascontiguousarray(rows[k], np.float32).reshape(-1))
        data[k] = pa.FixedSizeListArray.from_arrays(flat, dims[k], mask=bad)
    return pa.table(data, schema=output_schema(dims))


def write_output(out, rows, parts=1, specs=True):
    """An embed output in the documented layout: ``parts`` parquet parts of consecutive
    rows and a manifest with per-part row counts and the features section."""
    from vitflow.manifest import write_manifest
    from vitflow.storage import open_fs

    table = as_table(rows)
    out.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    counts = {}
    for p in range(parts):
        name = f"part-{p:05d}.parquet"
        pq.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]), out / name)
        counts[name] = int(bounds[p + 1] - bounds[p])
    errors = sum(s != "ok" for s in rows[columns.STATUS])
    dims = {f.name: f.type.list_size for f in table.schema if pa.types.is_fixed_size_list(f.type)}
    manifest = {
        "counts": {"listed": table.num_rows, "ok": table.num_rows - errors, "error": errors},
        "parts": counts,
        "features": {k: {"dim": d, **SPEC} for k, d in dims.items()} if specs else {},
        "identity": {"fingerprint": "a" * 64},
    }
    fs, path = open_fs(str(out))
    write_manifest(fs, path, manifest)
    return str(out)


def write_delta(uri, rows, files=3):
    """The same rows as a reindexed Delta index, written with vitflow's index writer."""
    from vitflow.index_table import FileStager, commit_files, index_schema

    table = as_table(rows)
    job = {
        "features": [
            {"name": k, "layers": 2, "pool": "mean", "aggregate": "concat"}
            for k in ("pix", "proj")
            if k in rows
        ]
    }
    schema = index_schema(table.schema, "b" * 64, job)
    n = table.num_rows
    data = {f.name: table[f.name] for f in table.schema}
    data["size"] = pa.array([100] * n, pa.int64())
    data["mtime"] = pa.array(["2026-01-01"] * n)
    plain = pa.schema([f.remove_metadata() for f in schema])
    full = pa.table([data[f.name].cast(f.type) for f in plain], schema=plain)
    stager = FileStager(str(uri), {}, uuid.uuid4().hex)
    bounds = np.linspace(0, n, files + 1).astype(int)
    adds = [
        stager.write(full.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    commit_files(str(uri), {}, version=None, schema=schema, adds=adds, app_id="t", metadata={})
    return str(uri)


# --- the references: written out from the protocol, on full matrices ---


def knn_reference(train_x, train_y, test_x, n_classes, k=20, t=0.07, same_group=None):
    """DINO's weighted kNN on the full similarity matrix: top-1 and top-5 hits per row."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b.astype(np.float64) @ a.T.astype(np.float64)  # (m, n): the whole matrix
    if same_group is not None:
        sim[same_group] = -np.inf
    top1, top5 = [], []
    for row in sim:
        nn = np.argsort(-row, kind="stable")[:k]
        nn = nn[np.isfinite(row[nn])]
        votes = np.zeros(n_classes)
        for j in nn:
            votes[train_y[j]] += np.exp(row[j] / t)
        ranked = [c for c in np.argsort(-votes, kind="stable") if votes[c] > 0]
        top1.append(ranked[:1])
        top5.append(ranked[:5])
    return top1, top5


def probe_reference(train_x, train_y, test_x, holdout, c_grid):
    """C chosen on the held-out rows, refit on all train rows (scikit-learn, all at once)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def fit(x, y, c):
        s = StandardScaler().fit(x)
        return s, LogisticRegression(C=c, max_iter=1000).fit(s.transform(x), y)

    acc = {}
    for c in c_grid:
        s, m = fit(train_x[~holdout], train_y[~holdout], c)
        acc[c] = np.mean(m.predict(s.transform(train_x[holdout])) == train_y[holdout])
    best = max(acc, key=lambda c: (acc[c], -c))
    s, m = fit(train_x, train_y, best)
    return best, m.predict(s.transform(test_x))


def _arrays(rows):
    labels = sorted({v for v in rows[columns.LABEL] if v is not None})
    y = np.array([labels.index(v) if v is not None else -1 for v in rows[columns.LABEL]])
    ok = np.array([s == "ok" for s in rows[columns.STATUS]])
    return labels, y, ok


# --- kNN ---


def test_blocked_knn_equals_the_full_matrix(monkeypatch):
    """Train rows fed 7 at a time, test rows in tiles of 5: the same neighbours, votes and
    top-1/top-5 as the whole similarity matrix."""
    from vitflow.analysis import knn

    rows = digits_rows()
    _, y, _ = _arrays(rows)
    x = rows["proj"] + np.random.default_rng(1).normal(0, 0.01, rows["proj"].shape).astype(
        np.float32
    )
    train, test = np.arange(0, 1500), np.arange(1500, len(x))
    monkeypatch.setattr(knn, "TILE_ELEMENTS", 16 * (7 + 20))  # tiles of 16 test rows
    acc = knn.KnnAccumulator(x[test], k=20)
    for s in range(0, len(train), 7):
        acc.update(x[train[s : s + 7]], y[train[s : s + 7]])
    hits = knn.topk_correct(acc.votes(10), y[test])
    top1, top5 = knn_reference(x[train], y[train], x[test], 10)
    assert hits[1].tolist() == [y[test][i] in t for i, t in enumerate(top1)]
    assert hits[5].tolist() == [y[test][i] in t for i, t in enumerate(top5)]
    full = (x[test] / np.linalg.norm(x[test], axis=1, keepdims=True)) @ (
        x[train] / np.linalg.norm(x[train], axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(
        np.sort(acc.sims, axis=1), np.sort(full, axis=1)[:, -20:], rtol=0, atol=1e-5
    )
    assert 0.6 < hits[1].mean() < 1.0 and hits[5].mean() > hits[1].mean()


def test_a_train_row_never_neighbours_a_test_row_of_its_own_fold():
    from vitflow.analysis import knn

    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]] + 0.01
    acc = knn.KnnAccumulator(x, k=1, groups=np.array([0, 1, 0, 1]))
    acc.update(x, np.array([10, 11, 12, 13]), groups=np.array([0, 1, 0, 1]))
    # row 0's twin (row 1) is in another fold: it is the neighbour, never row 0 itself
    assert acc.labels[:, 0].tolist() == [11, 10, 13, 12]


# --- the whole eval against the references ---


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    rows = digits_rows(per_class=80)
    return rows, write_output(tmp_path_factory.mktemp("eval") / "out", rows, parts=3)


def test_eval_equals_the_references_on_the_same_rows(digits_out, monkeypatch):
    """Split mode on a 3-part output, streamed 64 train rows and 100 test rows at a time:
    kNN and probe scores equal the references; every row is accounted for; eval.json and
    the chart are written."""
    from vitflow.analysis import evaluate as ev
    from vitflow.analysis import knn
    from vitflow.analysis.probe import holdout_mask
    from vitflow.analysis.sample import id_keys, remix

    rows, uri = digits_out
    seen = []
    update = knn.KnnAccumulator.update
    monkeypatch.setattr(
        knn.KnnAccumulator, "update", lambda self, x, *a: (seen.append(len(x)), update(self, x, *a))
    )
    report = ev.evaluate(uri, c_grid=C_GRID, batch_rows=64, block_rows=100)
    assert max(seen) <= 64 and len(seen) > 2 * 600 // 64  # streamed: never all train rows

    labels, y, ok = _arrays(rows)
    split = np.array(rows[columns.SPLIT], dtype=object)
    train = ok & (y >= 0) & (split == "train")
    test = ok & (y >= 0) & (split == "val")
    assert report.mode == "split" and report.split == {"train": "train", "test": "val"}
    assert report.excluded == {"error": 1, "no_label": 1, "other_split": 1}
    assert train.sum() + test.sum() + 3 == len(y)
    ids = np.array(rows[columns.ID])
    for s in report.scores:
        x = rows[s.name]
        top1, top5 = knn_reference(x[train], y[train], x[test], len(labels))
        assert s.knn_top1 == pytest.approx(
            np.mean([t in r for t, r in zip(y[test], top1, strict=True)])
        )
        assert s.knn_top5 == pytest.approx(
            np.mean([t in r for t, r in zip(y[test], top5, strict=True)])
        )
        holdout = holdout_mask(y[train], remix(id_keys(list(ids[train]), 0), ev.HOLDOUT_SALT))
        c, pred = probe_reference(x[train], y[train], x[test], holdout, C_GRID)
        assert s.protocol["linear"]["C"] == c
        assert s.linear_top1 == pytest.approx(np.mean(pred == y[test]))
        assert (s.n_train, s.n_test, s.dim) == (train.sum(), test.sum(), x.shape[1])
        assert s.spec == SPEC
    assert [s.name for s in report.scores] == ["pix", "proj"]  # raw pixels beat 16 dims
    assert report.scores[0].knn_top1 > 0.9

    saved = json.loads(open(uri + "/_eval/eval.json").read())
    assert saved["leaderboard"] == ["pix", "proj"]
    for s in report.scores:
        entry = saved["features"][s.name]
        for key in ("knn_top1", "knn_top5", "linear_top1", "dim", "n_train", "n_test"):
            assert entry[key] == pytest.approx(getattr(s, key))
        p = entry["protocol"]
        assert (p["knn"]["k"], p["knn"]["temperature"], p["seed"]) == (20, 0.07, 0)
        assert p["split"] == {"train": "train", "test": "val"}
        assert p["excluded"] == {"error": 1, "no_label": 1, "other_split": 1}
    with open(uri + "/_eval/leaderboard.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_split_values_a_seeded_stratified_k_fold_runs(tmp_path):
    """No split values: 5 folds, stratified by class, from a seeded hash of the ids; each
    row is tested once against the other folds; the output says so."""
    from vitflow.analysis import evaluate as ev
    from vitflow.analysis.sample import id_keys, remix
    from vitflow.analysis.splits import FOLD_SALT, assign_folds

    rows = digits_rows(n_classes=4, per_class=60, split=False)
    uri = write_output(tmp_path / "out", rows, parts=2)
    report = ev.evaluate(uri, feature="proj", c_grid=(1.0,), seed=3, batch_rows=50)
    assert report.mode == "folds" and report.split["folds"] == 5
    assert report.excluded == {"error": 1, "no_label": 1, "other_split": 0}
    assert "5-fold" in report.leaderboard()

    labels, y, ok = _arrays(rows)
    use = ok & (y >= 0)
    x, yy = rows["proj"][use], y[use]
    fold = assign_folds(yy, remix(id_keys(list(np.array(rows[columns.ID])[use]), 3), FOLD_SALT), 5)
    for c in range(4):  # stratified: each class spread evenly over the folds
        assert np.ptp(np.bincount(fold[yy == c], minlength=5)) <= 1
    top1, _ = knn_reference(x, yy, x, len(labels), same_group=fold[:, None] == fold[None, :])
    (s,) = report.scores
    assert s.knn_top1 == pytest.approx(np.mean([t in r for t, r in zip(yy, top1, strict=True)]))
    assert s.n_test == use.sum() and len(s.folds["knn_top1"]) == 5
    assert json.load(open(uri + "/_eval/eval.json"))["folds"]["folds"] == 5


def test_a_delta_index_scores_like_the_parquet_output(digits_out, tmp_path):
    from vitflow.analysis.evaluate import evaluate

    rows, uri = digits_out
    index = write_delta(tmp_path / "index", rows)
    a = evaluate(uri, feature="proj", c_grid=(1.0,), write=False)
    b = evaluate(index, feature="proj", c_grid=(1.0,))
    assert b.scores[0].to_json() | {"spec": None} == a.scores[0].to_json() | {"spec": None}
    assert b.scores[0].spec["pool"] == "mean"  # from the index's stored job
    assert (tmp_path / "index" / "_eval" / "eval.json").exists()


def test_eval_refusals_are_one_sentence(digits_out, tmp_path, monkeypatch):
    from vitflow.analysis.evaluate import evaluate

    _, uri = digits_out
    with pytest.raises(VitflowError, match="no rows of split 'nope'"):
        evaluate(uri, test_split="nope", write=False)
    with pytest.raises(VitflowError, match="feature 'cls' is not in"):
        evaluate(uri, feature="cls", write=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    with pytest.raises(VitflowError, match=r"pip install 'vitflow\[analysis\]'"):
        evaluate(uri, write=False)


def test_cli_prints_the_leaderboard(digits_out, tmp_path):
    from typer.testing import CliRunner

    from vitflow.cli import app

    _, uri = digits_out
    r = CliRunner().invoke(app, ["eval", uri, "--feature", "proj", "--k", "5"])
    assert r.exit_code == 0, r.output
    assert "k=5" in r.output and "proj" in r.output and "_eval/eval.json" in r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no embeddings at" in r.output
