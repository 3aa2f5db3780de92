"""Dense feature sets as a job output (``features: [{dense: true, shift: ...}]``): each
image's patch-token map, stored float16, against plain timm written out by hand (eval
transform, forward_intermediates as a map; for the pixel-shift map: roll, forward, upsample,
unroll, average)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitflow import columns
from vitflow.analysis.source import open_source
from vitflow.backbone import data_config
from vitflow.config import load_config
from vitflow.decode import decode_image
from vitflow.embed import prepare_embed, run_embed
from vitflow.errors import ConfigError, ModelError
from vitflow.loading import load_dense, load_embeddings
from vitflow.synthetic import make_image_folder

NAME = "vit_small_patch16_224"
# A width (24) unlike the input (32): a map laid out with one for the other shows.
KW = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}
PATCH = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **KW).eval()
    save_file(model.state_dict(), root / "w.safetensors")
    make_image_folder(root / "images", per_class=2, splits=("train",), with_bad_files=True)
    return root, model


def job(root: Path, out: str, **output):
    return load_config(
        base={
            "source": {"uri": str(root / "images")},
            "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "w.safetensors")},
            "features": [
                {"name": "emb"},
                {"name": "patches", "dense": True, "normalize": "none"},
                {
                    "name": "fine",
                    "dense": True,
                    "layers": [0, -1],
                    "aggregate": "mean",
                    "shift": {"pixels": [4], "neighbourhood": "von_neumann"},
                },
            ],
            "output": {"uri": str(root / out), **output},
            "compute": {"batch_size": 3},
        }
    )


def timm_input(model, path: str) -> torch.Tensor:
    transform = timm.data.create_transform(**data_config(model), is_training=False)
    return transform(decode_image(Path(path).read_bytes()))[None]


def timm_map(model, x: torch.Tensor, indices) -> torch.Tensor:
    """(1, D, h, w): the blocks' patch tokens as timm lays them out as a map."""
    with torch.no_grad():
        maps = model.forward_intermediates(
            x, indices=indices, output_fmt="NCHW", intermediates_only=True
        )
    return torch.stack(maps).mean(dim=0)


