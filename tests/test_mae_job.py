"""``model.mae_loss`` as a job output: each image's MAE reconstruction loss in a ``mae_loss``
column (embed), and each dataset's summary, table and chart (matrix), against the loss of
plain timm preprocessing + the library's ``mae_loss`` (itself tested against a loss written
out by hand in test_mae.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch
from safetensors.torch import save_file

from vitflow import columns
from vitflow.backbone import data_config
from vitflow.config import load_config
from vitflow.decode import decode_image
from vitflow.embed import prepare_embed, run_embed
from vitflow.errors import ConfigError, ModelError
from vitflow.loading import load_embeddings
from vitflow.mae import MAEDecoder, mae_loss, mask_noise
from vitflow.matrix import MatrixConfig, run_matrix
from vitflow.synthetic import make_image_folder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PATCH, SIDE = 8, 32
L = (SIDE // PATCH) ** 2
KW = {"img_size": SIDE, "patch_size": PATCH, "embed_dim": 32, "depth": 2, "num_heads": 2}
NAME = "vit_base_patch16_224.mae"
SEED = 3


@pytest.fixture(scope="module")
def mae_files(tmp_path_factory):
    """A tiny MAE in the official checkpoints' layout (encoder and decoder keys side by side,
    random weights), and a folder of images with a bad file among them."""
    root = tmp_path_factory.mktemp("mae")
    torch.manual_seed(0)
    enc = timm.create_model(NAME, pretrained=False, num_classes=0, **KW).eval()
    dec = MAEDecoder(L, PATCH, encoder_dim=32, decoder_dim=16, depth=2, num_heads=2).eval()
    with torch.no_grad():
        for p in (*enc.parameters(), *dec.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    save_file({**enc.state_dict(), **dec.state_dict()}, root / "mae_official.safetensors")
    save_file(enc.state_dict(), root / "encoder_only.safetensors")
    make_image_folder(root / "images", per_class=2, splits=("train",), with_bad_files=True)
    return root, enc, dec


def mae_job(root: Path, out: str, checkpoint: str = "mae_official.safetensors", **mae):
    return load_config(
        base={
            "source": {"uri": str(root / "images")},
            "model": {
                "name": NAME,
                "kwargs": KW,
                "checkpoint": str(root / checkpoint),
                "mae_loss": {"decoder_heads": 2, "seed": SEED, **mae},
            },
            "output": {"uri": str(root / out)},
            "compute": {"batch_size": 3},
        }
    )


def reference_loss(enc, dec, path: str, image_id: str, norm: bool = True) -> float:
    """Plain timm eval transform of the decoded file, then the library's loss on it alone."""
    transform = timm.data.create_transform(**data_config(enc), is_training=False)
    x = transform(decode_image(Path(path).read_bytes()))[None]
    noise = mask_noise([image_id], L, seed=SEED)
    return float(mae_loss(enc, dec, x, noise, norm_pix_loss=norm)[0])


def test_each_image_gets_its_mae_loss_and_error_rows_none(mae_files, ray_local):
    root, enc, dec = mae_files
    result = run_embed(mae_job(root, "out"))
    df = load_embeddings(str(root / "out"), include_errors=True)
    assert len(df) == result.listed and result.error > 0
    assert (
        pq.read_schema(next((root / "out").glob("part-*.parquet"))).field(columns.MAE_LOSS).type
        == "float"
    )
    ok = df[columns.STATUS] == columns.STATUS_OK
    assert df.loc[~ok, columns.MAE_LOSS].isna().all()
    got = df.loc[ok, columns.MAE_LOSS].to_numpy()
    pairs = zip(df.loc[ok, "path"], df.loc[ok, "id"], strict=True)
    want = [reference_loss(enc, dec, p, i) for p, i in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.std(got) > 0  # a column of one repeated value would be no measure at all
    assert columns.MAE_LOSS in result.manifest["columns"]
    assert result.manifest["identity"]["vectors"]["model"]["mae_loss"]["seed"] == SEED


def test_mae_loss_needs_the_decoder_and_says_where_it_comes_from(mae_files):
    root, _, _ = mae_files
    with pytest.raises(ModelError, match="no MAE decoder.*official MAE checkpoint"):
        prepare_embed(mae_job(root, "never", checkpoint="encoder_only.safetensors"))
    with pytest.raises(ConfigError, match="model.mae_loss needs model.checkpoint"):
        load_config(
            base={
                "source": {"uri": "x"},
                "model": {"name": NAME, "weights": "random", "mae_loss": {}},
                "output": {"uri": "y"},
            }
        )
    with pytest.raises(ModelError, match="decoder_heads|divisible"):
        prepare_embed(mae_job(root, "never", decoder_heads=3))


def test_a_matrix_job_summarises_each_datasets_mae_loss(mae_files, ray_local, tmp_path):
    """Two collections that differ in kind: the summary per dataset equals the column's own
    statistics, and the chart is written."""
    root, enc, dec = mae_files
    make_image_folder(tmp_path / "other", per_class=2, splits=("train",), size=(50, 40))
    out = tmp_path / "matrix"
    cfg = load_config(
        base={
            "kind": "matrix",
            "models": [
                {
                    "name": "mae",
                    "model": {
                        "name": NAME,
                        "kwargs": KW,
                        "checkpoint": str(root / "mae_official.safetensors"),
                        "mae_loss": {"decoder_heads": 2, "seed": SEED},
                    },
                }
            ],
            "datasets": [
                {"name": "shapes", "source": {"uri": str(root / "images")}},
                {"name": "other", "source": {"uri": str(tmp_path / "other")}},
            ],
            "output": {"uri": str(out)},
            "compute": {"batch_size": 4},
        },
        schema=MatrixConfig,
    )

    result = run_matrix(cfg)
    folder = out / "mae" / "_ood"
    summary = json.loads((folder / "mae_summary.json").read_text())
    rows = {r["dataset"]: r for r in summary["summary"]}
    assert set(rows) == {"shapes", "other"}
    for name in rows:
        df = load_embeddings(str(out), model="mae", dataset=name)
        vals = df.loc[df[columns.STATUS] == columns.STATUS_OK, columns.MAE_LOSS].to_numpy()
        assert rows[name]["n"] == len(vals) > 0
        assert rows[name]["median"] == pytest.approx(float(np.median(vals)), rel=1e-6)
        assert rows[name]["mean"] == pytest.approx(float(np.mean(vals)), rel=1e-6)
    assert (folder / "mae_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(folder / "mae_summary.csv")
    assert table.set_index("dataset")["median"].to_dict() == pytest.approx(
        {n: r["median"] for n, r in rows.items()}
    )
    assert result.mae["mae"]["summary"] == summary["summary"]
