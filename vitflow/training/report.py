"""Training metrics: a JSON-lines log (optionally mirrored to MLflow) and the plots read from it.

``metrics.jsonl`` in the run folder is the source of truth: it needs nothing installed, lives
next to the checkpoints (local or object store), and survives restarts. MLflow is an optional
mirror for browsing runs. Plots are drawn with matplotlib's Agg canvas, never pyplot, so
nothing needs a display and no global backend is switched.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

METRICS_FILE = "metrics.jsonl"
MLFLOW_RUN_FILE = "mlflow_run.json"  # remembers the MLflow run so a resumed run continues it
TRACKING_MODES = ("none", "mlflow")


def _scalar(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers, so callers can log ``loss`` tensors directly."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> ``{"a.b": "value"}``, the flat string form MLflow stores."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _import_mlflow():
    try:
        import mlflow
    except ImportError as e:
        raise ImportError(
            "MetricsLogger(tracking='mlflow') needs MLflow: pip install mlflow-skinny"
        ) from e
    return mlflow


class MetricsLogger:
    """Append training metrics to ``run_dir/metrics.jsonl`` and, optionally, to MLflow.

    Reopening a logger on an existing run folder (a resumed run) keeps the earlier lines and
    continues the same MLflow run. Create it on one worker only (rank 0).

    With ``tracking="mlflow"`` the tracking URI is ``$MLFLOW_TRACKING_URI`` when set, else a
    file store at ``run_dir/mlruns``. MLflow 3 keeps its file store behind an opt-in, so
    that default sets ``MLFLOW_ALLOW_FILE_STORE=true`` in this process unless already set.

    Args:
        run_dir: run folder, local path or fsspec URL (``s3://bucket/runs/a``).
        tracking: ``"none"`` (JSON lines only) or ``"mlflow"``. Default ``"none"``.
        experiment: MLflow experiment name, created if missing. Default ``"vitflow"``.
        run_name: MLflow run name. Default: MLflow picks one.
        params: run configuration, logged to MLflow once when its run is created; nested
            dicts are flattened to dotted keys.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with MetricsLogger(d) as log:
        ...     log.log(1, loss=0.5, lr=1e-3)
        >>> read_metrics(d)[0]["loss"]
        0.5
    """

    def __init__(
        self,
        run_dir: str,
        tracking: str = "none",
        experiment: str = "vitflow",
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
    ):
        if tracking not in TRACKING_MODES:
            raise ValueError(
                f"Expected tracking to be one of {TRACKING_MODES}, but got {tracking!r}"
            )
        self.fs, self.root = url_to_fs(run_dir)
        self.fs.makedirs(self.root, exist_ok=True)
        self.path = posixpath.join(self.root, METRICS_FILE)
        self._local = isinstance(self.fs, LocalFileSystem)
        self._client = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        if tracking == "mlflow":
            self._start_mlflow(run_dir, experiment, run_name, params or {})

    def _start_mlflow(self, run_dir: str, experiment: str, run_name: str | None, params: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            if not self._local:
                raise ValueError(
                    f"MLflow's default file store needs a local run_dir, but got {run_dir!r}; "
                    "set MLFLOW_TRACKING_URI to a tracking server or database"
                )
            uri = Path(self.root, "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = _import_mlflow()
        from mlflow.entities import Param

        self.tracking_uri = uri
        self._client = client = mlflow.tracking.MlflowClient(uri)
        marker = posixpath.join(self.root, MLFLOW_RUN_FILE)
        if self.fs.exists(marker):
            saved = json.loads(self.fs.cat_file(marker))
            if saved.get("tracking_uri") == uri:
                self.run_id = saved["run_id"]
                client.update_run(self.run_id, status="RUNNING")
                return  # params stay as first logged: MLflow refuses to change them
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        self.run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        flat = [Param(k, v) for k, v in _flatten(params).items()]
        if flat:
            client.log_batch(self.run_id, params=flat)
        self.fs.pipe_file(marker, json.dumps({"run_id": self.run_id, "tracking_uri": uri}).encode())

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, "time": unix_seconds, **metrics}`` as one JSON line.

        Non-numeric values go to the JSON line only (MLflow takes numbers).

        Args:
            step: training step (optimizer updates so far).
            **metrics: values by name; numpy / torch scalars are converted.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise ValueError(f"Expected step to be an int, but got {step!r}")
        if "time" in metrics:
            raise ValueError("Expected metric names other than 'time', but got 'time'")
        now = time.time()
        record = {"step": int(step), "time": now} | {k: _scalar(v) for k, v in metrics.items()}
        line = json.dumps(record, default=str) + "\n"
        if self._local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        else:
            # Object stores cannot append: rewrite the file with the new line at the end.
            old = self.fs.cat_file(self.path) if self.fs.exists(self.path) else b""
            self.fs.pipe_file(self.path, old + line.encode())
        if self._client is not None:
            from mlflow.entities import Metric

            numbers = [
                Metric(k, float(v), int(now * 1000), int(step))
                for k, v in record.items()
                if k not in ("step", "time")
                and isinstance(v, int | float)
                and not isinstance(v, bool)
            ]
            if numbers:
                self._client.log_batch(self.run_id, metrics=numbers)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run (no-op without MLflow, or when already closed)."""
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)
            self._client = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in the order they were logged.

    Raises:
        FileNotFoundError: no metrics file in ``run_dir``.
        ValueError: a line is not JSON (names the file and line).
    """
    fs, root = url_to_fs(run_dir)
    path = posixpath.join(root, METRICS_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir!r}; was a MetricsLogger used?")
    out = []
    for i, line in enumerate(fs.cat_file(path).decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not a JSON line: {line[:80]!r}") from e
    return out


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    # A resumed run re-logs steps after its checkpoint; the later value is the one that
    # counts, and sorting by step keeps the curve from jumping back.
    by_step: dict[int, float] = {}
    for m in metrics:
        v = m.get(key)
        if "step" in m and isinstance(v, int | float) and not isinstance(v, bool):
            by_step[int(m["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _save(fig, out_png: str) -> None:
    """Render an Agg figure to PNG at a local path or fsspec URL."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    fs, path = url_to_fs(out_png)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())


