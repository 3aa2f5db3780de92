"""`vitflow dedup`: near-duplicate groups against a brute-force numpy reference (the whole
cosine matrix, connected components by scipy), planted duplicates found, the exact and index
paths agreeing, and small blocks (bounded memory) giving the same groups.

The output is scikit-learn's digits (their 64 pixels as the vectors) with planted copies of a
few digits, each with a little noise, shuffled among them so a copy and its original lie in
different parts and blocks; written in the documented layout by hand (no Ray, no model).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.test_eval import write_delta, write_output
from vitflow import columns
from vitflow.errors import VitflowError

pytestmark = pytest.mark.timeout(120)

THRESHOLD = 0.97  # digits alone form chained groups here; the copies join their originals
PLANTED = 8


def planted_rows(n=500, seed=0):
    """``n`` digits plus :data:`PLANTED` noisy copies of some of them, shuffled; one error
    row. Returns the rows and the planted ``(original id, copy id)`` pairs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    x = d.data[:n].astype(np.float32)
    y = d.target[:n]
    originals = rng.choice(n, PLANTED, replace=False)
    copies = x[originals] + rng.normal(0, 0.05, (PLANTED, 64)).astype(np.float32)
    x = np.concatenate([x, copies])
    y = np.concatenate([y, y[originals]])
    names = [f"{i:04d}.png" for i in range(n)] + [f"{i:04d}-copy.png" for i in originals]
    order = rng.permutation(len(x))
    ids = [hashlib.sha256(names[i].encode()).hexdigest()[:16] for i in order]
    m = len(order)
    rows = {
        columns.ID: ids,
        columns.PATH: [f"/images/{y[i]}/{names[i]}" for i in order],
        columns.LABEL: [str(y[i]) for i in order],
        columns.SPLIT: ["train"] * m,
        columns.STATUS: ["ok"] * m,
        columns.ERROR: [None] * m,
        "pix": x[order],
    }
    planted = {
        (
            hashlib.sha256(f"{i:04d}.png".encode()).hexdigest()[:16],
            hashlib.sha256(f"{i:04d}-copy.png".encode()).hexdigest()[:16],
        )
        for i in originals
    }
    # an error row (its vector is null) that is none of the planted rows
    bad = next(j for j in range(m) if not any(ids[j] in p for p in planted))
    rows[columns.STATUS][bad] = "error"
    rows[columns.ERROR][bad] = "cannot identify image file"
    return rows, planted


