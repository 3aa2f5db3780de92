"""The embeddings index as a Delta Lake table: schema, data files, one-commit changes, reads.

``vitflow reindex`` keeps one row per listed image in a Delta table and changes it only by
whole commits, so readers always see one consistent snapshot. This module is the Delta side
of that (no torch, no Ray):

- the schema: the embeddings columns, ``size`` and ``mtime`` (what the next diff compares),
  vectors as ``list<float32>`` (a ``fixed_size_list`` column breaks Ray appends and
  ``polars.read_delta``). What the vectors were computed with is stored as field metadata
  of the ``id`` column (:data:`FINGERPRINT_KEY`, :data:`JOB_KEY`): deltalake rejects
  unknown table properties, and field metadata lives in the metadata action, so it survives
  checkpoints and log clean-up and is replaced atomically by a rebuild's overwrite;
- :func:`read_state` + :func:`diff_listing`: which listed files are new, changed or gone,
  and which data files hold rows that must go;
- :class:`FileStager`: writes data files into the table folder. Until a commit names them
  they are invisible orphans, so a run killed at any point leaves the last snapshot intact;
- :func:`commit_files`: adds and removes in ONE commit, opened at the snapshot the change
  was planned from, with no automatic retry: any commit in between fails ours (delta-rs
  would otherwise rebase two blind appends of the same new ids and double the index);
- :func:`load_index`: one snapshot as a DataFrame.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.errors import ConfigError, VitflowError
from vitflow.ledger import ROW_GROUP as LEDGER_ROW_GROUP
from vitflow.ledger import (
    Ledger,
    LedgerWriter,
    duckdb_session,
    release_folder,
    spill_folder,
    sql_path,
)

SIZE = "size"
MTIME = "mtime"
# What the diff reads back from the table: one row per indexed file, and where it is stored.
STATE_COLUMNS = (columns.ID, columns.PATH, SIZE, MTIME)
FILE = "__file"
STATE_SCHEMA = pa.schema(
    [(columns.ID, pa.string()), (columns.PATH, pa.string()), (SIZE, pa.int64())]
    + [(MTIME, pa.string()), (FILE, pa.string())]
)
FINGERPRINT_KEY = "vitflow.fingerprint"  # sha256 of JOB_KEY's JSON
JOB_KEY = "vitflow.job"  # what the vectors depend on (weights hash, model, features), as JSON
DIM_KEY = "vitflow.dim"  # on each vector column: its length, for readers
# FileStager's file names: run id, a counter, and (from a model actor) the writer's tag.
_STAGED_NAME = re.compile(r"^part-[0-9a-f]{32}-\d{5,}(-[0-9a-f]{8})?\.parquet$")
# A txn entry per run is only consulted while that run commits; let Delta expire them.
TABLE_CONFIGURATION = {"delta.setTransactionRetentionDuration": "interval 7 days"}


class ConcurrentCommitError(VitflowError):
    """Another writer committed to the index after this run planned its change."""


def delta_storage_options(uri: str, options: dict[str, Any] | None = None) -> dict[str, str]:
    """deltalake storage options for ``uri`` from fsspec-style ones (``StorageConfig.options_for``).

    Keys already in deltalake's spelling (``AWS_*``) pass through. Credentials are left to
    the environment (``AWS_ACCESS_KEY_ID``, ...), which deltalake reads itself, unless the
    options carry them (``key``/``secret``/``token``); nothing here is logged.
    """
    if uri.split("://", 1)[0] not in ("s3", "s3a") or "://" not in uri:
        return {k: str(v) for k, v in (options or {}).items() if k.isupper()}
    opts = dict(options or {})
    out = {k: str(v) for k, v in opts.items() if k.isupper()}
    endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    region = (opts.get("client_kwargs") or {}).get("region_name") or os.environ.get(
        "AWS_REGION", os.environ.get("AWS_DEFAULT_REGION")
    )
    if endpoint:
        out.setdefault("AWS_ENDPOINT_URL", endpoint)
        if endpoint.startswith("http://"):
            out.setdefault("AWS_ALLOW_HTTP", "true")  # else deltalake fails with "builder error"
        region = region or "us-east-1"  # S3-compatible stores ignore it, the client needs one
    if region:
        out.setdefault("AWS_REGION", region)
    if opts.get("anon"):
        out.setdefault("AWS_SKIP_SIGNATURE", "true")
    for fs_key, delta_key in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if opts.get(fs_key):
            out.setdefault(delta_key, str(opts[fs_key]))
    return out


def index_schema(embeddings: pa.Schema, fingerprint: str, job: dict[str, Any]) -> pa.Schema:
    """Schema of the index, from the embeddings schema (``stages.output_schema``): the same
    meta columns, then ``size`` and ``mtime``, then the vectors as ``list<float32>``."""
    meta = {FINGERPRINT_KEY: fingerprint, JOB_KEY: json.dumps(job, sort_keys=True)}
    fields = [pa.field(SIZE, pa.int64()), pa.field(MTIME, pa.string())]
    vectors = []
    for f in embeddings:
        if pa.types.is_fixed_size_list(f.type):
            dim = {DIM_KEY: str(f.type.list_size)}
            vectors.append(pa.field(f.name, pa.list_(pa.float32()), metadata=dim))
        else:
            fields.insert(-2, f.with_metadata(meta) if f.name == columns.ID else f)
    return pa.schema(fields + vectors)


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Same names and types in the same order, metadata and nullability aside."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def open_table(uri: str, storage_options: dict[str, str], version: int | None = None):
    """The Delta table at ``uri`` (at ``version``), or None where there is none yet."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(uri, storage_options or None):
        return None
    return DeltaTable(uri, version=version, storage_options=storage_options or None)


