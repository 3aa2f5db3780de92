"""Many models x many datasets in one job (``kind: matrix``, ``vitflow matrix JOB.yaml``).

Teams keep embeddings as ``MODEL/DATASET/SPLIT`` folders and load a slice with one call. A
matrix job names several models (each with its own folder name, weights and feature sets)
and several datasets (each with its own source), and writes::

    OUT/_matrix.json                       what the job holds: models, datasets, splits
    OUT/<model>/<dataset>/_manifest.json   one per model/dataset: its splits, rows, features
    OUT/<model>/<dataset>/<split>/         a standard embed output (parts + _manifest.json)
    OUT/<model>/_ood/                      with ``ood:``, each image's kNN distance to the
                                           reference dataset, per-dataset summary, box plot

Each ``<split>`` folder is an ordinary ``vitflow embed`` output of that split's images, so
everything that reads one (``load_embeddings``, ``vitflow eval``, duckdb) reads it, and
``--resume`` finishes the job: a split already complete is kept if its manifest's vector
identity is this job's (weights by content, model, features, preprocessing, label rules;
else it is refused), one interrupted is finished by embed's own resume, one not started is
run. :func:`vitflow.load_embeddings`
takes ``model=`` and ``dataset=`` (and ``split=``) to load a slice; ``vitflow ls OUT``
prints the table of what is there.

A dataset's splits are the ``splits:`` it names (split -> folder or URL), else the
sub-folders of its source named train, validation, val or test, else the whole source as
one split named ``all``. A source with split folders and other folders or images beside
them is refused rather than half embedded. How each split is listed: :func:`_within`.

Everything runs in one Ray session, dataset by dataset and split by split. A split's
source is listed once for all models, and the models whose inputs are made the same way (one
resize and crop; normalisations may differ, they run on the device) embed it in one stream:
each file is read and decoded once, its pixels go onto the device once, and one model actor
runs every such model on them (:func:`vitflow.embed.run_embed_many`). Models with another
resize or crop get a stream of their own. Each output's manifest names the outputs it
shared its stream with (``execution.shared_stream``). An interrupted output is finished alone
by embed's own resume.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from vitflow import columns
from vitflow.config import (
    ComputeConfig,
    EmbedConfig,
    FeatureConfig,
    ModelConfig,
    OutputConfig,
    SourceConfig,
    StorageConfig,
    _Section,
)
from vitflow.errors import ConfigError, VitflowError
from vitflow.storage import write_atomic

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SPLIT_FOLDERS = ("train", "validation", "val", "test")
WHOLE_SOURCE = "all"  # the split name of a dataset without split folders
PAIR_LAYOUT = "vitflow-matrix-pair/1"
MATRIX_INDEX = "_matrix.json"
OOD_FOLDER = "_ood"


class MatrixModel(_Section):
    """One model of a matrix job: its folder name, the model, and its feature sets."""

    name: str = Field(pattern=NAME_PATTERN, description="Folder name under the output.")
    model: ModelConfig
    features: list[FeatureConfig] = Field(
        default_factory=lambda: [FeatureConfig()],
        description="Named feature sets of this model, all from one forward pass.",
    )


class MatrixDataset(_Section):
    """One dataset of a matrix job: its folder name, its source, and optionally its splits."""

    name: str = Field(pattern=NAME_PATTERN, description="Folder name under each model.")
    source: SourceConfig
    splits: dict[str, str] | None = Field(
        None,
        description="split name -> folder or URL of its images; null: the source's train/"
        "validation/val/test sub-folders, else the whole source as one split named all.",
    )

    @model_validator(mode="after")
    def _split_names(self) -> MatrixDataset:
        import re

        for name in self.splits or {}:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"split name {name!r} must match {NAME_PATTERN}")
        return self


class OodConfig(_Section):
    """How far out of distribution each dataset is, for every model: each image's mean cosine
    distance to its k nearest images of a reference dataset."""

    reference: str = Field(description="The in-distribution dataset (one of datasets' names).")
    reference_split: str | None = Field(
        None, description="Its split to compare with; null: train if it has one, else its first."
    )
    k: int = Field(10, ge=1, description="Neighbours per image.")
    feature: str | None = Field(None, description="Vector column; null: each model's first.")


class MatrixConfig(_Section):
    """A job of several models over several datasets. Load it with
    ``load_config(path, schema=MatrixConfig)``."""

    kind: Literal["matrix"] = "matrix"
    models: list[MatrixModel] = Field(min_length=1)
    datasets: list[MatrixDataset] = Field(min_length=1)
    output: OutputConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ood: OodConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MatrixConfig:
        for what, names in (
            ("model", [m.name for m in self.models]),
            ("dataset", [d.name for d in self.datasets]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        for m in self.models:
            EmbedConfig.model_validate(  # each model's feature sets, checked as embed does
                {
                    "source": {"uri": "."},
                    "model": m.model,
                    "features": m.features,
                    "output": {"uri": "."},
                }
            )
        if self.ood is not None:
            names = [d.name for d in self.datasets]
            if self.ood.reference not in names:
                raise ValueError(
                    f"ood.reference {self.ood.reference!r} is not a dataset of this job; "
                    f"use one of {', '.join(names)}"
                )
            if self.ood.feature is not None:
                missing = [
                    m.name
                    for m in self.models
                    if self.ood.feature not in {f.name for f in m.features if not f.dense}
                ]
                if missing:
                    raise ValueError(
                        f"ood.feature {self.ood.feature!r} is not a feature set of model(s) "
                        f"{', '.join(missing)} with vectors (dense maps are not scored)"
                    )
            for m in self.models:
                if all(f.dense for f in m.features):
                    raise ValueError(
                        f"ood scores vectors, and model {m.name!r} has only dense feature "
                        "sets; give it a vector one too"
                    )
        return self


@dataclass
class MatrixResult:
    """What a matrix run wrote: one entry per (model, dataset, split)."""

    output_uri: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    ood: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> files written
    mae: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> MAE loss summary
    seconds: float = 0.0


def dataset_splits(ds: MatrixDataset, storage: StorageConfig) -> dict[str, str]:
    """``{split: uri}`` of a dataset (see the module docstring for the rule)."""
    if ds.splits:
        return dict(ds.splits)
    from vitflow.storage import open_fs

    uri = ds.source.uri
    fs, path = open_fs(uri, storage.options_for(uri))
    if not fs.isdir(path):
        raise ConfigError(f"dataset {ds.name!r}: source {uri!r} is not a folder")
    entries = [
        e
        for e in fs.ls(path, detail=True)
        if not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    ]
    found, other = {}, []
    for e in entries:
        base = posixpath.basename(e["name"].rstrip("/"))
        is_dir = e.get("type") == "directory"
        if is_dir and base.lower() in SPLIT_FOLDERS:
            if any(k.lower() == base.lower() for k in found):
                raise ConfigError(
                    f"dataset {ds.name!r}: {uri} has two folders for one split "
                    f"({', '.join(sorted(k for k in found if k.lower() == base.lower()))}, {base}); "
                    "name its splits under datasets[].splits"
                )
            found[base] = uri.rstrip("/") + "/" + base
        elif is_dir or base.lower().endswith(ds.source.extensions):
            other.append(base + ("/" if is_dir else ""))  # images no split would embed
    if not found:
        return {WHOLE_SOURCE: uri}
    if other:
        shown = ", ".join(sorted(other)[:5]) + (", ..." if len(other) > 5 else "")
        raise ConfigError(
            f"dataset {ds.name!r}: {uri} has split folders ({', '.join(sorted(found))}) and "
            f"other folders or images beside them ({shown}), which no split would embed; name "
            "its splits under datasets[].splits, or move those into a split folder"
        )
    order = {s: i for i, s in enumerate(SPLIT_FOLDERS)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0].lower()]))


def split_job(
    cfg: MatrixConfig, m: MatrixModel, ds: MatrixDataset, split: str, uri: str
) -> EmbedConfig:
    """The ordinary embed job of one (model, dataset, split)."""
    return EmbedConfig(
        kind="embed",
        source=ds.source.model_copy(update={"uri": uri, "within": _within(ds, split, uri)}),
        model=m.model,
        features=m.features,
        output=cfg.output.model_copy(
            update={"uri": split_uri(cfg.output.uri, m.name, ds.name, split)}
        ),
        compute=cfg.compute,
        storage=cfg.storage,
    )


def _within(ds: MatrixDataset, split: str, uri: str) -> str | None:
    """How a split is listed. A split folder found under the source is read as that folder
    of it (``source.within``): its rows get the ids, labels and split a plain embed of the
    whole source gives them, so ids stay unique across the pair's splits. A split named in
    ``splits:`` is read as a folder of that name (split = its name, ids ``<split>/<path>``),
    and a list of files likewise (every row's split is its name, ids from
    ``<split>/<path as written>``), so a pair's splits read as one output. The whole source
    as one split is listed as it is."""
    if split == WHOLE_SOURCE and not ds.splits:
        return None
    return split


def split_uri(out: str, model: str, dataset: str, split: str | None = None) -> str:
    parts = [out.rstrip("/"), model, dataset] + ([split] if split else [])
    return "/".join(parts)


def run_matrix(
    cfg: MatrixConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    address: str | None = None,
    echo=None,
) -> MatrixResult:
    """Run every (model, dataset, split) of ``cfg`` in one Ray session, split by split (the
    models of a split that take the same input share one decode), writing each model/dataset
    manifest as soon as the dataset's splits are done, then the out-of-distribution scores
    if ``cfg.ood``.

    Args:
        overwrite: replace existing outputs.
        resume: keep split outputs made by this same job (same model, weights, features and
            source settings) and complete, finish interrupted ones, run the rest; an output
            the job's settings no longer match is refused.
        address: Ray cluster to attach to; default: a local one.
        echo: called with a line of progress per split (the CLI prints them).
    """
    from vitflow.embed import run_embed, run_embed_many
    from vitflow.runtime import ray_session
    from vitflow.storage import open_fs

    started = time.time()
    say = echo or (lambda line: log.info("%s", line))
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; pick one")
    _check_output_outside_sources(cfg)
    splits_of = {ds.name: dataset_splits(ds, cfg.storage) for ds in cfg.datasets}
    plan = [(m, ds, splits_of[ds.name]) for m in cfg.models for ds in cfg.datasets]
    _check_ood_reference(cfg, plan)
    jobs = {
        (m.name, ds.name, s): split_job(cfg, m, ds, s, u)
        for m, ds, splits in plan
        for s, u in splits.items()
    }
    states = {j.output.uri: _state(j) for j in jobs.values()}
    if not overwrite:
        taken = [uri for uri, state in states.items() if state != "absent"]
        if taken and not resume:
            raise ConfigError(
                f"{len(taken)} output(s) of this job exist already (first: {taken[0]}); pass "
                "--resume to finish the job, or --overwrite to replace them"
            )
        weights: dict[str, bytes] = {}
        models = {m.name: m for m in cfg.models}
        for (model_name, _, _), job in jobs.items():
            m = models[model_name]
            if states[job.output.uri] != "complete":
                continue
            if _has_pca(m):  # the weights it ran with include the PCA stored with it
                w = _model_weights(m, cfg.storage, _stored_pca(job))
            else:
                w = weights[m.name] = weights.get(m.name) or _model_weights(m, cfg.storage)
            if not _made_by(job, w):
                raise ConfigError(
                    f"{job.output.uri} was embedded with other settings than this job's "
                    "(weights, model, features, preprocessing or label rules): --resume keeps "
                    "only what this job would write; pass --overwrite to embed it again"
                )
    pair_splits = [(ds, splits_of[ds.name]) for ds in cfg.datasets]
    result = MatrixResult(cfg.output.uri)
    fs, out = open_fs(cfg.output.uri, cfg.storage.options_for(cfg.output.uri))
    fs.makedirs(out, exist_ok=True)
    index = {
        "kind": "matrix",
        "models": [m.name for m in cfg.models],
        "datasets": {ds.name: list(splits) for ds, splits in pair_splits},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(fs, posixpath.join(out, MATRIX_INDEX), index)
    with ray_session(address, cfg.compute.local_num_cpus):
        # Split by split: the models' fresh outputs of one split run together, so each file
        # is listed once and read and decoded once per distinct resize and crop
        # (run_embed_many); an interrupted output is resumed alone, a complete one kept.
        runs: dict[tuple[str, str, str], dict] = {}
        for ds, splits in pair_splits:
            # Dense maps kept as principal components: every split of a pair is projected on
            # one PCA, fitted on its train split (else its first) and reused for the others,
            # or the one an output of the pair already holds (--resume). So train runs first.
            pair_pca = {
                m.name: None
                if overwrite
                else _pair_pca([jobs[(m.name, ds.name, s)] for s in splits])
                for m in cfg.models
                if _has_pca(m)
            }
            for split in sorted(splits, key=lambda s: s.lower() != "train"):
                fresh = []
                for m in cfg.models:
                    job = jobs[(m.name, ds.name, split)]
                    state = states[job.output.uri]
                    if resume and state == "complete":
                        manifest = _read_json(job.output.uri, columns.MANIFEST_NAME, cfg.storage)
                        say(f"{m.name}/{ds.name}/{split}: complete, kept")
                    elif resume and state == "interrupted":
                        res = run_embed(job, resume=True, dense_pca=pair_pca.get(m.name))
                        manifest = res.manifest
                        say(_ran(m.name, ds.name, split, res))
                    else:
                        fresh.append(m)
                        continue
                    runs[(m.name, ds.name, split)] = _run_row(m, ds, split, job, manifest)
                done = (
                    run_embed_many(
                        [jobs[(m.name, ds.name, split)] for m in fresh],
                        overwrite=overwrite,
                        dense_pca=[pair_pca.get(m.name) for m in fresh],
                    )
                    if fresh
                    else []
                )
                for m, res in zip(fresh, done, strict=True):
                    say(_ran(m.name, ds.name, split, res))
                    job = jobs[(m.name, ds.name, split)]
                    runs[(m.name, ds.name, split)] = _run_row(m, ds, split, job, res.manifest)
                for m in cfg.models:
                    if _has_pca(m) and pair_pca[m.name] is None:
                        pair_pca[m.name] = _stored_pca(jobs[(m.name, ds.name, split)])
            for m in cfg.models:
                pair = [runs[(m.name, ds.name, s)] for s in splits]
                # Loadable (and listed by `vitflow ls`) as soon as its splits are done.
                _write_pair_manifest(cfg, m, ds, pair)
        result.runs = [runs[(m.name, ds.name, s)] for m, ds, splits in plan for s in splits]
        if cfg.ood is not None:
            for m in cfg.models:
                result.ood[m.name] = write_ood(cfg, m, result.runs)
                say(f"{m.name}: out-of-distribution scores in {result.ood[m.name]['folder']}")
        for m in cfg.models:
            if m.model.mae_loss is not None:
                result.mae[m.name] = write_mae_summary(cfg, m, result.runs)
                say(
                    f"{m.name}: MAE reconstruction loss per dataset in {result.mae[m.name]['folder']}"
                )
    result.seconds = time.time() - started
    return result


def _ran(model: str, dataset: str, split: str, res) -> str:
    shared = res.manifest.get("execution", {}).get("shared_stream")
    return (
        f"{model}/{dataset}/{split}: {res.listed} images, {res.ok} ok, {res.error} errors "
        f"({res.seconds:.1f} s"
        + (f"; decoded once for {len(shared['outputs'])} models" if shared else "")
        + ")"
    )


def _run_row(m: MatrixModel, ds: MatrixDataset, split: str, job: EmbedConfig, manifest: dict):
    return {
        "model": m.name,
        "dataset": ds.name,
        "split": split,
        "uri": job.output.uri,
        "counts": manifest["counts"],
        "features": {k: v["dim"] for k, v in manifest["features"].items()},
    }


def _made_by(job: EmbedConfig, weights: bytes) -> bool:
    """Whether the complete output at ``job.output.uri`` holds the vectors ``job`` would
    write: its manifest's identity (weights by content, model, features, preprocessing,
    label rules; :mod:`vitflow.identity`) equals the job's."""
    from vitflow.identity import fingerprint, vector_identity

    try:
        stored = _read_json(job.output.uri, columns.MANIFEST_NAME, job.storage)["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (stored or {}).get("fingerprint") == fingerprint(vector_identity(job, weights))


def _model_weights(m: MatrixModel, storage: StorageConfig, dense_pca: dict | None = None) -> bytes:
    """The model's weights as an embed run ships them (what its identity hashes), with the
    dense maps' PCA it projected with, if any."""
    from vitflow.backbone import backbone_bytes, create_backbone

    bb = create_backbone(m.model, storage_options=storage.options_for(m.model.checkpoint or ""))
    bb.dense_pca = dense_pca
    return backbone_bytes(bb)


def _has_pca(m: MatrixModel) -> bool:
    return any(f.pca for f in m.features)


def _stored_pca(job: EmbedConfig) -> dict | None:
    """The dense maps' PCA stored with an output (complete or interrupted), if any."""
    from vitflow.embed import stored_dense_pca
    from vitflow.storage import open_fs

    fs, path = open_fs(job.output.uri, job.storage.options_for(job.output.uri))
    return stored_dense_pca(fs, path)


def _pair_pca(jobs: list[EmbedConfig]) -> dict | None:
    """The PCA an output of the pair already holds (the first in split order), if any."""
    for job in jobs:
        pca = _stored_pca(job)
        if pca is not None:
            return pca
    return None


def _check_output_outside_sources(cfg: MatrixConfig) -> None:
    """An output inside a dataset's folder would be listed as part of it on the next run."""
    from vitflow.storage import overlap

    for ds in cfg.datasets:
        for uri in [ds.source.uri, *(ds.splits or {}).values()]:
            if overlap(cfg.output.uri, uri, cfg.storage.options_for(uri)):
                raise ConfigError(
                    f"output.uri {cfg.output.uri!r} and dataset {ds.name!r}'s images ({uri}) "
                    "are inside one another; write the output elsewhere"
                )


def _check_ood_reference(cfg: MatrixConfig, plan) -> None:
    if cfg.ood is None or cfg.ood.reference_split is None:
        return
    splits = next(list(s) for _, ds, s in plan if ds.name == cfg.ood.reference)
    if cfg.ood.reference_split not in splits:
        raise ConfigError(
            f"ood.reference_split {cfg.ood.reference_split!r} is not a split of dataset "
            f"{cfg.ood.reference!r} ({', '.join(splits)})"
        )


def _state(job: EmbedConfig) -> str:
    """``absent``, ``complete`` (a manifest and no run in progress) or ``interrupted``."""
    from vitflow.sinks import RUN_STATE
    from vitflow.storage import open_fs

    fs, path = open_fs(job.output.uri, job.storage.options_for(job.output.uri))
    if not fs.exists(path):
        return "absent"
    if fs.exists(posixpath.join(path, RUN_STATE)):
        return "interrupted"
    if fs.exists(posixpath.join(path, columns.MANIFEST_NAME)):
        return "complete"
    # A run killed before it began this output leaves only its lock behind.
    from vitflow.locking import LOCK_NAME

    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return "interrupted" if any(n != LOCK_NAME for n in names) else "absent"


def _read_json(uri: str, name: str, storage: StorageConfig | None = None) -> dict:
    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage.options_for(uri) if storage else None)
    with fs.open(posixpath.join(path, name), "rb") as f:
        return json.loads(f.read())


