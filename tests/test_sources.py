"""Tests for vitflow.sources: labels and splits from paths, stable ids, listing a folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pillow_heif
import pyarrow.compute as pc
import pytest
from PIL import Image

from vitflow import columns
from vitflow.config import IMAGE_EXTENSIONS, SourceConfig
from vitflow.decode import decode_image
from vitflow.errors import ConfigError
from vitflow.sources import SkippedFiles, image_id, label_and_split, list_images
from vitflow.synthetic import make_image_folder

# --- label_and_split -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath, expected",
    [
        ("train/cat/a.jpg", ("cat", "train")),
        ("validation/dog/a.jpg", ("dog", "validation")),
        ("val/dog/a.jpg", ("dog", "val")),
        ("test/fox/a.jpg", ("fox", "test")),
        ("cat/a.jpg", ("cat", None)),
        ("a.jpg", (None, None)),
        ("train/a.jpg", (None, "train")),  # the split folder is never the label
        ("cat/train/a.jpg", ("cat", "train")),  # split below the class folder
        ("a/b/c/x.jpg", ("c", None)),  # nearest parent
        ("val/dog/sub/x.jpg", ("sub", "val")),
        ("data/test/train/cat/x.jpg", ("cat", "test")),  # the first split-named folder
        ("trains/cat/x.jpg", ("cat", None)),  # only exact names
        ("Train/cat/x.jpg", ("cat", "Train")),  # names match case-insensitively
    ],
)
def test_label_and_split_auto(relpath, expected):
    assert label_and_split(relpath, "folder", "auto") == expected


@pytest.mark.parametrize(
    "relpath, expected",
    [
        ("train/cat/a.jpg", ("cat", None)),
        ("train/a.jpg", ("train", None)),  # no split folder: the parent is the label
        ("a.jpg", (None, None)),
    ],
)
def test_split_off(relpath, expected):
    assert label_and_split(relpath, "folder", None) == expected


@pytest.mark.parametrize(
    "relpath, split", [("train/cat/a.jpg", "train"), ("cat/a.jpg", None), ("a.jpg", None)]
)
def test_labels_off(relpath, split):
    assert label_and_split(relpath, "none", "auto") == (None, split)
    assert label_and_split(relpath, "none", None) == (None, None)


# --- image_id ------------------------------------------------------------------------------------


def test_image_id_format_and_golden_value():
    # Ids are the job's ledger keys: a change of algorithm would orphan every existing output.
    assert image_id("train/cat/000.jpg") == "e9a4abb7eb2ef93d"
    for rel in ("a.jpg", "train/cat/000.jpg", "ünïcode/ß.png"):
        assert re.fullmatch(r"[0-9a-f]{16}", image_id(rel))
        assert image_id(rel) == image_id("".join(rel))  # pure function of the text


def test_image_id_of_raw_bytes():
    # A UTF-8 name hashes the same as text or bytes; a name that is not UTF-8 (listed by its
    # raw bytes) cannot collide with any text name, not even with its escaped spelling.
    assert image_id("ünïcode/ß.png".encode()) == image_id("ünïcode/ß.png")
    assert image_id(b"caf\xe9.jpg") != image_id("caf\\xe9.jpg")
    assert re.fullmatch(r"[0-9a-f]{16}", image_id(b"caf\xe9.jpg"))


def test_image_id_distinguishes_paths():
    rels = [f"{s}/{c}/{i:03d}.jpg" for s in ("train", "val") for c in "abc" for i in range(50)]
    assert len({image_id(r) for r in rels}) == len(rels)


def test_ids_depend_only_on_relative_path(tmp_path):
    make_image_folder(tmp_path / "one" / "images", per_class=2, size=(16, 12))
    shutil.copytree(tmp_path / "one" / "images", tmp_path / "elsewhere" / "deeper" / "copy")
    a = list_images(SourceConfig(uri=str(tmp_path / "one" / "images"))).table
    b = list_images(SourceConfig(uri=str(tmp_path / "elsewhere" / "deeper" / "copy"))).table
    assert a.column("path").to_pylist() != b.column("path").to_pylist()
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("relpath").to_pylist() == b.column("relpath").to_pylist()
    assert a.column("id").to_pylist() == [image_id(r) for r in a.column("relpath").to_pylist()]


# --- list_images ---------------------------------------------------------------------------------


def test_lists_generated_tree_with_labels_and_splits(tmp_path):
    counts = make_image_folder(
        tmp_path, classes=("cat", "dog"), per_class=3, size=(16, 12), formats=("JPEG", "PNG")
    )
    listing = list_images(SourceConfig(uri=str(tmp_path)))
    t = listing.table
    assert len(listing) == counts["good"] == 12
    assert listing.protocol == "file"
    assert listing.root == str(tmp_path)
    assert t.column_names == [
        columns.ID,
        columns.PATH,
        "relpath",
        columns.LABEL,
        columns.SPLIT,
        "size",
        "mtime",
        columns.LIST_ERROR,
    ]
    assert t.column(columns.LIST_ERROR).null_count == 12  # nothing refused before reading
    rows = t.to_pylist()
    expected = sorted(
        str(p.relative_to(tmp_path)).replace(os.sep, "/")
        for p in tmp_path.rglob("*")
        if p.is_file()
    )
    assert [r["relpath"] for r in rows] == expected
    for r in rows:
        split, label, _ = r["relpath"].split("/")
        assert (r[columns.SPLIT], r[columns.LABEL]) == (split, label)
        assert r[columns.PATH] == str(tmp_path / r["relpath"])
        assert r["size"] == (tmp_path / r["relpath"]).stat().st_size > 0
        assert r["mtime"] is not None
    assert len(set(t.column("id").to_pylist())) == 12


def test_no_split_folders(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), per_class=2, splits=None, size=(16, 12))
    t = list_images(SourceConfig(uri=str(tmp_path))).table
    assert t.column(columns.SPLIT).to_pylist() == [None] * 4
    assert t.column(columns.LABEL).to_pylist() == ["a", "a", "b", "b"]


def test_labels_none_and_split_null_in_listing(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=2, size=(16, 12))
    t = list_images(SourceConfig(uri=str(tmp_path), labels="none", split=None)).table
    assert len(t) == 4
    assert t.column(columns.LABEL).to_pylist() == [None] * 4
    assert t.column(columns.SPLIT).to_pylist() == [None] * 4


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    root = tmp_path / "src"
    files = {
        "z.jpg": b"1",
        "A.JPG": b"12",  # upper-case extension counts
        "b.Jpeg": b"123",
        "deep/er/still/c.png": b"1234",
        "deep/d.webp": b"12345",
        "e.tiff": b"1",
        "f.bmp": b"1",
        "g.gif": b"1",
        "h.tif": b"1",
        "folder.jpg/inside.png": b"1",  # a folder with an image-like name is not a file
        # skipped:
        "notes.txt": b"1",
        "jpg": b"1",  # no dot: not an extension
        "image.jpg.bak": b"1",
        ".hidden.jpg": b"1",
        ".cache/x.jpg": b"1",
        "deep/.thumbs/y.png": b"1",
    }
    for rel, data in files.items():
        _touch(root / rel, data)
    return root


def test_filters_recursive_sorted_case_insensitive_skips_hidden(messy_tree):
    t = list_images(SourceConfig(uri=str(messy_tree))).table
    rel = t.column("relpath").to_pylist()
    assert sorted(rel) == sorted(
        [
            "z.jpg",
            "A.JPG",
            "b.Jpeg",
            "deep/er/still/c.png",
            "deep/d.webp",
            "e.tiff",
            "f.bmp",
            "g.gif",
            "h.tif",
            "folder.jpg/inside.png",
        ]
    )
    paths = t.column("path").to_pylist()
    assert paths == sorted(paths)
    sizes = dict(zip(rel, t.column("size").to_pylist(), strict=True))
    assert sizes["A.JPG"] == 2
    assert sizes["deep/er/still/c.png"] == 4
    assert sizes["deep/d.webp"] == 5
    # Every listed path reads back as the file at root/relpath.
    for p, r in zip(paths, rel, strict=True):
        assert Path(p).read_bytes() == (messy_tree / r).read_bytes()


def test_messy_tree_counts_listed_and_skipped(messy_tree):
    listing = list_images(SourceConfig(uri=str(messy_tree)))
    assert listing.by_extension == {
        ".jpg": 2,  # z.jpg, A.JPG: counted lower-cased
        ".png": 2,
        ".bmp": 1,
        ".gif": 1,
        ".jpeg": 1,
        ".tif": 1,
        ".tiff": 1,
        ".webp": 1,
    }
    assert list(listing.by_extension)[:2] == [".jpg", ".png"]  # most common first
    assert listing.skipped == SkippedFiles(by_extension={".bak": 1, ".txt": 1, "": 1}, hidden=3)
    assert listing.skipped.describe() == "3 (.bak 1, .txt 1, no extension 1), hidden: 3"
    files = [p for p in messy_tree.rglob("*") if p.is_file()]
    assert len(listing) + listing.skipped.total == len(files) == 16


def test_every_default_extension_is_listed(tmp_path):
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        _touch(tmp_path / f"{i}{ext.upper()}")
    t = list_images(SourceConfig(uri=str(tmp_path))).table
    assert len(t) == len(IMAGE_EXTENSIONS)


def test_custom_extensions(messy_tree):
    t = list_images(SourceConfig(uri=str(messy_tree), extensions=("PNG",))).table
    assert sorted(t.column("relpath").to_pylist()) == [
        "deep/er/still/c.png",
        "folder.jpg/inside.png",
    ]


def test_hidden_folder_above_root_is_fine(tmp_path):
    root = tmp_path / ".data" / "imgs"
    _touch(root / "cat" / "a.jpg")
    t = list_images(SourceConfig(uri=str(root))).table
    assert t.column("relpath").to_pylist() == ["cat/a.jpg"]


def test_trailing_slash_and_relative_uri_give_same_listing(messy_tree, monkeypatch):
    plain = list_images(SourceConfig(uri=str(messy_tree))).table
    slashed = list_images(SourceConfig(uri=str(messy_tree) + "/")).table
    monkeypatch.chdir(messy_tree.parent)
    relative = list_images(SourceConfig(uri="./src")).table
    assert slashed.equals(plain)
    assert relative.column("id").equals(plain.column("id"))
    assert relative.column("path").equals(plain.column("path"))


def test_fsspec_url_source():
    # A non-local filesystem: paths come back as URLs, ids still from the relative path.
    fs = fsspec.filesystem("memory")
    root = "/vitflow-test-sources"
    fs.pipe(
        {
            f"{root}/imgs/train/cat/a.jpg": b"123",
            f"{root}/imgs/b.png": b"1",
            f"{root}/imgs/.hidden/c.jpg": b"1",
            f"{root}/imgs2/d.jpg": b"1",  # a sibling sharing the prefix is not listed
        }
    )
    try:
        listing = list_images(SourceConfig(uri=f"memory://{root}/imgs"))
        rows = listing.table.to_pylist()
        assert listing.protocol == "memory"
        assert [r["relpath"] for r in rows] == ["b.png", "train/cat/a.jpg"]
        assert [r["id"] for r in rows] == [image_id("b.png"), image_id("train/cat/a.jpg")]
        assert rows[1][columns.LABEL] == "cat"
        assert rows[1][columns.SPLIT] == "train"
        assert rows[1]["size"] == 3
        assert listing.by_extension == {".jpg": 1, ".png": 1}
        assert listing.skipped == SkippedFiles(by_extension={}, hidden=1)
        for r in rows:
            assert r[columns.PATH].startswith("memory://")
            with fsspec.open(r[columns.PATH], "rb") as f:
                assert f.read() == fs.cat_file(f"{root}/imgs/{r['relpath']}")
    finally:
        fs.rm(root, recursive=True)


# --- errors --------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    uri = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="source.uri") as info:
        list_images(SourceConfig(uri=uri))
    assert uri in str(info.value)
    assert "does not exist" in str(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "one.jpg"
    f.write_bytes(b"1")
    with pytest.raises(ConfigError, match="source.uri") as info:
        list_images(SourceConfig(uri=str(f)))
    assert "is a file" in str(info.value)


def test_folder_without_images(tmp_path):
    _touch(tmp_path / "readme.txt")
    _touch(tmp_path / ".hidden" / "a.jpg")
    with pytest.raises(ConfigError, match="source.uri") as info:
        list_images(SourceConfig(uri=str(tmp_path)))
    assert "no images" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert "found 1 .txt file;" in str(info.value)
    assert "skipped 1 hidden file " in str(info.value)


def test_no_images_names_what_was_found_and_the_fix(tmp_path):
    for i in range(40):
        _touch(tmp_path / "raw" / f"IMG_{i:04d}.CR2")
    _touch(tmp_path / "raw" / "notes.txt")
    with pytest.raises(ConfigError) as info:
        list_images(SourceConfig(uri=str(tmp_path)))
    message = str(info.value)
    assert "found 40 .cr2 files, 1 .txt file; add their extension to source.extensions" in message
    assert "if Pillow can read them" in message
    assert "hidden" not in message


def test_no_images_message_stays_short_with_many_extensions(tmp_path):
    for i, ext in enumerate(["a", "b", "c", "d", "e", "f", "g"]):
        for j in range(10 - i):
            _touch(tmp_path / f"{j}.{ext}")
    _touch(tmp_path / "Makefile")
    with pytest.raises(ConfigError) as info:
        list_images(SourceConfig(uri=str(tmp_path)))
    # The five most common are named; the rest (5 .f, 4 .g, 1 Makefile) are summed.
    found = "found 10 .a files, 9 .b files, 8 .c files, 7 .d files, 6 .e files and 10 more files;"
    assert found in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        list_images(SourceConfig(uri=str(tmp_path)))


# --- skipped files and phone formats ------------------------------------------------------------


def _phone_folder(root: Path) -> None:
    """Real image files next to what a phone backup or a shared drive also holds."""
    rgb = Image.fromarray(np.full((12, 16, 3), (200, 80, 40), dtype=np.uint8))
    root.mkdir(parents=True)
    rgb.save(root / "a.jpg", "JPEG")
    rgb.save(root / "b.avif", "AVIF")
    pillow_heif.from_pillow(rgb).save(root / "IMG_0001.HEIC", quality=90)
    _touch(root / "notes.txt")
    _touch(root / "album" / "todo.txt")
    _touch(root / "art.psd")
    _touch(root / ".DS_Store")
    _touch(root / "README")


def test_listing_counts_phone_formats_and_what_it_skips(tmp_path):
    _phone_folder(tmp_path / "photos")
    listing = list_images(SourceConfig(uri=str(tmp_path / "photos")))
    assert listing.table.column("relpath").to_pylist() == ["IMG_0001.HEIC", "a.jpg", "b.avif"]
    assert listing.by_extension == {".avif": 1, ".heic": 1, ".jpg": 1}
    skipped = listing.skipped
    assert skipped.by_extension == {".txt": 2, ".psd": 1, "": 1}
    assert skipped.hidden == 1
    assert skipped.total == 5
    assert skipped.describe() == "4 (.txt 2, .psd 1, no extension 1), hidden: 1"
    assert json.loads(json.dumps(skipped.to_dict())) == {
        "by_extension": {".txt": 2, ".psd": 1, "": 1},
        "hidden": 1,
    }
    # Every listed file decodes: HEIC and AVIF are images like the rest.
    for path in listing.table.column("path").to_pylist():
        assert decode_image(Path(path).read_bytes()).size == (16, 12)


def test_restricted_extensions_count_the_others_as_skipped(tmp_path):
    _phone_folder(tmp_path / "photos")
    listing = list_images(SourceConfig(uri=str(tmp_path / "photos"), extensions=[".jpg"]))
    assert listing.table.column("relpath").to_pylist() == ["a.jpg"]
    assert listing.by_extension == {".jpg": 1}
    assert listing.skipped.by_extension == {
        ".txt": 2,
        ".avif": 1,
        ".heic": 1,
        ".psd": 1,
        "": 1,
    }
    assert listing.skipped.hidden == 1
    assert listing.skipped.describe() == (
        "6 (.txt 2, .avif 1, .heic 1, .psd 1, no extension 1), hidden: 1"
    )


def test_skipped_folders_are_described_only_when_there_are_some():
    skipped = SkippedFiles(
        by_extension={".txt": 2},
        hidden=1,
        symlinked_folders=1,
        symlink_loops=2,
        unreadable_folders=3,
    )
    assert skipped.total == 3  # files only: a folder that was not walked is no file
    assert skipped.describe() == (
        "2 (.txt 2), hidden: 1, symlinked folders: 1 (set source.follow_symlinks: true to walk "
        "them), symlink loops: 2 (not entered: each leads back to a folder above it), "
        "unreadable folders: 3 (check their permissions)"
    )
    assert skipped.to_dict() == {
        "by_extension": {".txt": 2},
        "hidden": 1,
        "symlinked_folders": 1,
        "symlink_loops": 2,
        "unreadable_folders": 3,
    }
    # An ordinary folder reads (and records) exactly as before.
    plain = SkippedFiles(by_extension={".txt": 2}, hidden=1)
    assert plain.describe() == "2 (.txt 2), hidden: 1"
    assert plain.to_dict() == {"by_extension": {".txt": 2}, "hidden": 1}


def test_folder_symlinks_are_counted_and_walked_on_request(tmp_path):
    src = tmp_path / "src"
    _touch(src / "cat" / "a.jpg")
    _touch(tmp_path / "elsewhere" / "dog" / "b.jpg")
    (src / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    listing = list_images(SourceConfig(uri=str(src)))
    assert listing.table.column("relpath").to_pylist() == ["cat/a.jpg"]
    assert listing.skipped.symlinked_folders == 1
    assert listing.skipped.describe() == (
        "0, hidden: 0, symlinked folders: 1 (set source.follow_symlinks: true to walk them)"
    )
    followed = list_images(SourceConfig(uri=str(src), follow_symlinks=True))
    assert followed.table.column("relpath").to_pylist() == ["cat/a.jpg", "more/dog/b.jpg"]
    assert followed.table.column(columns.LABEL).to_pylist() == ["cat", "dog"]
    assert followed.skipped == SkippedFiles()


def test_only_folder_symlinks_name_the_fix(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _touch(tmp_path / "elsewhere" / "b.jpg")
    (src / "photos").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError) as info:
        list_images(SourceConfig(uri=str(src)))
    assert "1 folder symlink not walked; set source.follow_symlinks: true" in str(info.value)
    assert len(list_images(SourceConfig(uri=str(src), follow_symlinks=True))) == 1


def test_an_unreadable_folder_is_counted(tmp_path, monkeypatch):
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "locked" / "b.jpg")
    (tmp_path / "locked").chmod(0)
    if os.geteuid() == 0:  # root reads any folder: deny this one the way the kernel would
        real_scandir = os.scandir

        def scandir(path):
            if not isinstance(path, int) and os.fsdecode(path).endswith("/locked"):
                raise PermissionError(13, "Permission denied", path)
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        listing = list_images(SourceConfig(uri=str(tmp_path)))
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert listing.table.column("relpath").to_pylist() == ["a.jpg"]
    assert listing.skipped.unreadable_folders == 1


def test_nothing_skipped(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=2, splits=None, size=(16, 12))
    listing = list_images(SourceConfig(uri=str(tmp_path)))
    assert listing.by_extension == {".jpg": 2}
    assert listing.skipped == SkippedFiles()
    assert listing.skipped.total == 0
    assert listing.skipped.describe() == "0, hidden: 0"


def test_a_split_folder_read_within_its_collection_lists_as_the_collection_does(tmp_path):
    """`source.within` (set by `vitflow matrix` for each split folder): the folder's rows get
    the ids, labels and split a listing of the whole collection gives them, and the files
    are still read where they are."""
    make_image_folder(tmp_path / "data", per_class=2, size=(16, 12))
    whole = list_images(SourceConfig(uri=str(tmp_path / "data"))).table
    cols = ["id", "path", "label", "split"]
    for split in ("train", "val"):
        part = list_images(SourceConfig(uri=str(tmp_path / "data" / split), within=split)).table
        want = whole.filter(pc.equal(whole["split"], split)).select(cols).to_pylist()
        assert part.select(cols).to_pylist() == want
    # Without it, the two folders' ids collide (the same relative names in each).
    ids = {
        split: set(
            list_images(SourceConfig(uri=str(tmp_path / "data" / split))).table["id"].to_pylist()
        )
        for split in ("train", "val")
    }
    assert ids["train"] & ids["val"]
    # A list of files read within a split (a matrix job's split named as a list): every
    # row gets that split, its folder's label, and an id of <split>/<path as written>, so
    # one file in two lists of a dataset has two ids.
    listed = tmp_path / "list.txt"
    written = sorted(str(p) for p in (tmp_path / "data" / "val").rglob("*.jpg"))
    listed.write_text("\n".join(written) + "\n")
    for split in ("val", "test"):
        rows = list_images(SourceConfig(uri=str(listed), within=split)).table.to_pylist()
        assert sorted(r["id"] for r in rows) == sorted(image_id(f"{split}/{w}") for w in written)
        assert {r["split"] for r in rows} == {split}
        assert {r["label"] for r in rows} == {"cat", "dog", "fox"}


def test_within_is_part_of_the_vector_identity_only_where_it_is_set():
    """Jobs that never set it keep the identity (and so the resume fingerprint and index
    compatibility) they had; a split read within its dataset says so."""
    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.config import load_config
    from vitflow.identity import vector_identity

    base = {
        "source": {"uri": "x"},
        "model": {"name": "resnet18", "weights": "random"},
        "output": {"uri": "o"},
    }
    weights = backbone_bytes(create_backbone(load_config(base=base).model))
    plain = vector_identity(load_config(base=base), weights)
    within = vector_identity(load_config(base=base, overrides=["source.within=train"]), weights)
    assert "within" not in plain["labels"] and within["labels"]["within"] == "train"
    assert {k: v for k, v in within.items() if k != "labels"} == {
        k: v for k, v in plain.items() if k != "labels"
    }
