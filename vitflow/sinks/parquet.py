"""Writing the embeddings table in resumable parts.

The listing is cut into parts of ``output.rows_per_file`` consecutive files. Every model
actor stages each batch it embeds at once, as a small piece file under ``OUT/_staging/``
(:class:`PieceWriter`); the driver counts the receipts and, when all ids of a part have
arrived, a Ray task compacts the part's pieces into ``OUT/part-NNNNN.parquet`` (written
atomically) and deletes them (:class:`PartsSink`). So:

- a finished part is one file that is either complete or absent;
- a killed driver or model actor loses at most the batches in flight: staged pieces
  survive and ``--resume`` picks up from them;
- a batch retried by Ray after a crash may be staged twice; compaction keeps one row per id.

Readers (pyarrow datasets, pandas, polars ``OUT/*.parquet``, duckdb) skip ``_``-prefixed
names, so they never see staging or temporary files.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.errors import VitflowError
from vitflow.locking import LOCK_NAME
from vitflow.retry import DEFAULT_RETRY_SECONDS, retrying
from vitflow.storage import is_local, list_entries, list_names, remove_file, write_atomic

STAGING = "_staging"
RUN_STATE = "_vitflow_run.json"  # what an unfinished run was doing, for --resume
PART_COLUMN = "__part"
_PART_FILE = re.compile(r"^part-(\d{5,})\.parquet$")
_PIECE_FILE = re.compile(r"^part-(\d{5,})-[0-9a-f]+\.parquet$")
_TMP_FILE = re.compile(r"^_tmp-[0-9a-f]{32}-")


def part_file(part: int) -> str:
    return f"part-{part:05d}.parquet"


def part_files(fs, out_path: str) -> list[str]:
    """Names of the finished part files under ``out_path``, sorted."""
    names = (posixpath.basename(p.rstrip("/")) for p in _ls(fs, out_path))
    return sorted(n for n in names if _PART_FILE.match(n))


def finished_parts(fs, out_path: str) -> set[int]:
    """Parts whose final file exists under ``out_path``."""
    done = set()
    for p in _ls(fs, out_path):
        m = _PART_FILE.match(posixpath.basename(p.rstrip("/")))
        if m:
            done.add(int(m.group(1)))
    return done


_MARKERS = (columns.MANIFEST_NAME, RUN_STATE)  # what makes part files recognisably ours
# Folders vitflow's analysis commands write beside an output (eval, fitted transforms, search
# index, near-duplicate groups, report): everything in them is vitflow's.
DERIVED_FOLDERS = ("_eval", "_transforms", "_index", "_dedup", "_report", "_dense")


def is_output_file(relpath: str, *, marked: bool = True) -> bool:
    """Whether a file (path relative to the output folder) is one an embed run writes: a
    part, the manifest, the run state, the run lock, a staged piece or a temporary file.
    Part files count only in a ``marked`` folder (one holding a manifest or run state): a
    bare ``part-00000.parquet`` could be anyone's."""
    top, _, rest = relpath.partition("/")
    if not rest:
        return bool(
            (marked and _PART_FILE.match(top))
            or top in (*_MARKERS, LOCK_NAME)
            or _TMP_FILE.match(top)
        )
    if top in DERIVED_FOLDERS:
        return True
    return (
        top == STAGING
        and "/" not in rest
        and bool(_PIECE_FILE.match(rest) or _TMP_FILE.match(rest))
    )


