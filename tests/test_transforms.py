"""`vitflow fit`: standardisation and PCA fitted in one streaming pass equal scikit-learn's
``StandardScaler`` / ``PCA`` fitted on all rows at once (up to sign, 1e-4), and
``load_embeddings(..., transform=NAME)`` applies them only to the data they were fitted on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.test_eval import digits_rows, write_output
from vitflow import columns
from vitflow.errors import VitflowError


@pytest.fixture
def out(tmp_path):
    """Digits pixels shifted far from 0 (the case where naive sum-of-squares accumulation
    loses digits) in 5 parts, read back 37 rows at a time."""
    rows = digits_rows()
    rows["pix"] = rows["pix"] * 3.0 + 1000.0
    uri = write_output(tmp_path / "out", rows, parts=5)
    ok = np.array([s == "ok" for s in rows[columns.STATUS]])
    return uri, rows["pix"][ok].astype(np.float64), rows


def _same_up_to_sign(a, b, atol=1e-4):
    """Columns equal up to a sign each."""
    signs = np.sign(np.sum(a * b, axis=0))
    np.testing.assert_allclose(a * signs, b, rtol=0, atol=atol)


def test_standardize_equals_standard_scaler(out):
    from sklearn.preprocessing import StandardScaler

    from vitflow import load_embeddings
    from vitflow.analysis.transforms import fit_transform

    uri, x, _ = out
    fitted = fit_transform(uri, feature="pix", standardize=True, batch_rows=37)
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(fitted.arrays["mean"], ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(fitted.arrays["scale"], ref.scale_, rtol=1e-9)
    df = load_embeddings(uri, feature="pix", transform="pix-std")
    np.testing.assert_allclose(np.stack(df["pix"]), ref.transform(x), rtol=0, atol=1e-4)
    assert fitted.meta["rows"] == len(x) and fitted.meta["kind"] == "standardize"


@pytest.mark.parametrize("whiten", [False, True])
def test_pca_equals_scikit_learn_up_to_sign(out, whiten):
    from sklearn.decomposition import PCA

    from vitflow import load_embeddings
    from vitflow.analysis.transforms import fit_transform

    uri, x, _ = out
    fit_transform(uri, feature="pix", pca=12, whiten=whiten, name="p", batch_rows=37)
    ref = PCA(n_components=12, whiten=whiten, svd_solver="full").fit(x)
    df = load_embeddings(uri, feature="pix", transform="p")
    got = np.stack(df["pix"])
    assert got.shape == (len(x), 12) and got.dtype == np.float32
    _same_up_to_sign(got, ref.transform(x))
    meta = json.load(open(f"{uri}/_transforms/p.json"))
    assert (meta["n_components"], meta["whiten"], meta["dim_out"]) == (12, whiten, 12)
    assert meta["explained_variance_ratio"] == pytest.approx(ref.explained_variance_ratio_.sum())


def test_standardize_then_whitened_pca_equals_the_pipeline(out):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from vitflow import load_embeddings
    from vitflow.analysis.transforms import fit_transform

    uri, x, _ = out
    fitted = fit_transform(uri, feature="pix", standardize=True, pca=8, whiten=True)
    assert fitted.name == "pix-std-pca8w"
    z = StandardScaler().fit_transform(x)
    ref = PCA(n_components=8, whiten=True, svd_solver="full").fit(z)
    df = load_embeddings(uri, feature="pix", transform=fitted.name, split="val")
    val = np.array(
        [
            s == "val"
            for s, st in zip(out[2][columns.SPLIT], out[2][columns.STATUS], strict=True)
            if st == "ok"
        ]
    )
    _same_up_to_sign(np.stack(df["pix"]), ref.transform(z[val]))


def test_a_transform_refuses_other_data_and_other_features(out, tmp_path):
    from vitflow import load_embeddings
    from vitflow.analysis.transforms import fit_transform

    uri, _, rows = out
    fit_transform(uri, feature="pix", pca=4, name="small")
    with pytest.raises(VitflowError, match="fitted on feature 'pix', not 'proj'"):
        load_embeddings(uri, feature="proj", transform="small")
    with pytest.raises(VitflowError, match="no transform 'nope'.*it has small"):
        load_embeddings(uri, feature="pix", transform="nope")
    # The same folder re-embedded with one row fewer: its parts and manifest change.
    import shutil

    keep = {k: v[:-1] for k, v in rows.items()}
    other = write_output(tmp_path / "other", keep, parts=5)
    shutil.copytree(f"{uri}/_transforms", f"{other}/_transforms")
    with pytest.raises(VitflowError, match="fitted on other data than") as e:
        load_embeddings(other, feature="pix", transform="small")
    assert "vitflow fit" in str(e.value) and "\n" not in str(e.value)


def test_fit_refusals(out):
    from vitflow.analysis.transforms import fit_transform

    uri, _, _ = out
    with pytest.raises(VitflowError, match="nothing to fit"):
        fit_transform(uri, feature="pix")
    with pytest.raises(VitflowError, match="needs --pca"):
        fit_transform(uri, feature="pix", standardize=True, whiten=True)
    with pytest.raises(VitflowError, match="out of range"):
        fit_transform(uri, feature="pix", pca=65)
    with pytest.raises(VitflowError, match="several features"):
        fit_transform(uri, pca=2)
    fit_transform(uri, feature="pix", pca=2)
    with pytest.raises(VitflowError, match="already exists"):
        fit_transform(uri, feature="pix", pca=2)
    fit_transform(uri, feature="pix", pca=2, overwrite=True, split="train")
    assert json.load(open(f"{uri}/_transforms/pix-pca2.json"))["split"] == "train"
    # constant pixel columns have no variance: whitening them is refused, not divided by 0
    with pytest.raises(VitflowError, match="no variance"):
        fit_transform(uri, feature="pix", pca=64, whiten=True)


def test_cli_fit_then_load_stays_torch_free(out):
    from typer.testing import CliRunner

    from vitflow.cli import app

    uri, _, _ = out
    r = CliRunner().invoke(app, ["fit", uri, "--feature", "proj", "--pca", "4", "--whiten"])
    assert r.exit_code == 0, r.output
    assert "proj-pca4w" in r.output and "transform='proj-pca4w'" in r.output
    code = (
        "import sys, vitflow\n"
        f"df = vitflow.load_embeddings({uri!r}, feature='proj', transform='proj-pca4w')\n"
        "heavy = [m for m in ('torch', 'timm', 'ray', 'sklearn') if m in sys.modules]\n"
        "print(len(df['proj'][0]), heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["4", "[]"]
