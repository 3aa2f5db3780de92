"""Metrics log round trips (local, object store, MLflow) and the PNGs drawn from it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from vitflow.training.report import (
    MetricsLogger,
    plot_loss_curves,
    plot_projection,
    read_metrics,
)


def _losses(step: int) -> dict[str, float]:
    same, means, diff = 1 / (step + 1), 0.5 / (step + 2), 0.2 + 0.01 * step
    return dict(loss=same + means + diff, loss_same=same, loss_means=means, loss_diff=diff)


def test_jsonl_round_trip_and_resume(tmp_path):
    run = str(tmp_path / "run")
    with MetricsLogger(run) as log:
        log.log(0, **_losses(0), lr=1e-3, phase="warmup")
        log.log(1, loss=torch.tensor(0.25), knn_top1=np.float32(0.5))
    with MetricsLogger(run) as log:  # resumed run: earlier lines stay
        log.log(2, loss=0.125)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0] | {"time": 0} == {
        "step": 0,
        "time": 0,
        **_losses(0),
        "lr": 1e-3,
        "phase": "warmup",
    }
    assert records[1]["loss"] == 0.25 and records[1]["knn_top1"] == 0.5
    assert all(isinstance(r["time"], float) for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


def test_object_store_appends_by_rewrite():
    run = "memory://vitflow-test/run"
    for step in (0, 1):
        MetricsLogger(run).log(step, loss=float(step))
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(0, 0.0), (1, 1.0)]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON line"):
        read_metrics(str(tmp_path))


def test_logger_validation(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Expected tracking to be one of"):
        MetricsLogger(str(tmp_path), tracking="wandb")
    with pytest.raises(ValueError, match="Expected step to be an int"):
        MetricsLogger(str(tmp_path)).log(1.5, loss=1.0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="set MLFLOW_TRACKING_URI"):
        MetricsLogger("memory://vitflow-test/remote", tracking="mlflow")


def test_mlflow_file_store_round_trip(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # setenv first so teardown also undoes the opt-in the logger sets in os.environ.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    run = tmp_path / "run"
    params = {"lr": 1e-3, "model": {"name": "vit_tiny", "layers": 4}}
    log = MetricsLogger(str(run), tracking="mlflow", experiment="exp", run_name="r1", params=params)
    assert log.tracking_uri == (run / "mlruns").resolve().as_uri()
    for step in range(3):
        log.log(step, **_losses(step), phase="train")
    log.close()
    # Resuming continues the same MLflow run rather than starting another.
    resumed = MetricsLogger(str(run), tracking="mlflow", experiment="exp", params=params)
    assert resumed.run_id == log.run_id
    resumed.log(3, loss=0.5)
    resumed.close()

    client = mlflow.tracking.MlflowClient(log.tracking_uri)
    history = client.get_metric_history(log.run_id, "loss")
    expected = [(s, _losses(s)["loss"]) for s in range(3)] + [(3, 0.5)]
    assert sorted((m.step, m.value) for m in history) == expected
    data = client.get_run(log.run_id).data
    assert data.params == {"lr": "0.001", "model.name": "vit_tiny", "model.layers": "4"}
    assert "phase" not in data.metrics  # strings stay in the JSON lines only
    assert client.get_run(log.run_id).info.status == "FINISHED"
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == log.run_id


def test_missing_mlflow_names_the_install(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` fail
    with pytest.raises(ImportError, match="pip install mlflow-skinny"):
        MetricsLogger(str(tmp_path), tracking="mlflow")


def _check_png(path, min_width=300):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > min_width and im.height > 200
        # Something was drawn: not a single flat colour.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 50


def test_plot_loss_curves(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLogger(run)
    for step in range(0, 200, 5):
        log.log(step, **_losses(step))
        if step % 50 == 0:
            log.log(step, knn_top1=0.2 + step / 400)
    out = tmp_path / "plots" / "loss.png"
    plot_loss_curves(read_metrics(run), str(out))
    _check_png(out)
    with pytest.raises(ValueError, match="'loss\\*' or 'knn_top1'"):
        plot_loss_curves([{"step": 0, "lr": 1.0}], str(tmp_path / "none.png"))


def test_plot_projection(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 64)) * 4
    y = np.repeat(["ant", "bee", "cat", "dog", "eel"], 24)
    x = centers[np.searchsorted(np.unique(y), y)] + rng.normal(size=(len(y), 64))
    out = tmp_path / "proj.png"
    # One OpenMP thread: t-SNE's threads spin-wait and crawl on a busy 2-core CI box.
    with threadpool_limits(1):
        plot_projection(x, y, str(out), title="five clusters")
    _check_png(out)
    with pytest.raises(ValueError, match="Expected 120 labels"):
        plot_projection(x, y[:10], str(out))
