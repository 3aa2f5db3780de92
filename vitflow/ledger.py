"""The listing's ledger on local disk, so that the driver's memory does not grow with the corpus.

A listing of 100M files is ~12 GB as an Arrow table (and more while it is sorted), so the
driver never holds it: rows are appended in pieces to a parquet file in a spill folder, and a
listing that does not arrive in order (a list of files, an object store's prefixes, a folder
walked one directory at a time) is sorted out of core by DuckDB, under a memory limit,
spilling to the same folder. The joins of a reindex (the listing against the
index snapshot) run the same way (:func:`vitflow.index_table.diff_listing`).

DuckDB does here what it does well (external sort, hash joins that spill); writing either by
hand would mean a sampled range partition and a k-way merge in Python. Readers then stream the
ledger in order, in batches of exactly the size they ask for.

The spill folder is ``$VITFLOW_SPILL_DIR`` (default: the system's temporary folder); it needs
30–60 bytes per listed file, and is removed when the ledger is no longer referenced.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitflow.errors import ConfigError

log = logging.getLogger(__name__)

SPILL_ENV = "VITFLOW_SPILL_DIR"
# DuckDB's working memory for sorts and joins; beyond it, it spills to the ledger's folder.
MEMORY_LIMIT_ENV = "VITFLOW_SPILL_MEMORY"
DEFAULT_MEMORY_LIMIT = "512MB"
ROW_GROUP = 65_536
READ_BATCH = 65_536


_OWNER = ".owner"  # each spill folder's lock file, held (flock) by its process for its lifetime
_HELD: dict[str, int] = {}  # this process's spill folders -> their lock's file descriptor


def spill_folder(prefix: str = "vitflow-ledger-") -> str:
    """A new folder for one ledger, held by this process through a lock on a file inside it.
    Folders whose lock nobody holds (left by a driver killed with SIGKILL, which runs no
    clean-up) are removed first. The kernel drops a lock with its process, whatever the host
    name or PID namespace, so a live process's folder is never taken."""
    base = os.environ.get(SPILL_ENV) or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    _sweep(base)
    folder = tempfile.mkdtemp(prefix=prefix, dir=base)
    fd = os.open(os.path.join(folder, _OWNER), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD[folder] = fd
    return folder


def release_folder(folder: str) -> None:
    """Remove one of this process's spill folders and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _HELD.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _sweep(base: str) -> None:
    for name in os.listdir(base):
        folder = os.path.join(base, name)
        if not name.startswith(("vitflow-ledger-", "vitflow-diff-")) or folder in _HELD:
            continue
        try:
            fd = os.open(os.path.join(folder, _OWNER), os.O_RDWR)
        except OSError:
            continue  # no lock file (yet): being made, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its process is alive
        finally:
            os.close(fd)  # (closing also drops the lock just taken)
        shutil.rmtree(folder, ignore_errors=True)


def have_duckdb() -> bool:
    """DuckDB is a dependency, but an install made with ``--no-deps`` (the GPU machines'
    wheel kit) may lack it: the listing then sorts in memory (see :meth:`LedgerWriter.close`)."""
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return False
    return True


def duckdb_session(folder: str):
    """A DuckDB connection bounded in memory, spilling into ``folder``."""
    try:
        import duckdb
    except ImportError as e:
        raise ConfigError(
            "the reindex diff needs DuckDB, which this install lacks: pip install 'duckdb>=2.0.1'"
        ) from e

    con = duckdb.connect()
    limit = os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT
    con.execute(f"SET memory_limit = '{_quoted(limit)}'")
    con.execute(f"SET temp_directory = '{_quoted(os.path.join(folder, 'duckdb.tmp'))}'")
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET threads = 2")  # sort/join speed is not the bound; memory per thread is
    return con


def _quoted(text: str) -> str:
    return str(text).replace("'", "''")


def sql_path(path: str) -> str:
    """A file path as a SQL string literal."""
    return f"'{_quoted(path)}'"


class Ledger:
    """Rows in a parquet file on local disk, read back in order and in pieces.

    The folder the file lives in belongs to the ledger: it is removed with it (when the last
    reference goes, or at exit)."""

    def __init__(self, path: str, schema: pa.Schema, num_rows: int, folder: str | None = None):
        self.path = path
        self.schema = schema
        self.num_rows = num_rows
        self.folder = folder
        if folder is not None:
            self._cleanup = weakref.finalize(self, release_folder, folder)

    def __len__(self) -> int:
        return self.num_rows

    @classmethod
    def from_table(cls, table: pa.Table) -> Ledger:
        writer = LedgerWriter(table.schema)
        writer.write(table)
        return writer.close()

    def batches(
        self, columns: list[str] | None = None, batch_rows: int = READ_BATCH
    ) -> Iterator[pa.Table]:
        """The rows in order, as tables of exactly ``batch_rows`` rows (the last one fewer)."""
        if not self.num_rows:
            return
        schema = (
            self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        )
        pieces = pq.ParquetFile(self.path).iter_batches(
            batch_size=min(batch_rows, READ_BATCH), columns=columns
        )
        yield from rebatch((p.cast(schema) for p in pieces), schema, batch_rows)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Everything at once: for small ledgers (tests, a dry run's report)."""
        schema = (
            self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        )
        if not self.num_rows:
            return schema.empty_table()
        return pq.read_table(self.path, columns=columns).cast(schema)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.read([name]).column(0)


def rebatch(
    pieces: Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema, rows: int
) -> Iterator[pa.Table]:
    """Pieces of any sizes as tables of exactly ``rows`` rows, in order (the last one fewer)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for piece in pieces:
        pending += piece.to_batches() if isinstance(piece, pa.Table) else [piece]
        have += piece.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending, schema=schema)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(pending, schema=schema)


class LedgerWriter:
    """Appends rows to a new ledger; ``sort_by`` sorts it (out of core) when it is closed.

    ``sort_by`` names a column of ``schema``, or is a field of its own: a key written with each
    row (the raw bytes of a file name, say), sorted by, and then left out of the ledger."""

    def __init__(self, schema: pa.Schema, sort_by: str | pa.Field | None = None):
        self.schema = schema
        self.written = schema.append(sort_by) if isinstance(sort_by, pa.Field) else schema
        self.sort_by = sort_by.name if isinstance(sort_by, pa.Field) else sort_by
        self.folder = spill_folder()
        name = "unsorted.parquet" if sort_by else "ledger.parquet"
        self.path = os.path.join(self.folder, name)
        self._writer = pq.ParquetWriter(self.path, self.written)
        self.num_rows = 0
        # A writer dropped unclosed (the listing failed) takes its folder with it.
        self._cleanup = weakref.finalize(self, release_folder, self.folder)

    def write(self, rows: pa.Table | pa.RecordBatch) -> None:
        if rows.num_rows:
            table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
            self._writer.write_table(table.cast(self.written), row_group_size=ROW_GROUP)
            self.num_rows += rows.num_rows

    def write_all(self, pieces: Iterable[pa.Table | pa.RecordBatch]) -> None:
        for piece in pieces:
            self.write(piece)

    def close(self) -> Ledger:
        self._writer.close()
        if not self.sort_by:
            ledger = Ledger(self.path, self.schema, self.num_rows, self.folder)
        elif not have_duckdb():
            log.warning(
                "DuckDB is not installed: the listing of %d files is sorted in memory "
                "(pip install 'duckdb>=2.0.1' for an out-of-core sort)",
                self.num_rows,
            )
            out = os.path.join(self.folder, "ledger.parquet")
            table = pq.read_table(self.path)
            order = pc.sort_indices(table, sort_keys=[(self.sort_by, "ascending")])
            pq.write_table(
                table.take(order).select(self.schema.names), out, row_group_size=ROW_GROUP
            )
            del table, order
            os.remove(self.path)
            ledger = Ledger(out, self.schema, self.num_rows, self.folder)
        else:
            out = os.path.join(self.folder, "ledger.parquet")
            key = f'"{self.sort_by}"'
            kept = ", ".join(f'"{name}"' for name in self.schema.names)
            con = duckdb_session(self.folder)
            try:
                con.execute(
                    f"COPY (SELECT {kept} FROM read_parquet({sql_path(self.path)}) "
                    f"ORDER BY {key}) TO {sql_path(out)} "
                    f"(FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP})"
                )
            finally:
                con.close()
            os.remove(self.path)
            ledger = Ledger(out, self.schema, self.num_rows, self.folder)
        self._cleanup.detach()  # the ledger owns the folder from here
        return ledger