def output_files(fs, out_path: str) -> tuple[list[str], list[str]]:
    """``(ours, foreign)``: the files under ``out_path`` an embed run wrote, and the others
    (paths relative to ``out_path``; a foreign folder is named, not walked).

    An embed run writes only at the top of its folder and in ``_staging/``, so only those two
    listings are read: ``-o ~ --overwrite`` costs two directory listings, not a walk of the
    home folder."""
    out = out_path.rstrip("/")
    top = [
        (posixpath.basename(e["name"].rstrip("/")), e.get("type") == "directory")
        for e in list_entries(fs, out)
    ]
    names = {name for name, _ in top}
    marked = any(m in names for m in _MARKERS)
    ours: list[str] = []
    foreign: list[str] = []
    for name, is_dir in sorted(top):
        if is_dir and name == STAGING:
            for p in _ls(fs, posixpath.join(out, STAGING)):
                rel = f"{STAGING}/{posixpath.basename(p.rstrip('/'))}"
                (ours if is_output_file(rel) else foreign).append(rel)
        elif is_dir and name in DERIVED_FOLDERS and marked:
            ours += [
                f"{name}/{p[len(out) :].lstrip('/').split('/', 1)[1]}"
                for p in _find_files(fs, posixpath.join(out, name))
            ]
        elif is_dir:
            foreign.append(name + "/")
        else:
            (ours if is_output_file(name, marked=marked) else foreign).append(name)
    return ours, foreign


def _find_files(fs, path: str) -> list[str]:
    if not is_local(fs):
        fs.invalidate_cache(path)
    try:
        return fs.find(path, withdirs=False)
    except FileNotFoundError:
        return []


def remove_output(fs, out_path: str, retry_s: float | None = None) -> int:
    """Delete a previous embed output's files (and nothing else; the run lock of the run
    doing this stays); returns how many. Callers check first that :func:`output_files`
    found nothing foreign. The manifest and run state go last, so an interrupted removal
    still leaves a folder recognisably vitflow's."""
    out = out_path.rstrip("/")
    ours, foreign = output_files(fs, out)
    if foreign:  # the caller's check ran on an older view; never delete what is not ours
        raise FileExistsError(f"{posixpath.join(out, foreign[0])} was not written by vitflow")
    ours = [rel for rel in ours if rel != LOCK_NAME]
    ours.sort(key=lambda rel: rel in _MARKERS)
    for rel in ours:
        remove_file(fs, posixpath.join(out, rel), retry_s=retry_s)
    _remove_empty_staging(fs, out)
    return len(ours)


def _remove_empty_staging(fs, out: str) -> None:
    """Local folders vitflow made and emptied go too (object stores have no empty folders)."""
    if not is_local(fs):
        return
    for name in (STAGING, *DERIVED_FOLDERS):
        top = posixpath.join(out, name)
        for folder, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            if not os.listdir(folder):
                os.rmdir(folder)


def _ls(fs, path: str) -> list[str]:
    return list_names(fs, path)