def table_schema(dt) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def stored_job(dt) -> tuple[str | None, dict[str, Any]]:
    """``(fingerprint, job)`` the table's vectors were computed with; ``(None, {})`` if unknown."""
    schema = table_schema(dt)
    if columns.ID not in schema.names:
        return None, {}
    meta = schema.field(columns.ID).metadata or {}
    fingerprint, job = meta.get(FINGERPRINT_KEY.encode()), meta.get(JOB_KEY.encode())
    return (fingerprint.decode() if fingerprint else None, json.loads(job) if job else {})


def read_state(dt) -> tuple[Ledger, dict[str, int]]:
    """What the diff needs from a snapshot (``dt``; None: no table yet): :data:`STATE_COLUMNS`
    plus each row's data file (:data:`FILE`), spilled to a ledger on local disk as it is
    scanned, and the size of every data file (for its remove action)."""
    writer = LedgerWriter(STATE_SCHEMA)
    dataset = None if dt is None else dt.to_pyarrow_dataset()
    if dataset is None or not set(STATE_COLUMNS) <= set(dataset.schema.names):
        return writer.close(), {}  # nothing to diff against (a rebuild replaces it all)
    # Tagged batches name their fragment (= data file). Read ahead one file and a few
    # batches: the default (several files at once) holds hundreds of MB per big data file.
    scanner = dataset.scanner(
        columns=list(STATE_COLUMNS), batch_size=1 << 16, batch_readahead=4, fragment_readahead=1
    )
    for tagged in scanner.scan_batches():
        batch = pa.Table.from_batches([tagged.record_batch])
        file = pa.array([tagged.fragment.path], pa.string()).take(np.zeros(len(batch), np.int64))
        writer.write(batch.append_column(FILE, file))
    adds = pa.table(dt.get_add_actions(flatten=True))
    sizes = dict(zip(adds["path"].to_pylist(), adds["size_bytes"].to_pylist(), strict=True))
    return writer.close(), sizes