def reference_groups(rows, threshold):
    """Brute force: the whole cosine matrix of the ok rows, pairs at or above ``threshold``,
    connected components (scipy). Returns ``[(ids, similarities to the first member)]`` for
    the groups of two or more in order of their first member (storage order), and the
    smallest distance of any pair's similarity from the threshold."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ok = np.asarray(rows[columns.STATUS]) == "ok"
    x = rows["pix"][ok].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.asarray(rows[columns.ID], object)[ok]
    sim = x @ x.T
    i, j = np.triu_indices(len(x), 1)
    pair = sim[i, j] >= threshold
    graph = coo_matrix((np.ones(pair.sum()), (i[pair], j[pair])), shape=sim.shape)
    _, comp = connected_components(graph, directed=False)
    groups = []
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)  # storage order
        if len(members) >= 2:
            groups.append((ids[members].tolist(), sim[members[0], members].tolist()))
    groups.sort(key=lambda g: rows[columns.ID].index(g[0][0]))
    return groups, float(np.abs(sim[i, j] - threshold).min())


def written_groups(uri):
    """``groups.parquet`` as ``[(ids, similarities)]`` per group, checking its layout."""
    table = pq.read_table(f"{uri}/_dedup/groups.parquet")
    assert table.column_names == ["id", "group", "similarity"]
    group = table.column("group").to_numpy()
    assert np.all(np.diff(group) >= 0) and (len(group) == 0 or group[0] == 0)
    assert np.array_equal(np.unique(group), np.arange(len(np.unique(group))))  # 0, 1, ...
    ids = table.column("id").to_pylist()
    sims = table.column("similarity").to_numpy()
    return [(list(np.asarray(ids, object)[group == g]), sims[group == g]) for g in np.unique(group)]


def assert_same_groups(found, want):
    assert [g[0] for g in found] == [g[0] for g in want]
    for (_, sims), (_, want_sims) in zip(found, want, strict=True):
        assert sims[0] == 1.0  # the first member, itself
        assert sims == pytest.approx(want_sims, abs=1e-5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rows, pairs = planted_rows()
    want, margin = reference_groups(rows, THRESHOLD)
    # no pair so close to the threshold that float32 and float64 could disagree on it
    assert margin > 1e-5
    return rows, pairs, want


def fresh(tmp_path, rows, parts=4):
    return write_output(tmp_path / "out", rows, parts=parts)


def test_exact_groups_equal_brute_force_and_find_the_planted_copies(planted, tmp_path):
    from vitflow.analysis.dedup import find_duplicates

    rows, pairs, want = planted
    uri = fresh(tmp_path, rows)
    result = find_duplicates(uri, threshold=THRESHOLD, method="exact")
    assert result.method == "exact blocked products"
    assert result.rows == len(rows[columns.ID]) - 1  # the error row is not compared
    found = written_groups(uri)
    assert_same_groups(found, want)
    assert result.groups == len(want) and result.members == sum(len(g[0]) for g in want)
    assert result.largest == sorted((len(g[0]) for g in want), reverse=True)[:5]
    # every planted copy is in its original's group
    group_of = {i: n for n, (ids, _) in enumerate(found) for i in ids}
    for original, copy in pairs:
        assert original in group_of and group_of[original] == group_of.get(copy), original
    # chained groups exist, so "similarity to the first member" is tested below the threshold
    assert any(min(s) < THRESHOLD for _, s in found)
    info = json.load(open(f"{uri}/_dedup/groups.json"))
    assert info["threshold"] == THRESHOLD and info["feature"] == "pix"
    assert info["groups"] == len(want) and info["rows"] == result.rows


@pytest.mark.parametrize("block_rows, batch_rows", [(37, 23), (128, 500), (1000, 7)])
def test_small_blocks_give_the_same_groups(planted, tmp_path, block_rows, batch_rows):
    """Blocks of 37 rows meeting batches of 23 (many passes, blocks spanning parts and
    batches), or one block and tiny batches: the same groups as all rows at once."""
    from vitflow.analysis.dedup import find_duplicates

    rows, _, want = planted
    uri = fresh(tmp_path, rows, parts=3)
    find_duplicates(
        uri, threshold=THRESHOLD, method="exact", block_rows=block_rows, batch_rows=batch_rows
    )
    assert_same_groups(written_groups(uri), want)


def test_index_paths_agree_with_exact(planted, tmp_path):
    """The flat index's range search, and an IVF index visiting every list, give exactly the
    exact method's groups; an IVF index at its chosen nprobe still finds the planted copies."""
    pytest.importorskip("faiss")
    from vitflow.analysis.dedup import find_duplicates
    from vitflow.analysis.search import build_index

    rows, pairs, want = planted
    uri = fresh(tmp_path, rows)
    with pytest.raises(VitflowError, match="no index of 'pix'.*vitflow index"):
        find_duplicates(uri, threshold=THRESHOLD, method="index")
    build_index(uri, feature="pix", kind="flat")
    result = find_duplicates(uri, threshold=THRESHOLD)  # auto: the index, as it is built
    assert result.method == "flat index range search"
    assert_same_groups(written_groups(uri), want)

    meta = build_index(uri, feature="pix", kind="ivf", nlist=8, nprobe=8, recall_queries=50)
    assert meta["nprobe"] == meta["nlist"] == 8
    result = find_duplicates(uri, threshold=THRESHOLD, method="index", batch_rows=50)
    assert result.method == "ivf index range search, nprobe 8"
    assert_same_groups(written_groups(uri), want)

    meta = build_index(uri, feature="pix", kind="ivf", nlist=8, recall_queries=100)
    find_duplicates(uri, threshold=THRESHOLD, method="index")
    found = {i: n for n, (ids, _) in enumerate(written_groups(uri)) for i in ids}
    for original, copy in pairs:
        assert original in found and found[original] == found.get(copy), (original, meta)


def test_delta_index_gives_the_same_groups(planted, tmp_path):
    from vitflow.analysis.dedup import find_duplicates

    rows, _, want = planted
    uri = write_delta(tmp_path / "delta", {k: v for k, v in rows.items()}, files=3)
    result = find_duplicates(uri, threshold=THRESHOLD, block_rows=100)
    # a Delta snapshot's files need not come back in the order they were written: compare
    # the groups as sets, and each group's similarities against its own first member
    got = written_groups(uri)
    assert {frozenset(g[0]) for g in got} == {frozenset(g[0]) for g in want}
    assert result.groups == len(want)
    ok = np.asarray(rows[columns.STATUS]) == "ok"
    vec = dict(zip(np.asarray(rows[columns.ID], object)[ok], rows["pix"][ok], strict=True))
    for ids, sims in got:
        x = np.stack([vec[i] for i in ids]).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        assert sims == pytest.approx(x @ x[0], abs=1e-5)


def test_no_duplicates_and_bad_arguments(planted, tmp_path):
    from vitflow.analysis.dedup import find_duplicates

    rows, _, _ = planted
    uri = fresh(tmp_path, rows, parts=2)
    result = find_duplicates(uri, threshold=1.0, method="exact")
    # the noisy copies are not identical: at 1.0 nothing is a duplicate, and the file says so
    assert result.groups == 0 and pq.read_table(f"{uri}/_dedup/groups.parquet").num_rows == 0
    with pytest.raises(VitflowError, match="threshold is a cosine similarity"):
        find_duplicates(uri, threshold=1.5)
    with pytest.raises(VitflowError, match="method must be auto, exact or index"):
        find_duplicates(uri, method="fast")
    with pytest.raises(VitflowError, match="feature 'emb' is not in"):
        find_duplicates(uri, feature="emb")