def hand_shift_map(model, x: torch.Tensor) -> np.ndarray:
    """Roll the image by 4 px each way (and not at all), take each map, spread each token
    over its 2x2 cells of stride 4, roll back, average; then each cell unit length."""
    total = []
    for dy, dx in [(0, 0), (0, 4), (4, 0), (0, -4), (-4, 0)]:
        fmap = timm_map(model, torch.roll(x, (dy, dx), dims=(2, 3)), [0, 1])
        up = F.interpolate(fmap, scale_factor=2, mode="nearest")
        total.append(torch.roll(up, (-dy // 4, -dx // 4), dims=(2, 3)))
    mean = torch.stack(total).mean(dim=0)
    return F.normalize(mean, dim=1)[0].permute(1, 2, 0).numpy()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_dense_maps_equal_timm_and_the_hand_written_pixel_shift(files, ray_local):
    root, model = files
    result = run_embed(job(root, "out"))
    entry = result.manifest["features"]["fine"]
    assert entry["dense"] and entry["shape"] == [8, 8, 24] and entry["stride"] == 4
    assert result.manifest["features"]["patches"]["shape"] == [4, 4, 24]
    df, maps = load_dense(str(root / "out"), "patches")
    _, fine = load_dense(str(root / "out"), "fine")
    assert maps.dtype == np.float16 and maps.shape == (result.ok, 4, 4, 24)
    for i, path in enumerate(df[columns.PATH]):
        x = timm_input(model, path)
        want = timm_map(model, x, [1])[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(maps[i].astype(np.float32), want, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(
            fine[i].astype(np.float32), hand_shift_map(model, x), rtol=2e-3, atol=2e-3
        )
    # The pooled vector beside them is untouched, and is all that scoring tools see; the
    # maps are read only when named.
    emb = load_embeddings(str(root / "out"), feature="emb", include_errors=True)
    assert len(emb) == result.listed and emb["emb"].isna().sum() == result.error > 0
    assert open_source(str(root / "out")).dims == {"emb": 24}
    plain = load_embeddings(str(root / "out"))
    assert "emb" in plain and "fine" not in plain and "patches" not in plain
    one = load_embeddings(str(root / "out"), feature="patches")
    assert np.stack(one["patches"]).shape == (result.ok, 4 * 4 * 24)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_dense_picture_shows_sampled_images_beside_their_maps(files, ray_local):
    from vitflow.analysis.dense_view import dense_preview

    root, _ = files
    if not (root / "out" / columns.MANIFEST_NAME).exists():
        run_embed(job(root, "out"))
    where = dense_preview(str(root / "out"), "fine", images=3)
    assert where.endswith("_dense/fine.png")
    png = Path(where).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(Exception, match="not a dense map"):
        load_dense(str(root / "out"), "emb")
    # The picture is vitflow's own: --overwrite still replaces the output.
    prepare_embed(job(root, "out"), overwrite=True)


def test_parts_of_dense_maps_stay_small_enough_to_compact(files, monkeypatch):
    from vitflow import embed

    root, _ = files
    row_bytes = 2 * (4 * 4 * 24 + 8 * 8 * 24)
    monkeypatch.setattr(embed, "MAX_DENSE_PART_BYTES", 10 * row_bytes)
    assert prepare_embed(job(root, "p1")).cfg.output.rows_per_file == 10  # default lowered
    with pytest.raises(ConfigError, match="set output.rows_per_file to 10 or less"):
        prepare_embed(job(root, "p2", rows_per_file=50))


def test_dense_jobs_that_cannot_work_are_refused_with_the_fix(files):
    root, _ = files
    base = job(root, "never").model_dump(mode="json")
    with pytest.raises(ConfigError, match="shift upscales a dense map"):
        load_config(base={**base, "features": [{"name": "f", "shift": {"pixels": [4]}}]})
    bad_stride = {"name": "f", "dense": True, "shift": {"pixels": [4], "stride": 3}}
    with pytest.raises(ModelError, match="must divide"):
        prepare_embed(load_config(base={**base, "features": [bad_stride]}))
    from vitflow.features import FeatureExtractor
    from vitflow.matrix import MatrixConfig

    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    from vitflow.config import FeatureConfig

    with pytest.raises(ModelError, match="maps of different sizes"):
        FeatureExtractor(cnn, [FeatureConfig(name="d", dense=True, layers=[-2, -1])], (3, 64, 64))
    with pytest.raises(ModelError, match="does not divide"):
        FeatureExtractor(cnn, [FeatureConfig(name="d", dense=True)], (3, 70, 70))
    with pytest.raises(ConfigError, match="only dense feature sets"):
        load_config(
            base={
                "kind": "matrix",
                "models": [{"name": "m", "model": base["model"], "features": [bad_stride]}],
                "datasets": [{"name": "d", "source": {"uri": str(root / "images")}}],
                "output": {"uri": str(root / "mx")},
                "ood": {"reference": "d"},
            },
            schema=MatrixConfig,
        )
    from vitflow.reindex import plan_reindex

    with pytest.raises(ConfigError, match="Delta Lake has no float16"):
        plan_reindex(job(root, "index"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_dense_maps_kept_as_principal_components_of_a_pca_fitted_on_a_sample(files, ray_local):
    """The PCA equals scikit-learn's on the same cells (the sample is every image here), is
    stored with the output, and each stored map is its cells projected on it."""
    from safetensors.numpy import load_file
    from sklearn.decomposition import PCA

    root, model = files
    cfg = job(root, "pca_out").model_copy(
        update={
            "features": load_config(
                base={
                    **job(root, "x").model_dump(mode="json"),
                    "features": [{"name": "pc", "dense": True, "pca": 4, "pca_sample": 1000}],
                }
            ).features
        }
    )
    result = run_embed(cfg)
    entry = result.manifest["features"]["pc"]
    assert entry["shape"] == [4, 4, 4] and entry["stride"] == PATCH
    assert entry["pca"]["components"] == 4
    assert entry["pca"]["fitted_on_images"] == result.ok
    stored = load_file(str(root / "pca_out" / "_dense" / "pca.safetensors"))
    df, maps = load_dense(str(root / "pca_out"), "pc")
    cells = [
        F.normalize(timm_map(model, timm_input(model, p), [1]), dim=1)[0].permute(1, 2, 0).numpy()
        for p in df[columns.PATH]
    ]
    ref = PCA(n_components=4, random_state=0).fit(
        np.concatenate([c.reshape(-1, 24) for c in cells])
    )
    np.testing.assert_allclose(stored["pc.mean"], ref.mean_, atol=1e-5)
    agree = np.abs(np.sum(stored["pc.components"] * ref.components_, axis=1))
    np.testing.assert_allclose(agree, 1.0, atol=1e-3)  # the same axes (a sign is arbitrary)
    comps, mean = stored["pc.components"], stored["pc.mean"]
    for got, c in zip(maps, cells, strict=True):
        np.testing.assert_allclose(got.astype(np.float32), (c - mean) @ comps.T, atol=3e-3)
    with pytest.raises(ConfigError, match="pca reduces a dense map"):
        load_config(base={**cfg.model_dump(mode="json"), "features": [{"name": "v", "pca": 4}]})


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_matrix_job_projects_every_split_of_a_dataset_on_one_pca(files, ray_local, tmp_path):
    """The PCA is fitted once per model and dataset, on its first split (train), and every
    split's maps are projected on it, also a split embedded again by --resume."""
    import json
    import shutil

    from safetensors.numpy import load

    from vitflow.matrix import MatrixConfig, run_matrix

    root, model = files
    make_image_folder(tmp_path / "data", per_class=2, splits=("train", "val"))
    cfg = load_config(
        base={
            "kind": "matrix",
            "models": [
                {
                    "name": "vit",
                    "model": {
                        "name": NAME,
                        "kwargs": KW,
                        "checkpoint": str(root / "w.safetensors"),
                    },
                    "features": [{"name": "emb"}, {"name": "pc", "dense": True, "pca": 4}],
                }
            ],
            "datasets": [{"name": "d", "source": {"uri": str(tmp_path / "data")}}],
            "output": {"uri": str(tmp_path / "out")},
            "compute": {"batch_size": 4},
        },
        schema=MatrixConfig,
    )
    run_matrix(cfg)
    pair = tmp_path / "out" / "vit" / "d"
    fitted = (pair / "train" / "_dense" / "pca.safetensors").read_bytes()
    assert (pair / "val" / "_dense" / "pca.safetensors").read_bytes() == fitted
    stored = load(fitted)
    comps, mean = stored["pc.components"], stored["pc.mean"]
    df, maps = load_dense(str(tmp_path / "out"), "pc", model="vit", dataset="d")
    assert set(df["split"]) == {"train", "val"}
    for path, got in zip(df[columns.PATH], maps, strict=True):
        x = timm_input(model, path)
        cells = F.normalize(timm_map(model, x, [1]), dim=1)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got.astype(np.float32), (cells - mean) @ comps.T, atol=3e-3)
    train_ok = load_embeddings(str(pair / "train"))
    for split in ("train", "val"):
        manifest = json.loads((pair / split / "_manifest.json").read_text())
        assert manifest["features"]["pc"]["pca"]["fitted_on_images"] == len(train_ok)
    # --resume embeds a split again with the pair's PCA, not a new fit on it: here one that
    # a killed run left with nothing but its lock file (it had not begun).
    from vitflow.locking import LOCK_NAME

    shutil.rmtree(pair / "val")
    (pair / "val").mkdir()
    (pair / "val" / LOCK_NAME).write_text("")
    run_matrix(cfg, resume=True)
    assert (pair / "val" / "_dense" / "pca.safetensors").read_bytes() == fitted
