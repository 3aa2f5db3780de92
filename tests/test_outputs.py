"""The output location: ``--overwrite`` removes only what vitflow wrote (locally and on a real
S3 server), and the source/output overlap guard compares resolved places, whatever the
spelling (``..``, relative paths, trailing slashes, symlinked folders)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from vitflow.config import load_config
from vitflow.embed import prepare_embed, run_embed
from vitflow.errors import ConfigError, OutputExistsError
from vitflow.loading import load_embeddings
from vitflow.synthetic import make_image_folder

pytestmark = pytest.mark.timeout(300)
NAME, KW = TINY["vit"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    make_image_folder(root / "images", per_class=2, splits=("train",))
    torch.manual_seed(3)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), root / "w.safetensors")
    return root


def job(root, src, out, endpoint=None, **over):
    base = {
        "source": {"uri": str(src)},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "w.safetensors")},
        "output": {"uri": str(out), "rows_per_file": 4},
        "compute": {"batch_size": 4},
    }
    if endpoint:
        base["storage"] = {"endpoint_url": endpoint}
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


def files_under(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


# --- --overwrite ---------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_vitflow_output(corpus, tmp_path):
    """`-o ~/Documents --overwrite` must delete nothing: the folder is refused, named."""
    docs = tmp_path / "Documents"
    (docs / "taxes").mkdir(parents=True)
    (docs / "taxes" / "2025.pdf").write_bytes(b"%PDF")
    (docs / "notes.txt").write_text("keep me")
    before = files_under(docs)
    with pytest.raises(OutputExistsError, match="did not write.*notes.txt|taxes/2025.pdf"):
        prepare_embed(job(corpus, corpus / "images", docs), overwrite=True)
    assert files_under(docs) == before


@pytest.mark.ray
def test_overwrite_replaces_a_previous_output_but_never_a_file_beside_it(
    corpus, ray_local, tmp_path
):
    out = tmp_path / "emb"
    first = run_embed(job(corpus, corpus / "images", out))
    parts = {f for f in files_under(out) if f.startswith("part-")}
    assert len(parts) == -(-first.listed // 4) and "_manifest.json" in files_under(out)

    # A previous vitflow output alone is replaced, file for file.
    second = run_embed(
        job(corpus, corpus / "images", out, **{"output.rows_per_file": 100}), overwrite=True
    )
    assert {f for f in files_under(out) if f.startswith("part-")} == {"part-00000.parquet"}
    assert len(load_embeddings(str(out))) == second.ok == first.ok

    # Anything else in the folder makes --overwrite refuse, and nothing is deleted.
    (out / "my-analysis.ipynb").write_text("{}")
    before = files_under(out)
    with pytest.raises(OutputExistsError, match="my-analysis.ipynb"):
        run_embed(job(corpus, corpus / "images", out), overwrite=True)
    assert files_under(out) == before


@pytest.mark.ray
def test_overwrite_on_s3_removes_only_vitflow_objects(corpus, s3_bucket, ray_local):
    fs, bucket, endpoint = s3_bucket
    src = corpus / "images"
    # Output at the bucket's root (an empty prefix): the riskiest spelling.
    out = f"s3://{bucket}"
    first = run_embed(job(corpus, src, out, endpoint))
    assert fs.exists(f"{bucket}/_manifest.json")
    again = run_embed(job(corpus, src, out, endpoint), overwrite=True)
    assert again.ok == first.ok and fs.exists(f"{bucket}/_manifest.json")

    fs.pipe(f"{bucket}/backups/db.dump", b"precious")
    with pytest.raises(OutputExistsError, match="backups/"):
        prepare_embed(job(corpus, src, out, endpoint), overwrite=True)
    assert fs.cat(f"{bucket}/backups/db.dump") == b"precious"
    assert fs.exists(f"{bucket}/_manifest.json")


# --- the overlap guard, every spelling ------------------------------------------------------


@pytest.fixture()
def tree(corpus, tmp_path):
    """tmp/s/parent/images (the source, a copy), tmp/s/other, and a symlink to parent."""
    import shutil

    s = tmp_path / "s"
    shutil.copytree(corpus / "images", s / "parent" / "images")
    (s / "other").mkdir()
    (s / "link").symlink_to(s / "parent", target_is_directory=True)
    return s


@pytest.mark.parametrize(
    "src, out",
    [
        ("parent/images", "other/../parent"),  # output above the source via ..
        ("parent/images", "other/../parent/images/emb"),  # inside the source via ..
        ("parent/images/", "parent/images"),  # trailing slash
        ("parent/images", "link"),  # a symlink to the source's parent
        ("link/images", "parent/images/x"),  # the source through a symlink
        ("./parent/./images", "parent"),
    ],
)
def test_overlapping_source_and_output_are_refused_in_every_spelling(
    corpus, tree, src, out, monkeypatch
):
    monkeypatch.chdir(tree)
    before = files_under(tree / "parent")
    with pytest.raises(ConfigError, match="same place or one lies inside the other"):
        prepare_embed(job(corpus, src, out), overwrite=True)
    assert files_under(tree / "parent") == before


def test_relative_input_with_absolute_output_is_compared_resolved(corpus, tree, monkeypatch):
    monkeypatch.chdir(tree / "other")
    with pytest.raises(ConfigError, match="same place"):
        prepare_embed(job(corpus, "../parent/images", tree / "parent"), overwrite=True)


def test_sibling_folders_with_a_common_prefix_do_not_overlap(corpus, tree):
    # "images" and "images-emb" share a prefix but are different places.
    plan = prepare_embed(job(corpus, tree / "parent" / "images", tree / "parent" / "images-emb"))
    assert len(plan.listing) > 0


def test_a_bind_mount_of_the_source_is_still_the_source(corpus, tree, tmp_path):
    """Spelling cannot see a bind mount (or another case on a case-insensitive disk); file
    identity can."""
    import subprocess

    alias = tmp_path / "alias"
    alias.mkdir()
    r = subprocess.run(
        ["mount", "--bind", str(tree / "parent"), str(alias)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip()})")
    try:
        with pytest.raises(ConfigError, match="same place"):
            prepare_embed(job(corpus, tree / "parent" / "images", alias / "images" / "emb"))
        with pytest.raises(ConfigError, match="same place"):
            prepare_embed(job(corpus, alias / "images", tree / "parent"))
    finally:
        subprocess.run(["umount", str(alias)], capture_output=True)
