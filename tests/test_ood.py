"""The embedding-space out-of-distribution score (vitflow.analysis.ood) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_eval import write_output
from vitflow import columns
from vitflow.analysis.ood import knn_distance, summarize
from vitflow.analysis.source import open_source


def rows(n, dim, seed, shift=0.0, bad=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) + shift
    status = np.array(["error" if i in bad else "ok" for i in range(n)], dtype=object)
    return {
        columns.ID: [f"{seed}-{i}" for i in range(n)],
        columns.PATH: [f"/d/{seed}/{i}.jpg" for i in range(n)],
        columns.LABEL: [None] * n,
        columns.SPLIT: ["train" if i % 3 else "val" for i in range(n)],
        columns.STATUS: list(status),
        columns.ERROR: [("broken" if s == "error" else None) for s in status],
        "emb": x,
    }


def by_hand(ref, query, k, same=False):
    """Full cosine matrix; each query row's k largest similarities; 1 - their mean."""
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = q @ a.T
    if same:
        np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :k]
    return 1 - top.mean(axis=1)


@pytest.mark.parametrize("query_rows", [7, 4096])
def test_knn_distance_equals_the_full_matrix(tmp_path, query_rows):
    ref_rows, q_rows = rows(50, 6, seed=1, bad={3, 40}), rows(23, 6, seed=2, bad={5})
    ref = open_source(write_output(tmp_path / "ref", ref_rows, parts=3))
    query = open_source(write_output(tmp_path / "q", q_rows, parts=2))
    got = knn_distance(ref, query, "emb", k=5, query_rows=query_rows)
    ok_ref = ref_rows["emb"][[s == "ok" for s in ref_rows[columns.STATUS]]]
    keep = [s == "ok" for s in q_rows[columns.STATUS]]
    assert got.column(columns.ID).to_pylist() == list(np.array(q_rows[columns.ID])[keep])
    np.testing.assert_allclose(
        got.column("ood_knn").to_numpy(), by_hand(ok_ref, q_rows["emb"][keep], 5), rtol=1e-5
    )


def test_against_itself_a_row_is_never_its_own_neighbour(tmp_path):
    r = rows(30, 4, seed=3)
    src = open_source(write_output(tmp_path / "a", r, parts=2))
    got = knn_distance(src, src, "emb", k=3, same=True, query_rows=8)
    np.testing.assert_allclose(
        got.column("ood_knn").to_numpy(), by_hand(r["emb"], r["emb"], 3, same=True), rtol=1e-5
    )
    assert got.column("ood_knn").to_numpy().min() > 1e-3  # self would have scored 0


def test_a_shifted_collection_scores_further_and_the_summary_is_its_statistics(tmp_path):
    ref = open_source(write_output(tmp_path / "ref", rows(80, 8, seed=4, shift=1.0)))
    near = open_source(write_output(tmp_path / "near", rows(40, 8, seed=5, shift=1.0)))
    far = open_source(write_output(tmp_path / "far", rows(40, 8, seed=6, shift=-1.0)))
    scores = {
        name: knn_distance(ref, src, "emb", k=5).column("ood_knn").to_numpy()
        for name, src in (("near", near), ("far", far))
    }
    table = summarize(scores).to_pylist()
    assert [r["dataset"] for r in table] == ["near", "far"]
    assert table[0]["mean"] < table[1]["mean"]
    for r in table:
        v = scores[r["dataset"]]
        assert r["n"] == len(v)
        np.testing.assert_allclose(
            [r["mean"], r["median"], r["std"], r["p10"], r["p90"]],
            [v.mean(), np.median(v), v.std(), np.percentile(v, 10), np.percentile(v, 90)],
            rtol=1e-6,
        )


def test_a_feature_of_another_width_is_refused(tmp_path):
    a = open_source(write_output(tmp_path / "a", rows(5, 4, seed=7)))
    b = open_source(write_output(tmp_path / "b", rows(5, 6, seed=8)))
    with pytest.raises(ValueError, match="same model and feature"):
        knn_distance(a, b, "emb")


def test_a_non_finite_vector_is_never_a_neighbour_and_scores_nan(tmp_path):
    ref_rows, q_rows = rows(20, 4, seed=9), rows(6, 4, seed=10)
    ref_rows["emb"][2] = np.nan  # would sort as the nearest of every query
    q_rows["emb"][1] = np.nan
    ref = open_source(write_output(tmp_path / "ref", ref_rows))
    got = knn_distance(ref, open_source(write_output(tmp_path / "q", q_rows)), "emb", k=3)
    scores = got.column("ood_knn").to_numpy()
    assert np.isnan(scores[1]) and np.isfinite(np.delete(scores, 1)).all()
    finite_ref = np.delete(ref_rows["emb"], 2, axis=0)
    np.testing.assert_allclose(
        np.delete(scores, 1), by_hand(finite_ref, np.delete(q_rows["emb"], 1, axis=0), 3), rtol=1e-5
    )
