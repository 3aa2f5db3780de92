"""``run_reindex``: keep a Delta table of embeddings in step with a source that changes.

Each run lists the source, diffs it against the table's latest snapshot (by id: a file
whose size, mtime/ETag or path changed is *updated*), embeds only the added and updated
files through the same Ray stages as ``vitflow embed``, and commits once: new data files
plus copies of the files that held stale rows (copy-on-write), with the old ones removed.
A run with nothing to do starts no Ray work and commits nothing.

The three steps are plain functions, so a scheduler, a notebook or a test can run them
apart: :func:`plan_reindex` (driver only, no Ray) -> :func:`stage_reindex` (embeds, writes
files nobody sees yet) -> :func:`commit_reindex` (one atomic commit, or
:class:`~vitflow.index_table.ConcurrentCommitError` if another run committed first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vitflow import columns
from vitflow.backbone import weights_fingerprint
from vitflow.config import EmbedConfig
from vitflow.embed import EmbedPlan, embed_stages, prepare_embed
from vitflow.errors import ConfigError, VitflowError
from vitflow.index_table import (
    MTIME,
    SIZE,
    ConcurrentCommitError,
    FileStager,
    commit_files,
    delta_storage_options,
    diff_listing,
    index_schema,
    load_index,
    open_table,
    read_state,
    same_columns,
    stored_job,
    table_schema,
)
from vitflow.locking import LOCK_NAME
from vitflow.outputs import output_lock
from vitflow.runtime import plan_pool, ray_session
from vitflow.sinks import ERROR_BUDGET_MIN_ROWS
from vitflow.stages import EmbedStats, output_schema

__all__ = ["ReindexResult", "load_index", "plan_reindex", "run_reindex"]

log = logging.getLogger(__name__)

INDEX_FORMAT = "vitflow.index/1"
# Parts of the job the vectors depend on, as a sentence names them when they change.
_JOB_PARTS = {
    "weights_sha256": "the model weights",
    "model": "the model settings (name, kwargs, extractor)",
    "features": "the feature spec",
    "preprocessing": "the preprocessing (source.max_pixels, compute.precision)",
    "labels": "the label/split rules (source.labels, source.split)",
    "format": "the index format",
}


@dataclass
class ReindexResult:
    """What a reindex run did. ``version`` is the table version after it (unchanged when
    nothing was committed); ``errors`` counts error rows among the files embedded now."""

    added: int
    updated: int
    deleted: int
    unchanged: int
    errors: int
    seconds: float
    version: int | None
    embedded: int = 0  # files that went through the model stage (added + updated)

    def summary_json(self) -> str:
        """One JSON line for a scheduler: added, updated, deleted, unchanged, errors, seconds, version."""
        keys = ("added", "updated", "deleted", "unchanged", "errors", "seconds", "version")
        out = {k: getattr(self, k) for k in keys}
        out["seconds"] = round(self.seconds, 3)
        return json.dumps(out)


@dataclass
class ReindexPlan:
    """A change to the index, planned on one snapshot (``version``; None: no table yet)."""

    cfg: EmbedConfig
    embed: EmbedPlan = field(repr=False)
    storage_options: dict[str, str] = field(repr=False)
    schema: pa.Schema = field(repr=False)
    fingerprint: str
    version: int | None
    rebuild: bool
    todo: pa.Table = field(repr=False)  # listing rows to embed: added + updated
    # data file -> ids to drop from it (updated, deleted, or stored twice)
    stale: dict[str, set[str]] = field(repr=False)
    file_sizes: dict[str, int] = field(repr=False)
    counts: dict[str, int]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def uri(self) -> str:
        return self.cfg.output.uri

    @property
    def changed(self) -> bool:
        return self.rebuild or self.todo.num_rows > 0 or bool(self.stale)


@dataclass
class StagedChange:
    """Data files written by :func:`stage_reindex`, not yet part of any table version."""

    adds: list = field(repr=False)
    removes: list = field(repr=False)
    embedded: int
    errors: int


def index_job(cfg: EmbedConfig, weights: bytes) -> tuple[str, dict[str, Any]]:
    """``(fingerprint, job)``: everything the vectors depend on, and its sha256.

    The listing is left out (the diff handles it), and so are ``model.checkpoint`` and
    ``model.pretrained``: the weights' hash already says whether the model is the same,
    wherever it was loaded from.
    """
    job = {
        "format": INDEX_FORMAT,
        "weights_sha256": weights_fingerprint(weights),
        "model": cfg.model.model_dump(mode="json", include={"name", "kwargs", "extractor"}),
        "features": [f.model_dump(mode="json") for f in cfg.features],
        "preprocessing": {"max_pixels": cfg.source.max_pixels, "precision": cfg.compute.precision},
        "labels": cfg.source.model_dump(mode="json", include={"labels", "split"}),
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest(), job


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Name what differs between two jobs, e.g. ``the feature spec (added: cls)``."""
    parts = []
    for key, what in _JOB_PARTS.items():
        if old.get(key) == new.get(key):
            continue
        if key == "features":
            was = {f["name"]: f for f in old.get(key) or []}
            now = {f["name"]: f for f in new[key]}
            detail = [
                f"{verb}: {', '.join(names)}"
                for verb, names in (
                    ("added", [n for n in now if n not in was]),
                    ("removed", [n for n in was if n not in now]),
                    ("changed", [n for n in now if n in was and now[n] != was[n]]),
                )
                if names
            ]
            what += f" ({'; '.join(detail)})" if detail else " (order)"
        parts.append(what)
    return ", ".join(parts) or "the job"