def plot_loss_curves(
    metrics: list[dict[str, Any]], out_png: str, title: str = "Training curves"
) -> None:
    """One PNG with a panel per loss term (keys starting ``loss``) and ``knn_top1``, vs step.

    Args:
        metrics: records as from :func:`read_metrics`.
        out_png: output path or fsspec URL.
        title: figure title.
    """
    from matplotlib.figure import Figure

    keys = sorted({k for m in metrics for k in m if k.startswith("loss")})
    keys.sort(key=lambda k: k != "loss")  # the total first, then its terms
    keys += ["knn_top1"] if any("knn_top1" in m for m in metrics) else []
    if not keys:
        raise ValueError("Expected metrics with 'loss*' or 'knn_top1' keys, but got none")
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        steps, values = _series(metrics, key)
        knn = key == "knn_top1"
        ax.plot(steps, values, marker="o" if knn else None, ms=3, color="C1" if knn else "C0")
        ax.set(title=key, xlabel="step", ylabel="top-1 accuracy" if knn else key)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    _save(fig, out_png)


def plot_projection(x: np.ndarray, labels: Sequence, out_png: str, title: str = "") -> None:
    """PCA and t-SNE maps of embeddings, side by side, coloured by class.

    t-SNE uses ``perplexity=min(30, (n - 1) / 3)``, PCA initialisation and a fixed seed, so
    the same embeddings give the same picture. Rows above 50 dimensions are reduced to 50
    with PCA first, as is usual for t-SNE: much faster, and the map is the same in practice.

    Args:
        x: embeddings ``(n, d)``, ``n >= 4``, ``d >= 2``.
        labels: class of each row, ``n`` values (ints or strings).
        out_png: output path or fsspec URL.
        title: figure title.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] < 4 or x.shape[1] < 2:
        raise ValueError(f"Expected x of shape (n >= 4, d >= 2), but got {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"Expected {x.shape[0]} labels, but got shape {labels.shape}")
    n = x.shape[0]
    pca = PCA(n_components=2, random_state=0).fit(x)
    xt = PCA(n_components=50, random_state=0).fit_transform(x) if min(x.shape) > 50 else x
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=0)
    maps = [
        (pca.transform(x), f"PCA ({100 * pca.explained_variance_ratio_.sum():.0f}% variance)"),
        (tsne.fit_transform(xt), f"t-SNE (perplexity {tsne.perplexity:.0f})"),
    ]
    classes = np.unique(labels)
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    colors = cmap(np.linspace(0, 1, len(classes))) if len(classes) > 20 else cmap.colors
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    for ax, (xy, name) in zip(fig.subplots(1, 2), maps, strict=True):
        for c, color in zip(classes, colors, strict=False):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=color, label=str(c), alpha=0.8)
        ax.set(title=name, xticks=[], yticks=[])
    if len(classes) <= 20:  # beyond that a legend is unreadable and hides the map
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", markerscale=2)
    fig.suptitle(title or f"{n} embeddings, {len(classes)} classes")
    _save(fig, out_png)