def _write_atomic(fs, table: pa.Table, path: str, retry_s: float | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(fs, path, buf.getvalue(), retry_s=retry_s)


class PieceWriter:
    """The part writer's half that runs in every model actor: it stages each embedded batch
    at once, one piece file per part it touches, and returns a receipt (id, status, part of
    every row) for the driver's accounting. Writers scale with the actor pool; no row passes
    through one process.

    Args:
        fs: fsspec filesystem of the output (picklable: local or s3fs).
        out_path: output folder path on ``fs``.
        schema: the columns written (:func:`vitflow.stages.output_schema`).
        retry_s: how long writes wait out an unreachable store.
    """

    def __init__(self, fs, out_path: str, schema: pa.Schema, retry_s: float | None = None):
        self.fs, self.out, self.schema, self.retry_s = fs, out_path.rstrip("/"), schema, retry_s
        self.staging = posixpath.join(self.out, STAGING)
        if is_local(self.fs):
            os.makedirs(self.staging, exist_ok=True)

    def write(self, batch: pa.Table) -> pa.Table:
        parts = batch.column(PART_COLUMN).to_numpy()
        rows = batch.select(self.schema.names)
        for part in np.unique(parts):
            piece = rows.filter(pa.array(parts == part))
            name = f"part-{int(part):05d}-{uuid.uuid4().hex[:16]}.parquet"
            _write_atomic(self.fs, piece, posixpath.join(self.staging, name), self.retry_s)
        return batch.select([columns.ID, columns.STATUS, PART_COLUMN])


class PartsSink:
    """The part writer's driver half: counts the receipts per part and, the moment a part's
    every row is staged, compacts it in a Ray task (pieces -> ``part-NNNNN.parquet``,
    atomically, one row per id). The driver holds the ids of unfinished parts only.

    Args:
        fs, out_path: the output.
        schema: the columns written.
        part_sizes: expected rows of every part this run must produce.
        staged: ids already staged per part (a resumed run's, from :func:`staged_ids`).
        retry_s: how long writes wait out an unreachable store.
    """

    def __init__(
        self,
        fs,
        out_path: str,
        schema: pa.Schema,
        part_sizes: dict[int, int],
        staged: dict[int, set[str]] | None = None,
        retry_s: float | None = None,
    ):
        self.fs, self.out, self.schema, self.retry_s = fs, out_path.rstrip("/"), schema, retry_s
        self.expected = {int(k): int(v) for k, v in part_sizes.items()}
        self.seen: dict[int, set[str]] = {
            p: set(ids) for p, ids in (staged or {}).items() if p in self.expected
        }
        self.pending: list = []
        self.compacted = 0
        self._ray = None

    # -- the engine's sink protocol ----------------------------------------------------------

    def writer(self) -> tuple[type, dict]:
        return PieceWriter, {
            "fs": self.fs,
            "out_path": self.out,
            "schema": self.schema,
            "retry_s": self.retry_s,
        }

    def start(self, ray) -> None:
        """Finish at once the parts a resumed run finds wholly staged."""
        self._ray = ray
        for part, ids in list(self.seen.items()):
            if len(ids) >= self.expected[part]:
                self._compact(part)

    def receive(self, receipt: pa.Table) -> None:
        parts = receipt.column(PART_COLUMN).to_numpy()
        ids = receipt.column(columns.ID)
        for part in np.unique(parts):
            part = int(part)
            got = ids.filter(pa.array(parts == part)).to_pylist()
            seen = self.seen.setdefault(part, set())
            seen.update(got)
            if len(seen) >= self.expected.get(part, float("inf")):
                self._compact(part)
        self._collect(block=False)

    def abort(self, timeout_s: float = 120.0) -> None:
        """A failed run waits for the compactions it started (their parts are whole), so no
        task of it is still moving pieces when the next run (--resume) lists them."""
        if self.pending and self._ray is not None:
            self._ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout_s)
            self.pending = []

    def finish(self) -> dict:
        """Wait for every compaction; returns counters for the run's stats."""
        self._collect(block=True)
        if self.seen:  # parts whose rows did not all arrive (the engine checks counts too)
            missing = {p: self.expected[p] - len(ids) for p, ids in self.seen.items()}
            raise VitflowError(
                f"{len(missing)} parts did not receive all their rows ({missing}); "
                "rerun with --resume to complete them"
            )
        return {"parts_compacted": self.compacted}

    # -- compaction ----------------------------------------------------------------------------

    def _compact(self, part: int) -> None:
        self.seen.pop(part, None)
        if self._ray is None:  # no cluster (nothing left to embed): compact here
            compact_part(self.fs, self.out, part, self.retry_s)
        else:
            task = self._ray.remote(num_cpus=0, max_retries=3)(compact_part)
            self.pending.append(task.remote(self.fs, self.out, part, self.retry_s))
        self.compacted += 1

    def _collect(self, block: bool) -> None:
        if not self.pending:
            return
        ray = self._ray
        done, self.pending = ray.wait(
            self.pending, num_returns=len(self.pending), timeout=None if block else 0
        )
        ray.get(done)  # raises the first compaction error, if any


