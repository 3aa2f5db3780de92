"""Writing the embeddings table in resumable parts.

The listing is cut into parts of ``output.rows_per_file`` consecutive files. A single writer
actor receives every embedded batch and stages it at once as a small piece file under
``OUT/_staging/``; when all ids of a part have arrived it compacts the part's pieces into
``OUT/part-NNNNN.parquet`` (written under a temporary name and then moved into place) and
deletes them. So:

- a finished part is one file that is either complete or absent;
- a killed driver, writer or model actor loses at most the batches in flight: staged
  pieces survive and ``--resume`` picks up from them;
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
ERROR_BUDGET_MIN_ROWS = 100
PART_COLUMN = "__part"
_PART_FILE = re.compile(r"^part-(\d{5,})\.parquet$")
_PIECE_FILE = re.compile(r"^part-(\d{5,})-[0-9a-f]+\.parquet$")
_TMP_FILE = re.compile(r"^_tmp-[0-9a-f]{32}-")


class ErrorBudgetExceeded(VitflowError):
    """Raised inside the writer when too many files fail; the job stops, resumably."""


def part_file(part: int) -> str:
    return f"part-{part:05d}.parquet"


def assign_parts(num_rows: int, rows_per_part: int) -> np.ndarray:
    """Part index of each listed row (rows are in listing order)."""
    return np.arange(num_rows, dtype=np.int64) // rows_per_part


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
        elif is_dir:
            foreign.append(name + "/")
        else:
            (ours if is_output_file(name, marked=marked) else foreign).append(name)
    return ours, foreign


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
    staging = posixpath.join(out, STAGING)
    if is_local(fs) and os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)


def _ls(fs, path: str) -> list[str]:
    return list_names(fs, path)


def _write_atomic(fs, table: pa.Table, path: str, retry_s: float | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(fs, path, buf.getvalue(), retry_s=retry_s)


class PartWriter:
    """Ray Data actor stage (run with exactly one actor) that stages and compacts parts.

    Args:
        fs: fsspec filesystem of the output (picklable: local or s3fs).
        out_path: output folder path on ``fs``.
        part_sizes: expected number of rows of every part that this run must produce.
    """

    def __init__(
        self,
        fs,
        out_path: str,
        part_sizes: dict[int, int],
        max_error_fraction: float | None = None,
        retry_s: float | None = None,
    ):
        self.fs, self.out = fs, out_path.rstrip("/")
        self.retry_s = retry_s
        self.max_error_fraction = max_error_fraction
        self.total = sum(part_sizes.values())
        self.processed = self.errors = 0
        self.staging = posixpath.join(self.out, STAGING)
        if is_local(self.fs):
            os.makedirs(self.staging, exist_ok=True)
        self.expected = {int(k): int(v) for k, v in part_sizes.items()}
        # A restarted writer (or a resumed run) recounts what earlier incarnations staged,
        # and finishes parts whose every row was already staged.
        self.seen = {p: ids for p, ids in staged_ids(fs, out_path).items() if p in self.expected}
        for part, ids in list(self.seen.items()):
            if len(ids) >= self.expected[part]:
                self._compact(part)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._check_error_budget(batch)
        written = []
        parts = batch.column(PART_COLUMN).to_numpy()
        rows = batch.drop_columns([PART_COLUMN])
        for part in np.unique(parts):
            part = int(part)
            piece = rows.filter(pa.array(parts == part))
            name = f"part-{part:05d}-{uuid.uuid4().hex[:16]}.parquet"
            _write_atomic(self.fs, piece, posixpath.join(self.staging, name), self.retry_s)
            seen = self.seen.setdefault(part, set())
            seen.update(piece.column(columns.ID).to_pylist())
            if len(seen) >= self.expected.get(part, float("inf")):
                written.append((part, self._compact(part)))
        return pa.table(
            {"part": [p for p, _ in written], "rows": [n for _, n in written]},
            schema=pa.schema([("part", pa.int64()), ("rows", pa.int64())]),
        )

    def _check_error_budget(self, batch: pa.Table) -> None:
        if self.max_error_fraction is None:
            return
        self.processed += batch.num_rows
        self.errors += (
            pc.sum(pc.equal(batch.column(columns.STATUS), columns.STATUS_ERROR)).as_py() or 0
        )
        # Judge only after a fair sample, so three bad files among the first ten do not abort.
        if self.processed >= min(self.total, ERROR_BUDGET_MIN_ROWS):
            if self.errors / self.processed > self.max_error_fraction:
                raise ErrorBudgetExceeded(
                    f"error budget exceeded: {self.errors} of {self.processed} files failed so far, more than "
                    f"compute.max_error_fraction={self.max_error_fraction}; the job stopped with "
                    "its finished parts kept. Fix the inputs (see the error column) or raise the "
                    "budget, then rerun with --resume"
                )

    def _compact(self, part: int) -> int:
        prefix = f"part-{part:05d}-"
        pieces = sorted(
            p
            for p in _ls(self.fs, self.staging)
            if posixpath.basename(p).startswith(prefix) and _PIECE_FILE.match(posixpath.basename(p))
        )
        budget = DEFAULT_RETRY_SECONDS if self.retry_s is None else self.retry_s
        tables = [
            retrying(lambda p=p: _read_parquet(self.fs, p), what=f"read {p}", budget_s=budget)
            for p in pieces
        ]
        table = pa.concat_tables(tables)
        table = _unique_ids(table).sort_by(columns.PATH)
        _write_atomic(self.fs, table, posixpath.join(self.out, part_file(part)), self.retry_s)
        for p in pieces:
            remove_file(self.fs, p, retry_s=self.retry_s)
        self.seen.pop(part, None)
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
