"""One file must never stop the job (issue 9): a name that is not UTF-8, symlinks that leave
the source, broken links, folder symlinks and loops each get a row or a count, never a crash,
and nothing outside the source is read unless ``source.follow_symlinks`` says so."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import TINY
from vitflow import columns
from vitflow.config import SourceConfig, load_config
from vitflow.sources import BROKEN_LINK, OUTSIDE_LINK, image_id, list_images

NAME, KW = TINY["vit"]
# Secret-looking text; a decoder error quotes a file's first 8 bytes, so those are checked too.
SECRET = b"s3cr3t-7d1e root:x:0:0:hunter2"
LATIN1 = b"cat/caf\xe9.jpg"


def jpeg(color=(200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), color, dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write(path: Path | bytes, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def odd_tree(base: Path) -> Path:
    """``base/src``, the source, next to ``base/outside`` that it links into::

    src/cat/a.jpg                 a real JPEG
    src/cat/caf<0xE9>.jpg         a real JPEG whose name is Latin-1, not UTF-8
    src/cat/inside.jpg  -> a.jpg  a file link inside the source
    src/cat/leak.jpg    -> ../../outside/secret.jpg   secret text outside the source
    src/cat/photo.jpg   -> <absolute>/outside/photo.jpg   a real JPEG outside the source
    src/cat/broken.jpg  -> missing.jpg
    src/cat/loop        -> ..     a folder link back to the source root
    src/more            -> ../outside/more   a folder link out of the source
    src/notes.txt                 not an image (skipped, counted)
    """
    src, out = base / "src", base / "outside"
    (src / "cat").mkdir(parents=True)
    (out / "more" / "dog").mkdir(parents=True)
    write(src / "cat" / "a.jpg", jpeg())
    write(os.fsencode(src) + b"/" + LATIN1, jpeg((10, 200, 90)))
    (src / "cat" / "inside.jpg").symlink_to("a.jpg")
    write(out / "secret.jpg", SECRET)
    (src / "cat" / "leak.jpg").symlink_to(Path("..", "..", "outside", "secret.jpg"))
    write(out / "photo.jpg", jpeg((40, 40, 220)))
    (src / "cat" / "photo.jpg").symlink_to(out / "photo.jpg")
    (src / "cat" / "broken.jpg").symlink_to("missing.jpg")
    (src / "cat" / "loop").symlink_to("..", target_is_directory=True)
    write(out / "more" / "dog" / "x.jpg", jpeg((90, 90, 90)))
    (src / "more").symlink_to(Path("..", "outside", "more"), target_is_directory=True)
    write(src / "notes.txt", b"not an image")
    return src


@pytest.fixture
def tree(tmp_path) -> Path:
    return odd_tree(tmp_path)


def rows_by_relpath(listing) -> dict[str, dict]:
    rows = listing.table.to_pylist()
    assert len({r[columns.ID] for r in rows}) == len(rows), "ids must be unique"
    return {r["relpath"]: r for r in rows}


# --- the listing alone (no Ray) -------------------------------------------------------------


def test_listing_gives_every_odd_file_a_row_or_a_count(tree):
    listing = list_images(SourceConfig(uri=str(tree)))
    rows = rows_by_relpath(listing)
    assert sorted(rows) == [
        "cat/a.jpg",
        "cat/broken.jpg",
        "cat/caf\\xe9.jpg",
        "cat/inside.jpg",
        "cat/leak.jpg",
        "cat/photo.jpg",
    ]
    errors = {rel: r[columns.LIST_ERROR] for rel, r in rows.items()}
    assert errors["cat/a.jpg"] is None and errors["cat/inside.jpg"] is None
    assert errors["cat/leak.jpg"] == errors["cat/photo.jpg"] == OUTSIDE_LINK
    assert errors["cat/broken.jpg"] == BROKEN_LINK
    # Both folder links (out of the source, and back to its root) are counted, not walked.
    assert listing.skipped.symlinked_folders == 2
    assert listing.skipped.by_extension == {".txt": 1}
    assert listing.skipped.describe() == (
        "1 (.txt 1), hidden: 0, symlinked folders: 2 (set source.follow_symlinks: true to "
        "walk them)"
    )
    assert listing.skipped.to_dict() == {
        "by_extension": {".txt": 1},
        "hidden": 0,
        "symlinked_folders": 2,
    }
    assert listing.by_extension == {".jpg": 6}


def test_a_name_that_is_not_utf8_is_an_escaped_error_row_with_a_raw_bytes_id(tree):
    row = rows_by_relpath(list_images(SourceConfig(uri=str(tree))))["cat/caf\\xe9.jpg"]
    assert row[columns.PATH] == f"{tree}/cat/caf\\xe9.jpg"
    row[columns.PATH].encode("utf-8")  # valid text: arrow, parquet and JSON take it as is
    assert row[columns.ID] == image_id(LATIN1) != image_id("cat/caf\\xe9.jpg")
    assert row[columns.LABEL] == "cat"
    assert row[columns.LIST_ERROR] == (
        "file name is not valid UTF-8 (raw bytes b'caf\\xe9.jpg'); rename it to UTF-8, "
        "e.g. with convmv -f latin1 -t utf8, to embed it"
    )
    assert row["size"] == len(jpeg((10, 200, 90)))
    # Stable: the next listing gives the same id.
    again = rows_by_relpath(list_images(SourceConfig(uri=str(tree))))["cat/caf\\xe9.jpg"]
    assert again[columns.ID] == row[columns.ID]


def test_a_utf8_name_spelled_like_an_escape_keeps_its_own_id(tree):
    # A real file literally named `caf\xe9.jpg` (backslash, x, e, 9) shows the same text but
    # is another file: its id is the hash of its own bytes, and it is read normally.
    write(tree / "cat" / "caf\\xe9.jpg", jpeg())
    rows = list_images(SourceConfig(uri=str(tree))).table.to_pylist()
    same_text = [r for r in rows if r["relpath"] == "cat/caf\\xe9.jpg"]
    assert len(same_text) == 2
    assert {r[columns.ID] for r in same_text} == {image_id(LATIN1), image_id("cat/caf\\xe9.jpg")}
    assert sorted(r[columns.LIST_ERROR] is None for r in same_text) == [False, True]


def test_a_folder_name_that_is_not_utf8_labels_with_escapes(tmp_path):
    src = tmp_path / "src"
    (src / "ok").mkdir(parents=True)
    write(src / "ok" / "a.jpg", jpeg())
    os.mkdir(os.fsencode(src) + b"/\xe9t\xe9")
    write(os.fsencode(src) + b"/\xe9t\xe9/b.jpg", jpeg())
    rows = rows_by_relpath(list_images(SourceConfig(uri=str(src))))
    row = rows["\\xe9t\\xe9/b.jpg"]
    assert row[columns.LABEL] == "\\xe9t\\xe9"
    assert row[columns.ID] == image_id(b"\xe9t\xe9/b.jpg")
    assert row[columns.LIST_ERROR].startswith(
        "folder name is not valid UTF-8 (raw bytes b'\\xe9t\\xe9'); rename it"
    )
    assert rows["ok/a.jpg"][columns.LIST_ERROR] is None


def test_an_outside_link_reveals_nothing_about_its_target(tree):
    row = rows_by_relpath(list_images(SourceConfig(uri=str(tree))))["cat/leak.jpg"]
    assert row["size"] == 0  # not the target's size
    assert row[columns.PATH] == f"{tree}/cat/leak.jpg"
    text = json.dumps(row)
    assert str(tree.parent / "outside") not in text and "secret.jpg" not in text
    assert SECRET.decode() not in text


def test_follow_symlinks_reads_outside_links_and_walks_folder_links_once(tree):
    listing = list_images(SourceConfig(uri=str(tree), follow_symlinks=True))
    rows = rows_by_relpath(listing)
    assert sorted(rows) == [
        "cat/a.jpg",
        "cat/broken.jpg",
        "cat/caf\\xe9.jpg",
        "cat/inside.jpg",
        "cat/leak.jpg",
        "cat/photo.jpg",
        "more/dog/x.jpg",  # under the folder link, once; the loop adds nothing
    ]
    assert rows["cat/photo.jpg"][columns.LIST_ERROR] is None
    assert rows["cat/photo.jpg"]["size"] == len(jpeg((40, 40, 220)))
    assert rows["cat/leak.jpg"][columns.LIST_ERROR] is None  # followed: the decoder judges it
    assert rows["more/dog/x.jpg"][columns.LABEL] == "dog"
    assert rows["cat/broken.jpg"][columns.LIST_ERROR] == BROKEN_LINK  # still nothing to read
    assert listing.skipped.symlinked_folders == 0
    assert listing.skipped.symlink_loops == 1
    assert "symlink loops: 1" in listing.skipped.describe()


@pytest.mark.timeout(60)
def test_mutual_folder_links_end(tmp_path):
    # a/to_b -> b, b/to_a -> a: every way down comes back; the walk still ends.
    src = tmp_path / "src"
    for name, other in (("a", "b"), ("b", "a")):
        (src / name).mkdir(parents=True, exist_ok=True)
        write(src / name / f"{name}.jpg", jpeg())
        (src / name / f"to_{other}").symlink_to(Path("..", other), target_is_directory=True)
    listing = list_images(SourceConfig(uri=str(src), follow_symlinks=True))
    rel = listing.table.column("relpath").to_pylist()
    assert rel == ["a/a.jpg", "a/to_b/b.jpg", "b/b.jpg", "b/to_a/a.jpg"]
    assert listing.skipped.symlink_loops == 2


def test_a_named_pipe_is_an_error_row_not_a_hang(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.jpg", jpeg())
    os.mkfifo(src / "pipe.jpg")
    rows = rows_by_relpath(list_images(SourceConfig(uri=str(src))))
    assert rows["pipe.jpg"][columns.LIST_ERROR] == (
        "not a regular file (a named pipe); only regular files are read"
    )


def test_inside_links_are_checked_against_the_resolved_root(tmp_path):
    # The source is reached through a symlink; a link into the real folder is still inside.
    real = tmp_path / "real"
    real.mkdir()
    write(real / "a.jpg", jpeg())
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    (real / "b.jpg").symlink_to(tmp_path / "alias" / "a.jpg")
    rows = rows_by_relpath(list_images(SourceConfig(uri=str(tmp_path / "alias"))))
    assert rows["b.jpg"][columns.LIST_ERROR] is None


# --- the decode stage honours the listing's verdict (no Ray) --------------------------------


def test_decode_batch_never_opens_a_refused_file(tree):
    from vitflow.decode_task import decode_batch
    from vitflow.preprocess import Preprocessor

    listing = list_images(SourceConfig(uri=str(tree), follow_symlinks=True)).table
    # Refuse the (followed) link to the secret the way the listing refuses any file.
    errors = [
        OUTSIDE_LINK if rel == "cat/leak.jpg" else e
        for rel, e in zip(
            listing.column("relpath").to_pylist(),
            listing.column(columns.LIST_ERROR).to_pylist(),
            strict=True,
        )
    ]
    batch = {c: np.array(listing.column(c).to_pylist(), dtype=object) for c in listing.column_names}
    batch[columns.LIST_ERROR] = np.array(errors, dtype=object)
    cfg = Preprocessor(
        {
            "input_size": (3, 16, 16),
            "interpolation": "bilinear",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
    ).resize_spec()
    out = decode_batch(batch, resize=cfg, max_pixels=10**8)
    got = dict(zip(batch["relpath"], zip(out["status"], out["error"], strict=True), strict=True))
    assert got["cat/leak.jpg"] == ("error", OUTSIDE_LINK)
    assert got["cat/broken.jpg"] == ("error", BROKEN_LINK)
    assert got["cat/caf\\xe9.jpg"][0] == "error" and "convmv" in got["cat/caf\\xe9.jpg"][1]
    for rel in ("cat/a.jpg", "cat/inside.jpg", "cat/photo.jpg", "more/dog/x.jpg"):
        assert got[rel] == ("ok", None), rel
    assert columns.LIST_ERROR not in out
    assert SECRET[:8].decode() not in json.dumps([str(e) for e in out["error"]])


# --- real runs on Ray ----------------------------------------------------------------------


def job(src: Path, out: Path, **over):
    base = {
        "source": {"uri": str(src)},
        "model": {"name": NAME, "kwargs": KW, "weights": "random"},
        "features": [{"name": "emb", "layers": 2, "pool": "mean"}],
        "output": {"uri": str(out), "rows_per_file": 3},
        "compute": {"batch_size": 4},
    }
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


def output_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


def read_rows(out: Path) -> dict[str, dict]:
    table = pads.dataset(str(out), format="parquet").to_table()
    assert columns.LIST_ERROR not in table.column_names
    rows = table.to_pylist()
    ids = [r[columns.ID] for r in rows]
    assert len(ids) == len(set(ids)), "a file has more than one row"
    return {r[columns.ID]: r for r in rows}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_embed_completes_with_one_row_per_file_and_no_secret(tmp_path, ray_local):
    from vitflow.embed import run_embed

    src = odd_tree(tmp_path)
    out = tmp_path / "emb"
    listing = list_images(SourceConfig(uri=str(src)))
    result = run_embed(job(src, out))

    rows = read_rows(out)
    assert set(rows) == set(listing.table.column(columns.ID).to_pylist())
    assert (result.listed, result.ok, result.error) == (6, 2, 4)
    by_rel = {r["relpath"]: rows[r[columns.ID]] for r in listing.table.to_pylist()}
    for rel in ("cat/a.jpg", "cat/inside.jpg"):
        assert by_rel[rel][columns.STATUS] == "ok" and by_rel[rel]["emb"] is not None
    latin = by_rel["cat/caf\\xe9.jpg"]
    assert latin[columns.ID] == image_id(LATIN1)
    assert latin[columns.PATH] == f"{src}/cat/caf\\xe9.jpg"
    assert latin[columns.LABEL] == "cat"
    assert latin[columns.STATUS] == "error" and "not valid UTF-8" in latin[columns.ERROR]
    assert "convmv" in latin[columns.ERROR]
    for rel in ("cat/leak.jpg", "cat/photo.jpg"):
        assert by_rel[rel][columns.STATUS] == "error"
        assert by_rel[rel][columns.ERROR].startswith("symlink outside the source")
        assert by_rel[rel]["emb"] is None
    assert by_rel["cat/broken.jpg"][columns.ERROR] == BROKEN_LINK

    # The secret's bytes are nowhere in what the run wrote (parquet parts, manifest).
    written = output_bytes(out)
    assert SECRET[:8] not in written and b"hunter2" not in written
    for part in out.glob("part-*.parquet"):
        assert columns.LIST_ERROR not in pq.read_schema(part).names
    manifest = json.loads((out / columns.MANIFEST_NAME).read_text())
    assert manifest["counts"] == {"listed": 6, "ok": 2, "error": 4}
    assert manifest["listing"]["skipped"]["symlinked_folders"] == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_embed_with_follow_symlinks_embeds_outside_files(tmp_path, ray_local):
    from vitflow.embed import run_embed

    src = odd_tree(tmp_path)
    out = tmp_path / "emb"
    result = run_embed(job(src, out, **{"source.follow_symlinks": "true"}))
    listing = list_images(SourceConfig(uri=str(src), follow_symlinks=True))
    rows = read_rows(out)
    assert set(rows) == set(listing.table.column(columns.ID).to_pylist())
    by_rel = {r["relpath"]: rows[r[columns.ID]] for r in listing.table.to_pylist()}
    assert by_rel["cat/photo.jpg"][columns.STATUS] == "ok"
    assert by_rel["more/dog/x.jpg"][columns.STATUS] == "ok"
    assert by_rel["more/dog/x.jpg"][columns.LABEL] == "dog"
    # Followed on request: the secret is read, and the decoder refuses it as not an image,
    # quoting its first bytes (what the default run must never do: checked there).
    assert by_rel["cat/leak.jpg"][columns.STATUS] == "error"
    assert SECRET[:8].decode() in by_rel["cat/leak.jpg"][columns.ERROR]
    assert by_rel["cat/caf\\xe9.jpg"][columns.STATUS] == "error"
    assert (result.listed, result.ok, result.error) == (7, 4, 3)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_reindex_over_odd_files_commits_every_file_once(tmp_path, ray_local):
    from deltalake import DeltaTable

    from vitflow.reindex import run_reindex

    src = odd_tree(tmp_path)
    index = tmp_path / "index"
    first = run_reindex(job(src, index))
    assert (first.added, first.errors) == (6, 4)
    table = DeltaTable(str(index)).to_pyarrow_table()
    assert columns.LIST_ERROR not in table.column_names
    ids = table.column(columns.ID).to_pylist()
    listing = list_images(SourceConfig(uri=str(src)))
    assert sorted(ids) == sorted(listing.table.column(columns.ID).to_pylist())
    (leak,) = [r for r in table.to_pylist() if r[columns.PATH] == f"{src}/cat/leak.jpg"]
    assert leak["size"] == 0 and leak[columns.ERROR].startswith("symlink outside the source")
    assert SECRET[:8] not in output_bytes(index)
    # Nothing changed: the refused files stay as they are, nothing is embedded again.
    again = run_reindex(job(src, index))
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 6)