def compact_part(fs, out_path: str, part: int, retry_s: float | None = None) -> int:
    """Compact the staged pieces of ``part`` into ``part-NNNNN.parquet`` (written atomically;
    one row per id, sorted by path) and delete the pieces. Returns the part's rows. Runs as a
    Ray task; safe to run twice (a piece already gone is skipped)."""
    out = out_path.rstrip("/")
    staging = posixpath.join(out, STAGING)
    prefix = f"part-{part:05d}-"
    pieces = sorted(
        p
        for p in _ls(fs, staging)
        if posixpath.basename(p).startswith(prefix) and _PIECE_FILE.match(posixpath.basename(p))
    )
    budget = DEFAULT_RETRY_SECONDS if retry_s is None else retry_s
    final = posixpath.join(out, part_file(part))
    # Every call to the store rides out an outage within the budget, this check too (an
    # S3 outage test caught a bare exists() failing a compaction with ConnectionClosedError).
    if pieces and retrying(lambda: fs.exists(final), what=f"check {final}", budget_s=budget):
        # A compaction of this part already finished its (atomic) write and died while
        # deleting pieces, and Ray retried it: the part is whole; rewriting it from the
        # pieces left would drop the rows of the pieces already deleted.
        for p in pieces:
            remove_file(fs, p, retry_s=retry_s)
        import pyarrow.parquet as pq

        def rows() -> int:
            with fs.open(final, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows

        return retrying(rows, what=f"read {final}", budget_s=budget)
    tables = []
    for p in pieces:
        try:
            tables.append(
                retrying(lambda p=p: _read_parquet(fs, p), what=f"read {p}", budget_s=budget)
            )
        except FileNotFoundError:
            # Another compaction of this part took it: a compaction deletes pieces only
            # after its part is written, so the part is whole already. Writing it again from
            # the pieces this one still read would drop the rows of the pieces gone.
            return 0
    if not tables:
        return 0
    table = _unique_ids(pa.concat_tables(tables)).sort_by(columns.PATH)
    _write_atomic(fs, table, final, retry_s)
    for p in pieces:
        remove_file(fs, p, retry_s=retry_s)
    return table.num_rows


def _unique_ids(table: pa.Table) -> pa.Table:
    """One row per id (a retried batch can be staged twice; its rows are identical)."""
    ids = table.column(columns.ID)
    if pc.count_distinct(ids).as_py() == len(ids):
        return table
    _, first = np.unique(ids.to_numpy(zero_copy_only=False), return_index=True)
    return table.take(pa.array(np.sort(first)))


def staged_ids(fs, out_path: str) -> dict[int, set[str]]:
    """Ids already staged under ``OUT/_staging``, by part."""
    seen: dict[int, set[str]] = {}
    for piece in _ls(fs, posixpath.join(out_path.rstrip("/"), STAGING)):
        m = _PIECE_FILE.match(posixpath.basename(piece))
        if m:
            ids = retrying(
                lambda piece=piece: _read_parquet(fs, piece, columns=[columns.ID]),
                what=f"read {piece}",
            ).column(0)
            seen.setdefault(int(m.group(1)), set()).update(ids.to_pylist())
    return seen


def clean_staging(
    fs, out_path: str, keep_parts: set[int] | None = None, retry_s: float | None = None
) -> None:
    """Remove temporary files, and staged pieces of parts not in ``keep_parts``.

    Listings come fresh from the store each time (s3fs caches them per process, and a piece
    listed at the start is usually compacted away by the writer by the end), and a file that
    is already gone is fine."""
    out = out_path.rstrip("/")
    staging = posixpath.join(out, STAGING)
    for folder in (out, staging):
        for p in _ls(fs, folder):
            name = posixpath.basename(p.rstrip("/"))
            m = _PIECE_FILE.match(name)
            stale_piece = folder == staging and (
                not m or keep_parts is None or int(m.group(1)) not in keep_parts
            )
            if _TMP_FILE.match(name) or stale_piece:
                remove_file(fs, p, retry_s=retry_s)
    _remove_empty_staging(fs, out)


def _read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
