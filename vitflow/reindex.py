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

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vitflow.config import EmbedConfig
from vitflow.embed import EmbedPlan, prepare_embed
from vitflow.engine import stream
from vitflow.errors import ConfigError, VitflowError
from vitflow.identity import describe_change, fingerprint, vector_identity
from vitflow.index_table import (
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
from vitflow.ledger import Ledger
from vitflow.locking import LOCK_NAME
from vitflow.outputs import output_lock
from vitflow.sinks.delta import DeltaSink
from vitflow.stages import output_schema

__all__ = ["ReindexResult", "load_index", "plan_reindex", "run_reindex"]

log = logging.getLogger(__name__)

INDEX_FORMAT = "vitflow.index/1"


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
    todo: Ledger = field(repr=False)  # listing rows to embed: added + updated (on disk)
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
    """``(fingerprint, job)`` of an index: the vectors' identity
    (:func:`vitflow.identity.vector_identity`) and the index format. The listing is left out:
    the diff handles it."""
    job = {"format": INDEX_FORMAT, **vector_identity(cfg, weights)}
    return fingerprint(job), job


def plan_reindex(cfg: EmbedConfig, *, rebuild: bool = False) -> ReindexPlan:
    """Check the job and diff the source against the index's latest snapshot (no Ray)."""
    # overwrite=True: an existing output is this job's index, not a mistake to refuse.
    if any(f.dense for f in cfg.features):
        raise ConfigError(
            "dense feature sets are not kept in an index: Delta Lake has no float16 type for "
            "their maps; embed them with `vitflow embed` (parquet parts) instead"
        )
    embed = prepare_embed(cfg, check_output=False)
    uri = cfg.output.uri
    so = delta_storage_options(uri, cfg.storage.options_for(uri))
    fingerprint, job = index_job(cfg, embed.weights)
    schema = index_schema(
        output_schema(embed.dims, mae_loss=cfg.model.mae_loss is not None), fingerprint, job
    )
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
    listed = embed.listing.ledger
    state, sizes = read_state(dt)
    if state.num_rows:
        todo, stale, counts = diff_listing(listed, state)
    else:  # a first build: every listed file is new, nothing to diff (and no DuckDB needed)
        todo, stale = listed, {}
        counts = {"added": len(listed), "updated": 0, "deleted": 0, "unchanged": 0}
    if rebuild:  # everything is re-embedded; the overwrite removes every old file itself
        todo, stale = listed, {}
        counts.update(updated=counts["updated"] + counts["unchanged"], unchanged=0)
    del state  # its spill folder goes with it
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
    adds, embedded, errors = _embed_into(plan, address) if plan.todo.num_rows else ([], 0, 0)
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
    # No early Ray start here: an index already up to date (the usual nightly run) needs none.
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


def _embed_into(plan: ReindexPlan, address: str | None):
    """Run the plan's files through the engine; each model actor writes the batches it
    embeds as data files (:mod:`vitflow.sinks.delta`). Returns ``(adds, embedded, errors)``.
    The error budget is the engine's, judged as for embed (a 50-file run whose every file
    fails is refused too)."""
    file_schema = pa.schema([f.remove_metadata() for f in plan.schema])
    sink = DeltaSink(plan.uri, plan.storage_options, plan.run_id, file_schema)
    try:
        result = stream(
            plan.cfg,
            data_config=plan.embed.backbone.data_config,
            weights=plan.embed.weights,
            rows=plan.todo,
            sink=sink,
            address=address,
            source_root=plan.embed.listing.local_root,
            model_params=plan.embed.num_params,
        )
    except VitflowError as e:
        raise type(e)(f"{e}; nothing was committed") from None
    log.info("embed stats: %s", result.timings)
    if result.processed != plan.todo.num_rows:
        raise VitflowError(
            f"embedding check failed: {plan.todo.num_rows} files to embed, {result.processed} "
            "rows came back; nothing was committed, rerun"
        )
    return sink.add_actions(), result.processed, result.error
