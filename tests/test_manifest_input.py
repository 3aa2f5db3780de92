"""A source that is a list of files (parquet, CSV or text: an S3 Inventory export, a team's
own list) instead of a folder: read in pieces, ids and labels as a folder listing gives
them, every named file accounted for."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.errors import ConfigError
from vitflow.sources import list_images
from vitflow.synthetic import make_image_folder


@pytest.fixture()
def folder(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    return tmp_path / "imgs"


def rel_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg") if p.is_file())


def test_a_text_list_in_the_root_lists_as_the_folder_does(folder):
    (folder / "files.txt").write_text(
        "# my list\n" + "\n".join(rel_files(folder)) + "\nnotes.txt\n"
    )
    by_list = list_images(SourceConfig(uri=str(folder / "files.txt"))).table
    by_folder = list_images(SourceConfig(uri=str(folder))).table
    for col in (columns.ID, columns.PATH, "relpath", columns.LABEL, columns.SPLIT):
        assert by_list[col].to_pylist() == by_folder[col].to_pylist(), col
    listing = list_images(SourceConfig(uri=str(folder / "files.txt")))
    assert listing.skipped.by_extension == {".txt": 1}


def test_parquet_and_csv_lists_bring_their_own_labels_and_splits(folder, tmp_path):
    files = rel_files(folder)
    table = pa.table(
        {
            "key": [str(folder / f) for f in files],  # absolute paths
            "label": [f"L{i % 3}" for i in range(len(files))],
            "split": ["holdout"] * len(files),
            "size": list(range(len(files))),
        }
    )
    pq.write_table(table, tmp_path / "inventory.parquet", row_group_size=3)
    pacsv.write_csv(table, tmp_path / "inventory.csv")
    for name in ("inventory.parquet", "inventory.csv"):
        t = list_images(SourceConfig(uri=str(tmp_path / name))).table
        assert t.num_rows == len(files)
        got = dict(zip(t[columns.PATH].to_pylist(), t[columns.LABEL].to_pylist(), strict=True))
        assert got == dict(zip(table["key"].to_pylist(), table["label"].to_pylist(), strict=True))
        assert set(t[columns.SPLIT].to_pylist()) == {"holdout"}


def test_a_list_without_a_path_column_or_with_a_file_twice_is_refused(tmp_path):
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="no path column.*one of path, uri"):
        list_images(SourceConfig(uri=str(tmp_path / "bad.parquet")))
    (tmp_path / "twice.txt").write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(ConfigError, match="names 'a.jpg' more than once"):
        list_images(SourceConfig(uri=str(tmp_path / "twice.txt")))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_embed_from_a_list_accounts_for_a_missing_file(folder, tmp_path, ray_local):
    from vitflow.config import load_config
    from vitflow.embed import run_embed
    from vitflow.loading import load_embeddings

    files = rel_files(folder)[:4] + ["train/cat/not-there.jpg"]
    (folder / "some.txt").write_text("\n".join(files))
    cfg = load_config(
        base={
            "source": {"uri": str(folder / "some.txt")},
            "model": {"name": "resnet18", "weights": "random"},
            "output": {"uri": str(tmp_path / "out")},
            "compute": {"batch_size": 4},
        }
    )
    res = run_embed(cfg)
    assert (res.listed, res.ok, res.error) == (5, 4, 1)
    df = load_embeddings(str(tmp_path / "out"), include_errors=True)
    missing = df[df[columns.PATH].str.endswith("not-there.jpg")]
    assert list(missing[columns.STATUS]) == ["error"]
    assert "FileNotFoundError" in missing[columns.ERROR].iloc[0]