def diff_listing(
    listing: Ledger, state: Ledger
) -> tuple[Ledger, dict[str, set[str]], dict[str, int]]:
    """Compare the listed files with the indexed rows, by id, as out-of-core joins in DuckDB
    (bounded memory: the diff of a 100M-row corpus never sits in the driver).

    A listed file is to embed when the index lacks it, or holds it with another path, size
    or mtime (a null equals only a null), or holds it more than once (re-embedding heals it).

    Returns:
        ``(todo, stale, counts)``: the listed rows to embed, in listing order; for each data
        file the ids whose rows must go (updated, deleted, or stored more than once); counts
        of added, updated, deleted and unchanged files. Python sees only the changed rows.
    """
    folder = spill_folder("vitflow-diff-")
    try:
        con = duckdb_session(folder)
    except ConfigError:
        release_folder(folder)
        raise
    new = f"read_parquet({sql_path(listing.path)}, file_row_number = true)"
    old = f"read_parquet({sql_path(state.path)})"
    id_, path = f'"{columns.ID}"', f'"{columns.PATH}"'
    try:
        con.execute(
            f"""CREATE TEMP TABLE flags AS
            SELECT l.file_row_number AS rn, l.{id_} AS {id_}, o.n IS NULL AS added,
                   o.n IS NOT NULL AND (o.n > 1 OR l.{path} IS DISTINCT FROM o.{path}
                            OR l."{SIZE}" IS DISTINCT FROM o."{SIZE}"
                            OR l."{MTIME}" IS DISTINCT FROM o."{MTIME}") AS changed
            FROM {new} l LEFT JOIN (
                SELECT {id_}, count(*) AS n, min({path}) AS {path}, min("{SIZE}") AS "{SIZE}",
                       min("{MTIME}") AS "{MTIME}"
                FROM {old} GROUP BY {id_}
            ) o ON l.{id_} = o.{id_}"""
        )
        added, updated = con.execute(
            "SELECT count(*) FILTER (WHERE added), count(*) FILTER (WHERE changed) FROM flags"
        ).fetchall()[0]
        (deleted,) = con.execute(
            f"SELECT count(DISTINCT s.{id_}) FROM {old} s ANTI JOIN flags f ON s.{id_} = f.{id_}"
        ).fetchall()[0]
        stale: dict[str, set[str]] = defaultdict(set)
        gone = con.sql(
            f"""SELECT s."{FILE}", s.{id_} FROM {old} s ANTI JOIN flags f ON s.{id_} = f.{id_}
            UNION ALL
            SELECT s."{FILE}", s.{id_} FROM {old} s
            SEMI JOIN (SELECT {id_} FROM flags WHERE changed) c ON s.{id_} = c.{id_}"""
        ).fetch_record_batch(1 << 16)
        for batch in gone:
            for file, id_value in zip(*batch.to_pydict().values(), strict=True):
                stale[file].add(id_value)  # Python only for the rows that change
        n_todo = added + updated
        if n_todo:
            out = os.path.join(folder, "todo.parquet")
            con.execute(
                f"""COPY (SELECT l.* EXCLUDE (file_row_number) FROM {new} l
                JOIN flags f ON l.file_row_number = f.rn WHERE f.added OR f.changed
                ORDER BY l.file_row_number) TO {sql_path(out)}
                (FORMAT parquet, ROW_GROUP_SIZE {LEDGER_ROW_GROUP})"""
            )
    except BaseException:
        release_folder(folder)
        raise
    finally:
        con.close()
    if n_todo:
        todo = Ledger(out, listing.schema, n_todo, folder)
    else:
        release_folder(folder)
        todo = LedgerWriter(listing.schema).close()
    counts = {
        "added": int(added),
        "updated": int(updated),
        "deleted": int(deleted),
        "unchanged": listing.num_rows - added - updated,
    }
    return todo, dict(stale), counts