def _write_json(fs, path: str, data: dict) -> None:
    write_atomic(fs, path, (json.dumps(data, indent=1) + "\n").encode())


def _write_pair_manifest(
    cfg: MatrixConfig, m: MatrixModel, ds: MatrixDataset, runs: list[dict]
) -> None:
    from vitflow.storage import open_fs

    uri = split_uri(cfg.output.uri, m.name, ds.name)
    fs, path = open_fs(uri, cfg.storage.options_for(uri))
    manifest = {
        "layout": PAIR_LAYOUT,
        "model": m.name,
        "dataset": ds.name,
        "model_config": m.model.model_dump(mode="json"),
        "source": ds.source.uri,
        "features": runs[0]["features"] if runs else {},
        "splits": {r["split"]: r["counts"] for r in runs},
        "counts": {k: sum(r["counts"].get(k, 0) for r in runs) for k in ("listed", "ok", "error")},
    }
    _write_json(fs, posixpath.join(path, columns.MANIFEST_NAME), manifest)


def write_ood(cfg: MatrixConfig, m: MatrixModel, runs: list[dict]) -> dict[str, Any]:
    """Score every split of every dataset against the reference split for model ``m``, and
    write ``OUT/<model>/_ood/``: ``scores.parquet`` (dataset, split, id, ood_knn),
    ``summary.csv`` and ``summary.json`` (per dataset: n, mean, median, std, p10, p90) and
    ``ood.png`` (the distribution per dataset, ordered by median)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitflow.analysis.ood import knn_distance, summarize
    from vitflow.analysis.plots import ood_chart
    from vitflow.analysis.source import open_source
    from vitflow.storage import open_fs

    ood = cfg.ood
    feature = ood.feature or next(f.name for f in m.features if not f.dense)
    mine = [r for r in runs if r["model"] == m.name]
    ref_splits = [r["split"] for r in mine if r["dataset"] == ood.reference]
    ref_split = ood.reference_split or ("train" if "train" in ref_splits else ref_splits[0])
    if ref_split not in ref_splits:
        raise ConfigError(
            f"ood.reference_split {ref_split!r} is not a split of dataset {ood.reference!r} "
            f"({', '.join(ref_splits)})"
        )
    opts = cfg.storage.options_for(cfg.output.uri)
    reference = open_source(split_uri(cfg.output.uri, m.name, ood.reference, ref_split), opts)
    tables, by_dataset = [], {}
    for r in mine:
        query = open_source(r["uri"], opts)
        same = (r["dataset"], r["split"]) == (ood.reference, ref_split)
        try:
            t = knn_distance(reference, query, feature, ood.k, same=same)
        except ValueError as e:  # e.g. the reference split has no ok image
            raise VitflowError(
                f"out-of-distribution scores for model {m.name!r}, {r['dataset']}/{r['split']} "
                f"against {ood.reference}/{ref_split}: {e}"
            ) from e
        n = t.num_rows
        tables.append(
            pa.table(
                {
                    "dataset": pa.array([r["dataset"]] * n, pa.string()),
                    "split": pa.array([r["split"]] * n, pa.string()),
                    columns.ID: t.column(columns.ID),
                    "ood_knn": t.column("ood_knn"),
                }
            )
        )
        scores = t.column("ood_knn").to_numpy(zero_copy_only=False)
        by_dataset.setdefault(r["dataset"], []).append(scores)
    scores = {d: np.concatenate(v) for d, v in by_dataset.items()}
    summary = summarize(scores)
    uri = split_uri(cfg.output.uri, m.name, OOD_FOLDER)
    fs, path = open_fs(uri, opts)
    fs.makedirs(path, exist_ok=True)
    with fs.open(posixpath.join(path, "scores.parquet"), "wb") as f:
        pq.write_table(pa.concat_tables(tables), f)
    meta = {
        "model": m.name,
        "feature": feature,
        "k": ood.k,
        "reference": {"dataset": ood.reference, "split": ref_split},
        "summary": summary.to_pylist(),
    }
    title = (
        f"{m.name}: mean cosine distance to the {ood.k} nearest {ood.reference}/{ref_split} images"
    )
    _write_summary(fs, path, "summary", "ood.png", meta, ood_chart(scores, title=title))
    return {"folder": uri, **meta}


def write_mae_summary(cfg: MatrixConfig, m: MatrixModel, runs: list[dict]) -> dict[str, Any]:
    """For a model with ``model.mae_loss``: each dataset's MAE reconstruction loss (the
    ``mae_loss`` column of its splits' ok rows) summarised in ``OUT/<model>/_ood/``:
    ``mae_summary.csv`` and ``mae_summary.json`` (per dataset: n, mean, median, std, p10,
    p90) and ``mae_loss.png`` (the distribution per dataset, ordered by median)."""
    import numpy as np
    import pyarrow.compute as pc

    from vitflow.analysis.ood import summarize
    from vitflow.analysis.plots import ood_chart
    from vitflow.analysis.source import open_source
    from vitflow.storage import open_fs

    opts = cfg.storage.options_for(cfg.output.uri)
    by_dataset: dict[str, list] = {}
    for r in (r for r in runs if r["model"] == m.name):
        table = open_source(r["uri"], opts).dataset.to_table(
            columns=[columns.MAE_LOSS], filter=pc.field(columns.STATUS) == columns.STATUS_OK
        )
        by_dataset.setdefault(r["dataset"], []).append(
            table.column(columns.MAE_LOSS).to_numpy(zero_copy_only=False)
        )
    scores = {d: np.concatenate(v) for d, v in by_dataset.items()}
    summary = summarize(scores, column=columns.MAE_LOSS)
    uri = split_uri(cfg.output.uri, m.name, OOD_FOLDER)
    fs, path = open_fs(uri, opts)
    fs.makedirs(path, exist_ok=True)
    meta = {
        "model": m.name,
        "mae_loss": m.model.mae_loss.model_dump(mode="json"),
        "summary": summary.to_pylist(),
    }
    mae = m.model.mae_loss
    title = (
        f"{m.name}: MAE reconstruction loss per image (mask ratio {mae.mask_ratio}, "
        f"{'normalised' if mae.norm_pix_loss else 'raw'} pixel targets; higher: less familiar)"
    )
    png = ood_chart(scores, score=columns.MAE_LOSS, title=title)
    _write_summary(fs, path, "mae_summary", "mae_loss.png", meta, png)
    return {"folder": uri, **meta}


def _write_summary(fs, path: str, stem: str, png_name: str, meta: dict, png: bytes) -> None:
    """``<stem>.csv`` (the summary rows), ``<stem>.json`` (them with ``meta``) and a chart."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist(meta["summary"]), buf)
    write_atomic(fs, posixpath.join(path, f"{stem}.csv"), buf.getvalue())
    _write_json(fs, posixpath.join(path, f"{stem}.json"), meta)
    write_atomic(fs, posixpath.join(path, png_name), png)


