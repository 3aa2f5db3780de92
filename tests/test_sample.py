"""`vitflow.sample_embeddings`: the same seed gives the same rows whatever the sharding (1
part, 7 parts, a Delta index); other seeds give other rows; stratified samples follow the
label shares exactly as documented."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_eval import digits_rows, write_delta, write_output
from vitflow import columns


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    rows = digits_rows(per_class=40)
    root = tmp_path_factory.mktemp("sample")
    return (
        rows,
        write_output(root / "one", rows, parts=1),
        write_output(root / "seven", rows, parts=7),
        write_delta(root / "index", rows, files=4),
    )


def _ids(df):
    return list(df[columns.ID])


def test_same_seed_same_rows_whatever_the_sharding(outs):
    from vitflow import sample_embeddings

    rows, one, seven, index = outs
    a = sample_embeddings(one, 25, seed=7)
    b = sample_embeddings(seven, 25, seed=7)
    c = sample_embeddings(index, 25, seed=7)
    assert len(a) == 25 and _ids(a) == _ids(b) == _ids(c)
    np.testing.assert_array_equal(np.stack(a["pix"]), np.stack(b["pix"]))
    np.testing.assert_array_equal(np.stack(a["proj"]), np.stack(c["proj"]))
    # the rows really are those ids' rows, with their metadata
    at = {i: k for k, i in enumerate(rows[columns.ID])}
    for _, r in a.iterrows():
        k = at[r[columns.ID]]
        assert r[columns.PATH] == rows[columns.PATH][k]
        np.testing.assert_array_equal(r["pix"], rows["pix"][k])
    assert (a[columns.STATUS] == "ok").all()

    other = sample_embeddings(seven, 25, seed=8)
    assert len(set(_ids(other)) & set(_ids(a))) < 12  # an unrelated draw (expected ~1.6)
    # a larger sample extends the smaller one: the same ranking
    assert _ids(sample_embeddings(seven, 60, seed=7))[:25] == _ids(a)


def test_filters_feature_and_more_than_there_is(outs):
    from vitflow import sample_embeddings

    rows, one, seven, _ = outs
    val = sample_embeddings(seven, 10, seed=1, split="val", feature="proj")
    assert set(val[columns.SPLIT]) == {"val"} and "pix" not in val.columns
    assert _ids(val) == _ids(sample_embeddings(one, 10, seed=1, split="val", feature="proj"))
    everything = sample_embeddings(seven, 10_000, seed=1)
    assert len(everything) == sum(s == "ok" for s in rows[columns.STATUS])
    assert len(sample_embeddings(one, 0, seed=1)) == 0


def test_stratified_sample_is_proportional_and_shard_free(outs):
    from vitflow import sample_embeddings
    from vitflow.analysis.sample import proportional_quotas

    rows, one, seven, index = outs
    a = sample_embeddings(seven, 33, seed=2, stratify=True)
    assert _ids(a) == _ids(sample_embeddings(one, 33, seed=2, stratify=True))
    assert _ids(a) == _ids(sample_embeddings(index, 33, seed=2, stratify=True))
    ok = [
        lab for lab, s in zip(rows[columns.LABEL], rows[columns.STATUS], strict=True) if s == "ok"
    ]
    counts = {lab: ok.count(lab) for lab in set(ok)}
    quotas = proportional_quotas(counts, 33)
    got = a[columns.LABEL].astype(object).where(a[columns.LABEL].notna(), None)
    assert {lab: list(got).count(lab) for lab in counts} == quotas
    # 400 rows, 10 classes of ~40 plus one row without a label: 33 -> 3 or 4 per class
    assert sum(quotas.values()) == 33 and set(quotas.values()) <= {0, 3, 4}
    assert quotas[None] == 0


def test_proportional_quotas_by_largest_remainder():
    from vitflow.analysis.sample import proportional_quotas

    assert proportional_quotas({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    # 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4: floors 3, 2, 1; the 1 seat left goes to a (0.5)
    assert proportional_quotas({"a": 5, "b": 3, "c": 2}, 7) == {"a": 4, "b": 2, "c": 1}
    # equal remainders: the larger group, then the name
    assert proportional_quotas({"b": 1, "a": 1, "c": 2}, 2) == {"a": 1, "b": 0, "c": 1}
    assert proportional_quotas({"a": 2, "b": 1}, 5) == {"a": 2, "b": 1}