def file_stats(table: pa.Table) -> str:
    """Delta ``stats`` of a data file, as deltalake's own writer gives them: row count, and
    per scalar column its null count and min/max (lets readers skip files).

    Every scalar column must be there: deltalake's pyarrow reader turns a column missing
    from the stats into ``col >= null`` bounds, and a filter on it then drops every row.
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for f in table.schema:
        if pa.types.is_nested(f.type):
            continue  # vectors: no stats, as deltalake writes them
        col = table.column(f.name)
        nulls[f.name] = col.null_count
        if col.null_count < len(col):
            bounds = pc.min_max(col)
            mins[f.name], maxs[f.name] = bounds["min"].as_py(), bounds["max"].as_py()
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


class FileStager:
    """Writes data files of one run into the table folder (invisible until committed).

    Args:
        uri: the table location (local path or ``s3://``).
        storage_options: deltalake storage options (see :func:`delta_storage_options`).
        run_id: names this run's files, so an orphan can be traced to the run that left it.
    """

    def __init__(self, uri: str, storage_options: dict[str, str], run_id: str, writer_id: str = ""):
        from deltalake.fs import DeltaStorageHandler
        from pyarrow.fs import PyFileSystem

        if "://" not in uri:
            os.makedirs(uri, exist_ok=True)  # deltalake's local store needs the folder
        # deltalake's own object store: the same credentials and paths as its commits.
        self.fs = PyFileSystem(DeltaStorageHandler(uri, storage_options or None))
        self.run_id = run_id
        self.tag = f"-{writer_id}" if writer_id else ""  # writers in several actors never clash
        self.written = 0

    @staticmethod
    def is_staged_name(name: str) -> bool:
        """Whether a file name is one :meth:`write` gives (orphans of a killed run look so)."""
        return _STAGED_NAME.match(name) is not None

    def write(self, table: pa.Table):
        """Write ``table`` as one new data file; returns its ``AddAction``."""
        from deltalake.transaction import AddAction

        path = f"part-{self.run_id}-{self.written:05d}{self.tag}.parquet"
        self.written += 1
        with self.fs.open_output_stream(path) as f:
            pq.write_table(table, f, compression="zstd")
        size = self.fs.get_file_info(path).size
        return AddAction(path, size, {}, _now_ms(), True, file_stats(table))

    def discard(self, paths: list[str]) -> None:
        """Delete data files of this run that no commit names (best effort)."""
        for path in paths:
            try:
                self.fs.delete_file(path)
            except OSError:
                pass  # an orphan left behind is harmless: readers never see it

    def rewrite_without(self, path: str, size: int, drop_ids: set[str]):
        """Copy-on-write: ``(AddAction | None, RemoveAction)`` replacing data file ``path`` by
        a copy without the rows of ``drop_ids`` (no new file if no row is left)."""
        from deltalake.transaction import RemoveAction

        old = pq.read_table(path, filesystem=self.fs)
        keep = pc.invert(pc.is_in(old.column(columns.ID), pa.array(sorted(drop_ids))))
        kept = old.filter(keep)
        add = self.write(kept) if kept.num_rows else None
        return add, RemoveAction(path, True, _now_ms(), size)


def commit_files(
    uri: str,
    storage_options: dict[str, str],
    *,
    version: int | None,
    schema: pa.Schema,
    adds: list,
    removes: list = (),
    overwrite: bool = False,
    app_id: str,
    metadata: dict[str, Any],
) -> int:
    """Commit ``adds`` + ``removes`` as one new version on top of snapshot ``version``.

    ``version=None`` creates the table (it must not exist); ``overwrite`` replaces all rows
    and the schema (a rebuild). The commit carries the app transaction ``(app_id, new
    version)``: if its answer is lost and the commit fails on retry, the transaction in the
    log tells that it landed, so committing the same staged change twice is harmless.

    Returns:
        The table version the commit created.

    Raises:
        ConcurrentCommitError: another writer committed after ``version``.
    """
    from deltalake import CommitProperties, DeltaTable, Schema, Transaction
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import create_table_with_add_actions

    new_version = 0 if version is None else version + 1
    so = storage_options or None
    if committed_version(uri, storage_options, app_id) == new_version:
        return new_version  # this very change is already in the log
    props = CommitProperties(
        custom_metadata=metadata,
        max_commit_retries=0,  # see the module docstring: never rebase onto a newer snapshot
        app_transactions=[Transaction(app_id, new_version, _now_ms())],
    )
    try:
        if version is None:
            create_table_with_add_actions(
                uri,
                Schema.from_arrow(schema),
                adds,
                mode="error",
                configuration=TABLE_CONFIGURATION,
                storage_options=so,
                commit_properties=props,
            )
        else:
            dt = DeltaTable(uri, version=version, storage_options=so)
            # An append keeps the table's own schema (and its metadata) untouched.
            dt.create_write_transaction(
                [*adds, *removes],
                "overwrite" if overwrite else "append",
                schema if overwrite else dt.schema(),
                commit_properties=props,
            )
    except DeltaError as e:
        created_meanwhile = version is None and open_table(uri, storage_options) is not None
        if not isinstance(e, CommitFailedError) and not created_meanwhile:
            raise
        if committed_version(uri, storage_options, app_id) == new_version:
            return new_version
        raise ConcurrentCommitError(
            f"another reindex committed to {uri!r} after this run read version "
            f"{'(none)' if version is None else version}; nothing was changed by this run. "
            "Rerun it to index what is still missing"
        ) from e
    return new_version


def committed_version(uri: str, storage_options: dict[str, str], app_id: str) -> int | None:
    """The table version recorded for app transaction ``app_id``, if that commit landed."""
    dt = open_table(uri, storage_options)
    return None if dt is None else dt.transaction_version(app_id)


def _now_ms() -> int:
    return int(time.time() * 1000)


def feature_dims(schema: pa.Schema) -> dict[str, int]:
    """Vector columns of an index schema and their lengths."""
    return {
        f.name: int(f.metadata[DIM_KEY.encode()])
        for f in schema
        if f.metadata and DIM_KEY.encode() in f.metadata
    }


def load_index(
    uri: str,
    feature: str | None = None,
    split: str | None = None,
    include_errors: bool = False,
    storage_options: dict[str, Any] | None = None,
):
    """Load the latest snapshot of an index written by ``vitflow reindex`` as a DataFrame.

    Columns and filters match :func:`vitflow.load_embeddings`.

    Args:
        uri: the table location (local path or ``s3://``).
        feature: keep only this vector column (default: all of them).
        split: keep only rows of this split (default: all).
        include_errors: keep ``status == 'error'`` rows too (default: ok rows only).
        storage_options: fsspec-style (``endpoint_url``, ``anon``, ...) or deltalake
            (``AWS_*``) options for object storage.

    Example:
        >>> df = load_index("index", feature="emb", split="train")  # doctest: +SKIP
    """
    return read_index(uri, feature, split, include_errors, storage_options).to_pandas()


def read_index(
    uri: str,
    feature: str | None = None,
    split: str | None = None,
    include_errors: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """:func:`load_index` as an arrow table, vectors as ``fixed_size_list<float32>[D]`` columns
    like an ``embed`` output's (so :func:`vitflow.loading.vectors_of` applies)."""
    import pyarrow.dataset as pads

    dt = open_table(uri, delta_storage_options(uri, storage_options))
    if dt is None:
        raise VitflowError(f"no index (Delta table) at {uri!r}; build it with `vitflow reindex`")
    dims = feature_dims(table_schema(dt))
    if feature is not None and feature not in dims:
        raise VitflowError(f"feature {feature!r} is not in {uri!r}; it has {', '.join(dims)}")
    keep = [*columns.META_COLUMNS, *(n for n in dims if feature in (None, n))]
    flt = None if include_errors else pads.field(columns.STATUS) == columns.STATUS_OK
    if split is not None:
        cond = pads.field(columns.SPLIT) == split
        flt = cond if flt is None else flt & cond
    table = dt.to_pyarrow_dataset().to_table(columns=keep, filter=flt)
    for name in keep[len(columns.META_COLUMNS) :]:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table[name].cast(pa.list_(pa.float32(), dims[name])))
    return table
