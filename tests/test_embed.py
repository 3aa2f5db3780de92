"""End to end on a local Ray: a generated folder with labels, splits and every kind of bad
file -> parquet that pandas, polars and duckdb read, with vectors equal to plain timm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import TINY
from vitflow import columns
from vitflow.backbone import data_config
from vitflow.config import load_config
from vitflow.decode import decode_image
from vitflow.embed import prepare_embed, run_embed
from vitflow.errors import ConfigError, ModelError, OutputExistsError
from vitflow.loading import load_embeddings
from vitflow.synthetic import bad_files, make_image_folder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

NAME, KW = TINY["vit"]
BATCH = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Images in train/val x cat/dog/fox in six formats, plus every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    counts = make_image_folder(
        root / "images",
        per_class=3,
        size=(61, 45),
        formats=("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"),
        with_bad_files=True,
    )
    # Weights through a checkpoint file, so the reference below runs the very same model.
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **KW).eval()
    save_file(model.state_dict(), root / "weights.safetensors")
    return root, counts, model


def job(root, out="out", **over):
    base = {
        "source": {"uri": str(root / "images")},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "weights.safetensors")},
        "features": [
            {"name": "emb", "layers": 2, "pool": "mean", "aggregate": "concat"},
            {"name": "cls", "layers": [-1], "pool": "cls", "norm": True},
            {
                "name": "both",
                "layers": [0, -1],
                "pool": "cls_mean",
                "aggregate": "mean",
                "normalize": "none",
            },
        ],
        "output": {"uri": str(root / out), "rows_per_file": 10},
        "compute": {"batch_size": BATCH},
    }
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def embedded(corpus, ray_local):
    root, counts, model = corpus
    result = run_embed(job(root))
    return root, counts, model, result


def test_every_listed_file_is_one_row(embedded):
    root, counts, _, result = embedded
    assert result.listed == counts["good"] + counts["bad"]
    assert (result.ok, result.error) == (counts["good"], counts["bad"])
    df = load_embeddings(str(root / "out"), include_errors=True)
    assert len(df) == result.listed
    assert df[columns.ID].is_unique
    assert set(df[columns.PATH].map(lambda p: p.split("/images/")[1])) == {
        str(p.relative_to(root / "images")) for p in (root / "images").rglob("*") if p.is_file()
    }


def test_schema_is_plain_parquet_with_fixed_size_vectors(embedded):
    root, *_ = embedded
    schema = pads.dataset(str(root / "out"), format="parquet").schema
    assert schema.names[:8] == list(columns.META_COLUMNS)
    assert schema.field("emb").type == pa.list_(pa.float32(), 64)
    assert schema.field("cls").type == pa.list_(pa.float32(), 32)
    assert schema.field("both").type == pa.list_(pa.float32(), 64)
    assert schema.field(columns.WIDTH).type == pa.int32()
    assert len(list((root / "out").glob("*.parquet"))) >= 2  # rows_per_file=10 shards it


def test_error_rows_name_the_reason(embedded):
    root, *_ = embedded
    df = load_embeddings(str(root / "out"), include_errors=True)
    bad = df[df[columns.STATUS] == columns.STATUS_ERROR]
    bad = bad.set_index(bad[columns.PATH].map(lambda p: p.rsplit("/", 1)[1]))
    assert set(bad.index) == set(bad_files())
    assert "empty" in bad.loc["zero_bytes.jpg", columns.ERROR]
    assert "truncated" in bad.loc["truncated.jpg", columns.ERROR]
    assert "not a recognised image" in bad.loc["not_an_image.png", columns.ERROR]
    assert "source.max_pixels" in bad.loc["bomb.png", columns.ERROR]
    assert bad[columns.ERROR].str.len().min() > 10
    assert bad["emb"].isna().all() and bad[columns.WIDTH].isna().all()
    assert bad[columns.LABEL].eq("cat").all() and bad[columns.SPLIT].eq("train").all()


def test_labels_and_splits_from_folders(embedded):
    root, *_ = embedded
    df = load_embeddings(str(root / "out"))
    rel = df[columns.PATH].map(lambda p: p.split("/images/")[1].split("/"))
    assert (df[columns.SPLIT] == rel.map(lambda r: r[0])).all()
    assert (df[columns.LABEL] == rel.map(lambda r: r[1])).all()
    assert set(df[columns.SPLIT]) == {"train", "val"} and set(df[columns.LABEL]) == {
        "cat",
        "dog",
        "fox",
    }
    assert (df[[columns.WIDTH, columns.HEIGHT]] == [61, 45]).all().all()


def test_vectors_equal_plain_timm_on_the_same_images(embedded):
    """Reference: PIL decode -> timm's own eval transform -> forward_intermediates -> numpy pools."""
    root, _, model, _ = embedded
    df, emb = load_embeddings(str(root / "out"), feature="emb", return_vectors=True)
    cls_vecs = np.stack(load_embeddings(str(root / "out"), feature="cls")["cls"].to_numpy())
    both = np.stack(load_embeddings(str(root / "out"), feature="both")["both"].to_numpy())
    transform = timm.data.create_transform(**data_config(model), is_training=False)
    x = torch.stack([transform(decode_image(Path(p).read_bytes())) for p in df[columns.PATH]])
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=2, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        normed = model.forward_intermediates(
            x,
            indices=[-1],
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        first_last = model.forward_intermediates(
            x, indices=[0, -1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
    ref = np.concatenate([p.numpy().mean(axis=1) for p, _ in inter], axis=1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)
    ref_cls = normed[0][1][:, 0].numpy()
    ref_cls /= np.linalg.norm(ref_cls, axis=1, keepdims=True)
    np.testing.assert_allclose(cls_vecs, ref_cls, rtol=1e-4, atol=1e-5)
    ref_both = np.mean(
        [np.concatenate([c[:, 0].numpy(), p.numpy().mean(axis=1)], axis=1) for p, c in first_last],
        axis=0,
    )
    np.testing.assert_allclose(both, ref_both, rtol=1e-4, atol=1e-5)


def test_one_backbone_pass_per_batch_for_three_feature_sets(embedded):
    _, counts, _, result = embedded
    ex = result.manifest["execution"]
    assert len(result.manifest["features"]) == 3
    assert ex["images"] == counts["good"]
    assert ex["forwards"] == ex["batches_with_images"]
    assert ex["forwards"] >= -(-counts["good"] // BATCH)


def test_manifest(embedded):
    root, counts, _, result = embedded
    m = json.loads((root / "out" / columns.MANIFEST_NAME).read_text())
    assert m["counts"] == {"listed": result.listed, "ok": counts["good"], "error": counts["bad"]}
    assert m["features"]["emb"] == {
        "dim": 64,
        "layers": [2, 3],
        "pool": "mean",
        "aggregate": "concat",
        "norm": False,
        "normalize": "l2",
    }
    assert m["model"]["checkpoint_sha256"] and len(m["model"]["checkpoint_sha256"]) == 64
    assert {"vitflow", "timm", "torch", "ray", "pyarrow"} <= set(m["versions"])
    assert m["config"]["model"]["name"] == NAME and m["timing"]["wall_seconds"] > 0


def test_pandas_polars_duckdb_read_it_directly(embedded):
    import duckdb
    import pandas as pd
    import polars as pl

    root, counts, _, result = embedded
    out = str(root / "out")
    pdf = pd.read_parquet(out)
    assert len(pdf) == result.listed and len(pdf["emb"][pdf.status == "ok"].iloc[0]) == 64
    pldf = pl.read_parquet(f"{out}/*.parquet")
    assert pldf.height == result.listed and pldf.schema["emb"] == pl.Array(pl.Float32, 64)
    n_ok = duckdb.sql(
        f"select count(*) from read_parquet('{out}/*.parquet') where status = 'ok'"
    ).fetchall()[0][0]
    assert n_ok == counts["good"]


def test_load_embeddings_filters(embedded):
    root, counts, *_ = embedded
    out = str(root / "out")
    val, X = load_embeddings(out, feature="cls", split="val", return_vectors=True)
    assert set(val[columns.SPLIT]) == {"val"} and len(val) == counts["good"] // 2
    assert X.shape == (len(val), 32) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert "emb" not in val.columns and "both" not in val.columns
    with pytest.raises(Exception, match="feature 'nope'"):
        load_embeddings(out, feature="nope")


def test_existing_output_refused_without_overwrite(embedded):
    root, *_ = embedded
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_embed(job(root))


def test_model_errors_fail_before_any_work(corpus, tmp_path):
    root, *_ = corpus
    with pytest.raises(ModelError, match="out of range"):
        run_embed(job(root, out="never", **{"features.0.layers": "[7]"}))
    with pytest.raises(ModelError, match="does not exist"):
        run_embed(job(root, out="never", **{"model.checkpoint": str(tmp_path / "missing.pth")}))
    with pytest.raises(ConfigError, match="same place or one lies inside the other"):
        run_embed(job(root, out="images/emb"))
    assert not (root / "never").exists()


def test_rgba_image_is_embedded_as_composited_on_white(corpus, ray_local, tmp_path):
    """An RGBA PNG gives the vectors of the same picture drawn on white."""
    root, _, model = corpus
    src = tmp_path / "images"
    src.mkdir()
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    flat = np.full((40, 40, 3), 255, dtype=np.uint8)
    flat[:20] = (200, 0, 0)
    Image.fromarray(flat).save(src / "flat.png")
    cfg = load_config(
        base={
            "source": {"uri": str(src), "labels": "none", "split": None},
            "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "weights.safetensors")},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    run_embed(cfg)
    df = load_embeddings(str(tmp_path / "out")).set_index(columns.ID)
    vecs = {p.rsplit("/", 1)[1]: v for p, v in zip(df[columns.PATH], df["emb"], strict=True)}
    np.testing.assert_allclose(vecs["alpha.png"], vecs["flat.png"], atol=1e-6)
    assert df[columns.LABEL].isna().all() and df[columns.SPLIT].isna().all()