def plan_reindex(cfg: EmbedConfig, *, rebuild: bool = False) -> ReindexPlan:
    """Check the job and diff the source against the index's latest snapshot (no Ray)."""
    # overwrite=True: an existing output is this job's index, not a mistake to refuse.
    embed = prepare_embed(cfg, check_output=False)
    uri = cfg.output.uri
    so = delta_storage_options(uri, cfg.storage.options_for(uri))
    fingerprint, job = index_job(cfg, embed.weights)
    schema = index_schema(output_schema(embed.dims), fingerprint, job)
    dt = open_table(uri, so)
    if dt is None:
        _check_no_foreign_files(embed, uri)
    elif not rebuild:
        stored_fingerprint, stored = stored_job(dt)
        if stored_fingerprint is None:
            raise ConfigError(
                f"{uri!r} is a Delta table that `vitflow reindex` did not write; pass "
                "--rebuild to replace its contents, or choose another output.uri"
            )
        if stored_fingerprint != fingerprint or not same_columns(table_schema(dt), schema):
            raise ConfigError(
                f"the index {uri!r} was built with a different job: "
                f"{describe_change(stored, job)} changed since. Its vectors would no longer be "
                "comparable; rerun with --rebuild to re-embed every file into it (one commit), "
                "or choose another output.uri"
            )
    state, sizes = read_state(dt)
    todo_mask, stale, counts = diff_listing(embed.listing.table, state)
    if rebuild:  # everything is re-embedded; the overwrite removes every old file itself
        todo_mask, stale = [True] * len(todo_mask), {}
        counts.update(updated=counts["updated"] + counts["unchanged"], unchanged=0)
    todo = embed.listing.table.filter(pa.array(todo_mask, pa.bool_()))
    return ReindexPlan(
        cfg,
        embed,
        so,
        schema,
        fingerprint,
        None if dt is None else dt.version(),
        rebuild,
        todo,
        stale,
        sizes,
        counts,
    )


def _check_no_foreign_files(embed: EmbedPlan, uri: str) -> None:
    # Orphans of a killed first build are ours (FileStager names); anything else is not.
    fs, path = embed.output_fs, embed.output_path
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path)] if fs.exists(path) else []
    foreign = [
        n for n in names if n not in ("_delta_log", LOCK_NAME) and not FileStager.is_staged_name(n)
    ]
    if foreign:
        raise ConfigError(
            f"output.uri {uri!r} holds files but no Delta table (e.g. {foreign[0]!r}); "
            "`vitflow reindex` keeps its index as a Delta table: choose a new location"
        )


def stage_reindex(plan: ReindexPlan, *, address: str | None = None) -> StagedChange:
    """Embed the plan's files on Ray and write every data file its commit needs.

    Until :func:`commit_reindex` names them, the files are orphans that readers never see,
    so stopping here (or crashing) leaves the index as it was.
    """
    stager = FileStager(plan.uri, plan.storage_options, plan.run_id)
    adds, embedded, errors = (
        _embed_into(plan, stager, address) if plan.todo.num_rows else ([], 0, 0)
    )
    budget = plan.cfg.compute.max_error_fraction
    if budget is not None and embedded >= ERROR_BUDGET_MIN_ROWS and errors > budget * embedded:
        raise VitflowError(
            f"error budget exceeded: {errors} of {embedded} files failed (more than "
            f"compute.max_error_fraction={budget}); nothing was committed"
        )
    removes = []
    for path, ids in sorted(plan.stale.items()):
        add, remove = stager.rewrite_without(path, plan.file_sizes[path], ids)
        adds += [add] if add is not None else []
        removes.append(remove)
    return StagedChange(adds, removes, embedded, errors)


def commit_reindex(plan: ReindexPlan, staged: StagedChange) -> int:
    """Commit a staged change in one transaction on the snapshot it was planned from.

    Returns the new table version; raises ``ConcurrentCommitError`` (a ``VitflowError``)
    when another run committed in between. Committing the same change twice is harmless.
    """
    try:
        return _commit(plan, staged)
    except ConcurrentCommitError:
        # This run's files are named by its run id and no commit names them: tidy them now.
        FileStager(plan.uri, plan.storage_options, plan.run_id).discard(
            [a.path for a in staged.adds]
        )
        raise