def is_matrix_output(uri: str, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` is the top folder of a matrix output (it holds ``_matrix.json``)."""
    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage_options)
    return fs.exists(posixpath.join(path.rstrip("/"), MATRIX_INDEX))


def matrix_rows(uri: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """What ``vitflow ls`` prints: one row per split output under ``uri`` (a matrix output, a
    model/dataset pair, or a single embed output): model, dataset, split, rows, ok, errors,
    features with their widths."""
    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise VitflowError(f"nothing at {uri!r}")

    from vitflow.loading import _manifest

    def manifest(p: str) -> dict | None:
        return _manifest(fs, p.rstrip("/"))

    def width(v) -> str:
        if isinstance(v, dict) and v.get("dense"):
            return "x".join(map(str, v["shape"])) + " float16 map"
        return str(v["dim"] if isinstance(v, dict) else v)

    def row(model, dataset, split, m) -> dict[str, Any]:
        counts = m.get("counts", {})
        return {
            "model": model,
            "dataset": dataset,
            "split": split,
            "rows": counts.get("listed"),
            "ok": counts.get("ok"),
            "errors": counts.get("error"),
            "features": ", ".join(f"{k}[{width(v)}]" for k, v in m.get("features", {}).items()),
        }

    def pair_rows(p: str, model: str, dataset: str, m: dict) -> list[dict[str, Any]]:
        out = []
        for split in m.get("splits", {}):
            sm = manifest(posixpath.join(p, split))
            out.append(row(model, dataset, split, sm or {"counts": m["splits"][split]}))
        return out

    top = manifest(path)
    if top is not None and top.get("layout") == PAIR_LAYOUT:
        return pair_rows(path, top["model"], top["dataset"], top)
    if top is not None:
        return [row(None, None, None, top)]
    out = []
    for mdir in sorted(fs.ls(path, detail=False)):
        if not fs.isdir(mdir) or posixpath.basename(mdir.rstrip("/")).startswith(("_", ".")):
            continue
        for ddir in sorted(fs.ls(mdir, detail=False)):
            name = posixpath.basename(ddir.rstrip("/"))
            m = manifest(ddir) if fs.isdir(ddir) and not name.startswith(("_", ".")) else None
            if m is not None and m.get("layout") == PAIR_LAYOUT:
                out += pair_rows(ddir, m["model"], m["dataset"], m)
    if not out:
        raise VitflowError(f"{uri!r} holds no embed output or matrix output")
    return out
