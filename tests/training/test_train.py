"""Pretraining end to end on a local Ray: 2-worker SIMO2 and SimCLR runs on scikit-learn's
digits (upscaled), the kNN monitor rising above the random-init backbone, export -> embed,
bad-input checks, and resume after the driver is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import kill_run
from vitflow.backbone import (
    META_ARCH,
    META_DATA_CONFIG,
    META_HEAD,
    create_backbone,
    read_checkpoint,
)
from vitflow.config import ModelConfig, load_config
from vitflow.errors import ConfigError
from vitflow.synthetic import make_digits_folder, make_image_folder
from vitflow.training.config import TrainConfig
from vitflow.training.report import read_metrics
from vitflow.training.trainer import _latest_checkpoint, check_train_job, run_train
from vitflow.training.transforms import EvalTransform

STEPS = 40


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_digits_folder(root, size=32)
    return root


def job(data: Path, out: Path, method: str, **over) -> TrainConfig:
    base = {
        "method": method,
        "data": {"uri": str(data), "image_size": 32},
        "model": {
            "name": "resnet18",
            "embedding_dim": 16,
            "head_hidden_dim": 0 if method == "simo2" else 128,
        },
        "simo2": {"samples_per_class": 8, "classes_per_batch": 10},
        "simclr": {"batch_size": 128, "temperature": 0.5},
        "optim": {"lr": 1e-3, "steps": STEPS},
        "scaling": {"num_workers": 2},
        "output": {"uri": str(out), "checkpoint_every": 20, "log_every": 5},
        "monitor": {"knn_every": STEPS, "max_images": 600},
        "seed": 0,
    }
    return load_config(
        base=base, overrides=[f"{k}={v}" for k, v in over.items()], schema=TrainConfig
    )


def knn_curve(run: Path) -> list[float]:
    return [m["knn_top1"] for m in read_metrics(str(run)) if "knn_top1" in m]


@pytest.fixture(scope="module")
def simo2_run(digits, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("runs") / "simo2"
    return run_train(job(digits, out, "simo2", tracking="mlflow")), out


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_simo2_two_workers_beats_random_init(simo2_run):
    result, out = simo2_run
    knn = knn_curve(out)
    assert len(knn) == 2  # step 0 (random init) and the last step
    assert knn[-1] - knn[0] >= 0.25, knn
    metrics = read_metrics(str(out))
    losses = [m for m in metrics if "loss" in m]
    assert losses[-1]["step"] == STEPS
    assert {"loss_same", "loss_means", "loss_diff", "lr", "images_per_s"} <= set(losses[-1])
    assert losses[-1]["loss"] == pytest.approx(
        losses[-1]["loss_same"] + losses[-1]["loss_means"] + losses[-1]["loss_diff"], rel=1e-5
    )
    for png in ("loss_curves.png", "embedding_projection.png"):
        assert (out / png).stat().st_size > 10_000
    path, step = _latest_checkpoint(str(out))
    assert step == STEPS and result.steps == STEPS


@pytest.mark.ray
def test_mlflow_local_store_has_the_same_metrics(simo2_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _, out = simo2_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    logged = {m["step"]: m["loss_same"] for m in read_metrics(str(out)) if "loss_same" in m}
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss_same")}
    assert history == pytest.approx(logged)
    assert client.get_run(run_id).data.params["method"] == "simo2"


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_simclr_two_workers_beats_random_init(digits, tmp_path, ray_local):
    out = tmp_path / "simclr"
    # One DataLoader process per worker: ingest beside the Ray Train worker, as at scale.
    over = {"optim.steps": 30, "monitor.knn_every": 30, "data.loader_workers": 1}
    run_train(job(digits, out, "simclr", **over))
    knn = knn_curve(out)
    assert knn[-1] - knn[0] >= 0.2, knn


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_exported_backbone_embeds_with_no_other_setting(simo2_run, digits, tmp_path):
    from vitflow.embed import run_embed
    from vitflow.loading import load_embeddings

    result, _ = simo2_run
    ckpt = read_checkpoint(result.backbone_path)
    assert "backbone" in Path(result.backbone_path).name
    assert ckpt.metadata[META_ARCH] == "resnet18"
    assert json.loads(ckpt.metadata[META_DATA_CONFIG])["input_size"] == [3, 32, 32]
    assert json.loads(ckpt.metadata[META_HEAD]) == {"in_dim": 512, "out_dim": 16, "hidden_dim": 0}
    cfg = load_config(
        base={
            "source": {"uri": str(digits / "val")},
            "model": {"checkpoint": result.backbone_path},  # no name, no kwargs, no preprocessing
            "features": [{"name": "emb", "pool": "avg"}, {"name": "proj", "source": "head"}],
            "output": {"uri": str(tmp_path / "emb")},
        }
    )
    res = run_embed(cfg)
    assert res.error == 0 and res.manifest["model"]["data_config"]["input_size"] == [3, 32, 32]
    df = load_embeddings(str(tmp_path / "emb"))
    # Reference: the training-time eval transform, backbone, head, L2 — by hand.
    bb = create_backbone(ModelConfig(checkpoint=result.backbone_path))
    dc = bb.data_config
    tf = EvalTransform(32, dc["mean"], dc["std"])
    from vitflow.decode import decode_image

    x = torch.stack([tf(decode_image(Path(p).read_bytes())) for p in df["path"][:16]])
    with torch.no_grad():
        pooled = bb.model(x)
        proj = torch.nn.functional.normalize(bb.head(pooled), dim=-1).numpy()
        emb = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(np.stack(df["proj"][:16].to_numpy()), proj, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack(df["emb"][:16].to_numpy()), emb, rtol=1e-4, atol=1e-5)


# --- bad input: each fails before Ray starts, naming the fix ------------------------------


def test_bad_training_input_fails_fast_naming_the_fix(tmp_path, digits):
    flat = tmp_path / "flat"
    make_image_folder(flat, classes=("only",), per_class=3, splits=None)
    with pytest.raises(ConfigError, match="at least 2 — one subfolder per class"):
        check_train_job(job(flat, tmp_path / "r", "simo2"))
    with pytest.raises(ConfigError, match="set it to at most 10"):
        check_train_job(job(digits, tmp_path / "r", "simo2", **{"simo2.classes_per_batch": 12}))
    with pytest.raises(ConfigError, match="not divisible by scaling.num_workers"):
        job(digits, tmp_path / "r", "simclr", **{"simclr.batch_size": 101})
    with pytest.raises(ConfigError, match="multiple of the worker count"):
        job(digits, tmp_path / "r", "simo2", **{"simo2.classes_per_batch": 5})
    small = tmp_path / "small"
    make_image_folder(small, classes=("a", "b", "c", "d"), per_class=3, splits=None)
    few = {"simo2.classes_per_batch": 4, "data.holdout_fraction": 0.0}
    with pytest.raises(ConfigError, match="replacement"):
        check_train_job(
            job(small, tmp_path / "r", "simo2", **few, **{"simo2.replacement": "never"})
        )
    # 'auto' samples a small class with replacement (and says so in a warning) instead.
    check_train_job(job(small, tmp_path / "r", "simo2", **few))


# --- resume after the driver is killed ------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rerun_after_killed_driver_resumes_and_finishes(digits, tmp_path):
    out = tmp_path / "run"
    cfg_file = tmp_path / "job.yaml"
    data = job(
        digits,
        out,
        "simo2",
        **{"optim.steps": 30, "output.checkpoint_every": 5, "monitor.knn_every": 0},
    ).model_dump(mode="json")
    cfg_file.write_text(yaml.safe_dump(data))
    ray_tmp = Path("/tmp") / f"vitflow-resume-{os.getpid()}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    cmd = [sys.executable, "-m", "vitflow.cli", "train", str(cfg_file)]
    first = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _latest_checkpoint(str(out))[1] < 10:
            time.sleep(1)
    finally:
        kill_run(first, ray_tmp)
    killed_at = _latest_checkpoint(str(out))[1]
    assert 10 <= killed_at < 30, killed_at
    second = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=400, start_new_session=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from  : step" in second.stdout
    assert _latest_checkpoint(str(out))[1] == 30
    steps = [m["step"] for m in read_metrics(str(out)) if "loss" in m]
    assert steps[-1] == 30 and max(steps) == 30