def _commit(plan: ReindexPlan, staged: StagedChange) -> int:
    return commit_files(
        plan.uri,
        plan.storage_options,
        version=plan.version,
        schema=plan.schema,
        adds=staged.adds,
        removes=staged.removes,
        overwrite=plan.rebuild and plan.version is not None,
        # One app transaction per run: a lost answer is told apart from a rival's commit.
        app_id=f"vitflow.reindex.{plan.run_id}",
        metadata={
            "vitflow.operation": "rebuild" if plan.rebuild else "reindex",
            "vitflow.fingerprint": plan.fingerprint,
            "vitflow.counts": {**plan.counts, "embedded": staged.embedded, "errors": staged.errors},
        },
    )


def run_reindex(
    cfg: EmbedConfig, *, rebuild: bool = False, address: str | None = None
) -> ReindexResult:
    """Bring the Delta index at ``cfg.output.uri`` in step with ``cfg.source`` in one commit.

    Args:
        cfg: the job (as for ``vitflow embed``); ``output.uri`` is the Delta table.
        rebuild: re-embed every file and replace the table's contents (needed after a
            change of model, features or preprocessing; refused otherwise).
        address: Ray cluster address; default: the Ray of this process, else a local one.

    Example:
        >>> from vitflow.config import load_config
        >>> cfg = load_config(base={"source": {"uri": "images"}, "model": {"name": "resnet18"},
        ...                         "output": {"uri": "index"}})
        >>> print(run_reindex(cfg).summary_json())  # doctest: +SKIP
        {"added": 24, "updated": 0, "deleted": 0, "unchanged": 0, "errors": 0, ...}
    """
    started = time.time()
    # One run at a time: a second one is refused before it plans, not at its commit.
    with output_lock(cfg, "reindex"):
        return _reindex_locked(cfg, rebuild, address, started)


def _reindex_locked(
    cfg: EmbedConfig, rebuild: bool, address: str | None, started: float
) -> ReindexResult:
    plan = plan_reindex(cfg, rebuild=rebuild)
    c = plan.counts
    if not plan.changed:
        log.info(
            "index %s is up to date at version %s: nothing embedded or committed",
            plan.uri,
            plan.version,
        )
        return ReindexResult(0, 0, 0, c["unchanged"], 0, time.time() - started, plan.version)
    staged = stage_reindex(plan, address=address)
    version = commit_reindex(plan, staged)
    log.info("index %s: version %s, %s", plan.uri, version, c)
    return ReindexResult(
        c["added"],
        c["updated"],
        c["deleted"],
        c["unchanged"],
        staged.errors,
        time.time() - started,
        version,
        staged.embedded,
    )


def _embed_into(plan: ReindexPlan, stager: FileStager, address: str | None):
    """Run the plan's files through decode tasks + the model actor pool; write each batch of
    ``output.rows_per_file`` rows as one data file. Returns ``(adds, embedded, errors)``."""
    cfg, todo = plan.cfg, plan.todo
    extra = todo.select([SIZE, MTIME])  # kept in the index for the next diff
    row_of = {id_: i for i, id_ in enumerate(todo[columns.ID].to_pylist())}
    file_schema = pa.schema([f.remove_metadata() for f in plan.schema])
    adds, seen, errors = [], [], 0
    with ray_session(address, cfg.compute.local_num_cpus) as ray:
        actors = plan_pool(ray, cfg.compute)
        stats_name = f"vitflow-reindex-stats-{plan.run_id[:12]}"
        stats = ray.remote(num_cpus=0)(EmbedStats).options(name=stats_name).remote()
        try:
            ds = embed_stages(
                ray,
                plan.cfg,
                plan.embed.backbone.data_config,
                ray.put(plan.embed.weights),
                actors,
                stats_name,
                plan.todo,
                source_root=plan.embed.listing.local_root,
            )
            for batch in ds.iter_batches(
                batch_format="pyarrow", batch_size=cfg.output.rows_per_file
            ):
                ids = batch[columns.ID].to_pylist()
                meta = extra.take(pa.array([row_of[i] for i in ids], pa.int64()))
                rows = pa.table(
                    [
                        (meta if f.name in (SIZE, MTIME) else batch)[f.name].cast(f.type)
                        for f in file_schema
                    ],
                    schema=file_schema,
                )
                adds.append(stager.write(rows))
                seen += ids
                errors += sum(s != columns.STATUS_OK for s in batch[columns.STATUS].to_pylist())
            log.info("embed stats: %s", ray.get(stats.get.remote()))
        finally:
            ray.kill(stats)
    if len(seen) != len(set(seen)) or set(seen) != set(row_of):
        raise VitflowError(
            f"embedding check failed: {len(row_of)} files to embed, {len(seen)} rows came back "
            f"({len(seen) - len(set(seen))} duplicated); nothing was committed, rerun"
        )
    return adds, len(seen), errors
