"""``vitflow reindex`` on a local Ray: a corpus that changes between runs -> a Delta table that
always equals a fresh build of the current corpus, changed by one commit per run, readable by
deltalake, polars and duckdb."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from tests.conftest import TINY
from vitflow import columns
from vitflow.config import load_config
from vitflow.errors import ConfigError, VitflowError
from vitflow.index_table import (
    STATE_SCHEMA,
    delta_storage_options,
    diff_listing,
    read_index,
    stored_job,
)
from vitflow.ledger import Ledger
from vitflow.reindex import (
    ReindexResult,
    StagedChange,
    commit_reindex,
    load_index,
    plan_reindex,
    run_reindex,
    stage_reindex,
)
from vitflow.synthetic import make_image_folder, synthetic_image

NAME, KW = TINY["vit"]
EMB = {"name": "emb", "layers": 2, "pool": "mean"}
CLS = {"name": "cls", "layers": [-1], "pool": "cls", "norm": True}


@pytest.fixture(scope="module")
def base_corpus(tmp_path_factory):
    """12 images in train/val x cat/dog/fox plus the 5 kinds of bad file: 17 listed files."""
    root = tmp_path_factory.mktemp("base") / "images"
    make_image_folder(root, per_class=2, size=(40, 30), with_bad_files=True)
    return root


def job(src: Path, out: Path, features=(EMB,)):
    return load_config(
        base={
            "source": {"uri": str(src)},
            "model": {"name": NAME, "kwargs": KW, "weights": "random"},  # seeded: same every run
            "features": list(features),
            # 5 rows a data file: 17 files make 4 data files, so a change touches only some.
            "output": {"uri": str(out), "rows_per_file": 5},
            "compute": {"batch_size": 4},
        }
    )


def copy_corpus(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)  # copy2 keeps mtimes: every copy indexes alike
    return dest


def change_corpus(src: Path) -> None:
    """Add 2 files, rewrite 1 with other content, delete 1."""
    rng = np.random.default_rng(7)
    for i in range(2):
        synthetic_image(rng, (40, 30), hue=5 + i).save(src / "val" / "dog" / f"new{i}.jpg")
    synthetic_image(rng, (40, 30), hue=9).save(src / "train" / "cat" / "000.jpg", "JPEG")
    (src / "val" / "fox" / "001.jpg").unlink()


def rows_by_id(uri: Path) -> dict[str, dict]:
    table = DeltaTable(str(uri)).to_pyarrow_table()
    ids = table.column(columns.ID).to_pylist()
    assert len(ids) == len(set(ids)), "an id is stored twice"
    return dict(zip(ids, table.to_pylist(), strict=True))


def assert_same_index(a: Path, b: Path, vectors=("emb",), same_source=True) -> None:
    """Same rows; ``same_source=False``: indexes of two copies of a corpus (ids are relative
    paths, so they agree; paths and mtimes do not)."""
    ra, rb = rows_by_id(a), rows_by_id(b)
    assert ra.keys() == rb.keys()
    compared = (columns.LABEL, columns.SPLIT, columns.STATUS)
    if same_source:
        compared += (columns.PATH, "size", "mtime")
    for id_, row in ra.items():
        other = rb[id_]
        for c in compared:
            assert row[c] == other[c], (id_, c)
        for v in vectors:
            if row[columns.STATUS] == columns.STATUS_OK:
                np.testing.assert_allclose(row[v], other[v], rtol=1e-5, atol=1e-6)
            else:
                assert row[v] is None and other[v] is None


def log_actions(uri: Path, version: int) -> dict[str, list]:
    out: dict[str, list] = {}
    path = uri / "_delta_log" / f"{version:020d}.json"
    for line in path.read_text().splitlines():
        ((kind, action),) = json.loads(line).items()
        out.setdefault(kind, []).append(action)
    return out


# --- diff and helpers: no Ray ---


def _state(rows):
    return pa.Table.from_pylist(
        [dict(zip(STATE_SCHEMA.names, r, strict=True)) for r in rows], schema=STATE_SCHEMA
    )


def test_diff_listing_counts_and_stale_files():
    listing = pa.table(
        {
            columns.ID: ["a", "b", "c", "e", "f"],
            columns.PATH: ["/s/a", "/s/b", "/s/c", "/s/e", "/s/f"],
            "size": [1, 2, 3, 5, 6],
            "mtime": ["1", "2", "3", "5", "6"],
        }
    )
    state = _state(
        [
            ("a", "/s/a", 1, "1", "f1"),  # unchanged
            ("b", "/s/b", 2, "9", "f1"),  # mtime changed -> updated
            ("c", "/s/c", 30, "3", "f2"),  # size changed -> updated
            ("d", "/s/d", 4, "4", "f2"),  # not listed -> deleted
            ("f", "/s/f", 6, "6", "f2"),  # stored twice -> re-embedded once
            ("f", "/s/f", 6, "6", "f3"),
        ]
    )
    todo, stale, counts = diff_listing(Ledger.from_table(listing), Ledger.from_table(state))
    assert todo.read().to_pylist() == listing.slice(1).to_pylist()  # b, c, e, f in order
    assert counts == {"added": 1, "updated": 3, "deleted": 1, "unchanged": 1}
    assert stale == {"f1": {"b"}, "f2": {"c", "d", "f"}, "f3": {"f"}}


def test_summary_json_has_exactly_the_scheduler_keys():
    line = ReindexResult(2, 1, 1, 15, 0, 1.23456, 3, embedded=3).summary_json()
    assert "\n" not in line
    assert json.loads(line) == {
        "added": 2, "updated": 1, "deleted": 1, "unchanged": 15, "errors": 0,
        "seconds": 1.235, "version": 3,
    }  # fmt: skip


def test_delta_storage_options_from_storage_block(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")  # left to deltalake, never copied
    opts = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    assert delta_storage_options("s3://bucket/index", opts) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "eu-west-1",
    }
    assert delta_storage_options("s3://b/i", {"anon": True})["AWS_SKIP_SIGNATURE"] == "true"
    assert delta_storage_options("/local/index", opts) == {}


# --- end to end on Ray ---


@pytest.fixture(scope="module")
def changed_index(base_corpus, tmp_path_factory, ray_local):
    """Build, change the corpus, reindex; and a fresh build of the changed corpus."""
    tmp = tmp_path_factory.mktemp("changed")
    src = copy_corpus(base_corpus, tmp / "images")
    first = run_reindex(job(src, tmp / "index"))
    before = {a["path"] for a in log_actions(tmp / "index", 0)["add"]}
    change_corpus(src)
    second = run_reindex(job(src, tmp / "index"))
    fresh = run_reindex(job(src, tmp / "fresh"))
    return tmp, first, second, fresh, before


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_reindex_equals_a_fresh_build_and_embeds_only_the_changes(changed_index):
    tmp, first, second, fresh, _ = changed_index
    assert (first.added, first.embedded, first.errors, first.version) == (17, 17, 5, 0)
    counts = (second.added, second.updated, second.deleted, second.unchanged)
    assert counts == (2, 1, 1, 15)
    assert second.embedded == 3 and second.errors == 0 and second.version == 1
    assert fresh.added == 18
    assert_same_index(tmp / "index", tmp / "fresh")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_one_commit_rewrites_only_the_files_with_stale_rows(changed_index):
    tmp, *_, before = changed_index
    actions = log_actions(tmp / "index", 1)
    removed = {a["path"] for a in actions["remove"]}
    assert 1 <= len(removed) <= 2  # the files that held the rewritten and the deleted image
    assert removed < before
    live = set(pa.table(DeltaTable(str(tmp / "index")).get_add_actions())["path"].to_pylist())
    assert before - removed <= live  # untouched files stay as they were
    (txn,) = actions["txn"]
    assert txn["appId"].startswith("vitflow.reindex.") and txn["version"] == 1
    assert actions["commitInfo"][0]["vitflow.counts"]["embedded"] == 3


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_nothing_changed_means_no_ray_work_and_no_commit(changed_index, monkeypatch):
    tmp, *_ = changed_index
    src, index = tmp / "images", tmp / "index"
    import vitflow.engine as engine

    def no_ray(*a, **k):
        raise AssertionError("a run with nothing to do started Ray work")

    monkeypatch.setattr(engine, "ray_session", no_ray)
    logs = sorted((index / "_delta_log").iterdir())
    result = run_reindex(job(src, index))
    assert (result.added, result.updated, result.deleted, result.embedded) == (0, 0, 0, 0)
    assert result.unchanged == 18 and result.version == 1
    assert sorted((index / "_delta_log").iterdir()) == logs


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_readers_see_the_same_snapshot(changed_index):
    import duckdb
    import polars as pl

    tmp, *_ = changed_index
    uri = str(tmp / "index")
    df = load_index(uri, include_errors=True)
    expected = rows_by_id(tmp / "index")
    assert sorted(df[columns.ID]) == sorted(expected)
    assert len(load_index(uri)) == sum(r["status"] == "ok" for r in expected.values())
    assert len(load_index(uri, split="val")) == sum(
        r["status"] == "ok" and r["split"] == "val" for r in expected.values()
    )
    polars_df = pl.read_delta(uri)
    assert sorted(polars_df[columns.ID].to_list()) == sorted(expected)
    files = DeltaTable(uri).file_uris()
    duck = duckdb.sql(f"select id, emb from read_parquet({files!r})").fetchall()
    assert sorted(i for i, _ in duck) == sorted(expected)
    for id_, emb in duck:
        want = expected[id_]["emb"]
        assert (emb is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(emb, want, rtol=1e-6)
            ok = df[df[columns.ID] == id_]["emb"].iloc[0]
            np.testing.assert_allclose(ok, want, rtol=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_changed_features_need_rebuild_which_replaces_the_table(base_corpus, tmp_path, ray_local):
    src, index = copy_corpus(base_corpus, tmp_path / "images"), tmp_path / "index"
    run_reindex(job(src, index))
    with pytest.raises(ConfigError, match=r"feature spec \(added: cls\).*--rebuild"):
        run_reindex(job(src, index, features=(EMB, CLS)))
    assert DeltaTable(str(index)).version() == 0
    result = run_reindex(job(src, index, features=(EMB, CLS)), rebuild=True)
    assert (result.updated, result.embedded, result.version) == (17, 17, 1)
    dt = DeltaTable(str(index))
    assert "cls" in dt.schema().to_arrow().names
    assert stored_job(dt)[1]["features"][1]["name"] == "cls"
    assert log_actions(index, 1)["commitInfo"][0]["vitflow.operation"] == "rebuild"
    assert len(rows_by_id(index)) == 17
    df = load_index(str(index), feature="cls")
    assert df["cls"].map(len).eq(32).all() and "emb" not in df
    assert read_index(str(index), feature="cls").schema.field("cls").type.list_size == 32
    # The rebuilt table carries the new job: the next run is a no-op, not a refusal.
    assert run_reindex(job(src, index, features=(EMB, CLS))).version == 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_runs_from_one_snapshot_commit_exactly_once(
    base_corpus, tmp_path, changed_index, ray_local
):
    src, index = copy_corpus(base_corpus, tmp_path / "images"), tmp_path / "index"
    # First build: both plan "no table yet"; the second create is refused. (Its refusal
    # does not depend on its data files, so it stages none: one Ray run less.)
    p1, p2 = plan_reindex(job(src, index)), plan_reindex(job(src, index))
    assert commit_reindex(p1, stage_reindex(p1)) == 0
    with pytest.raises(VitflowError, match="another reindex committed"):
        commit_reindex(p2, StagedChange(adds=[], removes=[], embedded=0, errors=0))
    # Incremental: both plan on version 0 (adds + removes); the second commit is refused.
    change_corpus(src)
    p1, p2 = plan_reindex(job(src, index)), plan_reindex(job(src, index))
    s1, s2 = stage_reindex(p1), stage_reindex(p2)
    assert commit_reindex(p1, s1) == 1
    with pytest.raises(VitflowError, match="another reindex committed"):
        commit_reindex(p2, s2)
    assert not list(index.glob(f"part-{p2.run_id}-*"))  # the loser tidied its files
    # Committing the same staged change again is a no-op (app transaction already logged).
    assert commit_reindex(p1, s1) == 1
    assert DeltaTable(str(index)).version() == 1
    assert_same_index(index, changed_index[0] / "fresh", same_source=False)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_run_killed_before_its_commit_changes_nothing(
    base_corpus, tmp_path, changed_index, ray_local
):
    src, index = copy_corpus(base_corpus, tmp_path / "images"), tmp_path / "index"
    run_reindex(job(src, index))
    before = rows_by_id(index)
    change_corpus(src)
    plan = plan_reindex(job(src, index))
    stage_reindex(plan)  # data files written ... and the run dies before commit_reindex
    dt = DeltaTable(str(index))
    assert dt.version() == 0
    assert len(list(index.glob("*.parquet"))) > len(dt.file_uris())  # orphans on disk
    assert rows_by_id(index).keys() == before.keys()
    assert len(load_index(str(index), include_errors=True)) == 17
    result = run_reindex(job(src, index))
    assert (result.added, result.updated, result.deleted, result.version) == (2, 1, 1, 1)
    assert_same_index(index, changed_index[0] / "fresh", same_source=False)


def test_refuses_an_output_that_is_not_a_delta_table(base_corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="no Delta table"):
        plan_reindex(job(base_corpus, tmp_path / "out"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_index_readers_give_the_embed_outputs_vector_type(changed_index, ray_local):
    """Delta's protocol has only variable-length arrays, so the files hold list<float32> with
    the width in the field's metadata; every vitflow reader gives fixed_size_list[D], exactly
    the parquet output's type, and polars gets Array(Float32, D) with the README's recipe."""
    import polars as pl
    import pyarrow.parquet as pq

    from vitflow.embed import run_embed
    from vitflow.index_table import read_index
    from vitflow.loading import load_embeddings

    tmp, *_ = changed_index
    uri = str(tmp / "index")
    table = read_index(uri, include_errors=True)
    # The same job as an embed output: its parquet parts are the reference type.
    run_embed(job(tmp / "images", tmp / "as-embed"))
    written_by_embed = pq.read_schema(next((tmp / "as-embed").glob("part-*.parquet")))
    dims = {f.name: f.type.list_size for f in table.schema if pa.types.is_fixed_size_list(f.type)}
    assert set(dims) == {EMB["name"]}
    for name in dims:
        assert table.schema.field(name).type == written_by_embed.field(name).type
    df = load_embeddings(uri)
    assert all(len(v) == dims["emb"] for v in df["emb"])
    recipe = pl.read_delta(uri).with_columns(pl.col("emb").list.to_array(dims["emb"]))
    assert recipe.schema["emb"] == pl.Array(pl.Float32, dims["emb"])
