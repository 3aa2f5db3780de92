"""``vitflow export``: one feature's vectors as one file other tools read, streamed part by
part (memory: one batch, whatever the output's size).

- ``csv``: header ``filename,x1,...,xD``, one row per image; ``filename`` is the ``path``
  column (quoted only when it holds a comma, quote or line break), numbers in the shortest
  form that reads back to the same float32.
- ``npy``: a ``(rows, D)`` float32 array, plus ``NAME.ids.parquet`` beside it: row ``i``'s
  ``id``, ``path``, ``label`` and ``split``. Parquet rather than a text file of ids because a
  path may hold any character, a newline included, which would shift every line after it,
  and because label and split (nullable) travel with the id at no cost.
- ``parquet``: one file with ``id``, ``path``, ``label``, ``split``, ``width``, ``height`` and
  the vectors as ``fixed_size_list<float32>[D]`` named after the feature.

Only ok rows are exported (error rows have no vectors), in the output's row order. A file is
written under a temporary name and renamed when complete (locally; an object store's upload
appears only when finished), so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.errors import VitflowError

FORMATS = ("csv", "npy", "parquet")
_IDS_COLUMNS = (columns.ID, columns.PATH, columns.LABEL, columns.SPLIT)
_PARQUET_COLUMNS = (*_IDS_COLUMNS, columns.WIDTH, columns.HEIGHT)
CSV_TEXT_BYTES = 4 * 2**20  # CSV text formatted at a time


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    path: str
    format: str
    rows: int
    dim: int
    feature: str
    transform: str | None = None
    ids_path: str | None = None  # npy: the ids file beside the array


def export_embeddings(
    uri: str,
    output: str | None = None,
    *,
    format: str | None = None,
    feature: str | None = None,
    transform: str | None = None,
    split: str | None = None,
    storage_options: dict | None = None,
    batch_rows: int | None = None,
) -> ExportResult:
    """Write one feature's vectors (ok rows) as a single CSV, ``.npy`` or parquet file.

    Args:
        uri: the output folder or reindexed index (local path or fsspec URL).
        output: the file to write (default: ``OUTNAME-FEATURE[-TRANSFORM][-SPLIT].FORMAT``
            in the current folder).
        format: ``csv``, ``npy`` or ``parquet`` (default: from ``output``'s extension).
        feature: the vector column (default: the only one).
        transform: apply this fitted transform (``vitflow fit``) first.
        split: export only rows of this split.
        storage_options: fsspec options for object storage (the output and the file).
        batch_rows: rows per streamed chunk (default: ~32 MiB of vectors).

    Returns:
        An :class:`ExportResult`.

    Example:
        >>> export_embeddings("embeddings", "emb.csv", feature="emb")  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source
    from vitflow.analysis.transforms import load_transform
    from vitflow.storage import open_fs

    if format is None and output is not None:
        format = posixpath.splitext(output)[1].lstrip(".").lower() or None
    if format not in FORMATS:
        raise VitflowError(
            f"export format {format!r} is not one of {', '.join(FORMATS)}; pass --format"
        )
    src = open_source(uri, storage_options)
    feature = src.feature(feature)
    fitted = None
    if transform is not None:
        fitted = load_transform(uri, transform, storage_options)
        fitted.check(feature, src.fingerprint, uri)
    dim = fitted.dim_out if fitted else src.dims[feature]
    if output is None:
        base = posixpath.basename(uri.rstrip("/")) or "embeddings"
        parts = [base, feature, *(x for x in (transform, split) if x)]
        output = "-".join(parts) + f".{format}"
    names = [c for c in (_PARQUET_COLUMNS if format == "parquet" else _IDS_COLUMNS)]

    def chunks():
        from vitflow.loading import vectors_of

        for _, t in src.batches([*names, feature], ok=True, split=split, batch_rows=batch_rows):
            x = vectors_of(t.column(feature))
            yield t.select(names), (fitted.apply(x) if fitted else x)

    fs, path = open_fs(output, storage_options)
    ids_path = None
    if format == "csv":
        rows = _write_csv(fs, path, chunks(), dim)
    elif format == "npy":
        expected = src.count(ok=True, split=split)
        ids_path = _ids_name(path)
        rows = _write_npy(fs, path, ids_path, chunks(), expected, dim)
        ids_path = _ids_name(output)
    else:
        vec = pa.field(feature, pa.list_(pa.float32(), dim))
        schema = pa.schema([src.dataset.schema.field(c) for c in names] + [vec])
        meta = {"vitflow.source": uri, "vitflow.feature": feature}
        if transform:
            meta["vitflow.transform"] = transform
        rows = _write_parquet(fs, path, chunks(), schema.with_metadata(meta))
    return ExportResult(output, format, rows, dim, feature, transform, ids_path)


def _ids_name(path: str) -> str:
    stem = path[: -len(".npy")] if path.endswith(".npy") else path
    return stem + ".ids.parquet"


@contextlib.contextmanager
def _atomic(fs, path: str):
    """A writable binary file that appears at ``path`` only when the block succeeds."""
    from vitflow.storage import is_local

    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not is_local(fs):
        with fs.open(path, "wb") as f:  # an object store shows the object once complete
            yield f
        return
    tmp = os.path.join(os.path.dirname(path), f"_tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _quote(name: str) -> str:
    if any(c in name for c in ',"\n\r'):
        return '"' + name.replace('"', '""') + '"'
    return name


def _write_csv(fs, path: str, chunks, dim: int) -> int:
    import pyarrow.csv as pacsv

    names = [f"x{j}" for j in range(1, dim + 1)]
    step = max(1, CSV_TEXT_BYTES // (12 * dim))  # rows per write (~12 characters a number)
    options = pacsv.WriteOptions(include_header=False)
    rows = 0
    with _atomic(fs, path) as f:
        f.write(("filename," + ",".join(names) + "\n").encode())
        for meta, x in chunks:
            files = [_quote(p).encode() for p in meta.column(columns.PATH).to_pylist()]
            for s in range(0, len(x), step):
                part = np.ascontiguousarray(x[s : s + step].T)  # (dim, rows): one array a column
                numbers = io.BytesIO()
                pacsv.write_csv(pa.table(list(part), names=names), numbers, options)
                lines = numbers.getvalue().split(b"\n")
                f.write(
                    b"".join(
                        name + b"," + line + b"\n"
                        for name, line in zip(files[s : s + step], lines, strict=False)
                    )
                )
            rows += len(x)
    return rows


def _write_npy(fs, path: str, ids_path: str, chunks, expected: int, dim: int) -> int:
    rows = 0
    with _atomic(fs, path) as f, _atomic(fs, ids_path) as g:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (expected, dim)}
        )
        writer = None
        for meta, x in chunks:
            f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
            if writer is None:
                writer = pq.ParquetWriter(g, meta.schema)
            writer.write_table(meta)
            rows += len(x)
        if writer is None:
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in _IDS_COLUMNS}), g)
        else:
            writer.close()
        if rows != expected:
            raise VitflowError(
                f"the output changed during the export ({expected} rows counted, {rows} read); "
                "run it again"
            )
    return rows


def _write_parquet(fs, path: str, chunks, schema: pa.Schema) -> int:
    rows = 0
    with _atomic(fs, path) as f, pq.ParquetWriter(f, schema) as writer:
        for meta, x in chunks:
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            writer.write_table(pa.Table.from_arrays([*meta.columns, vec], schema=schema))
            rows += len(x)
    return rows
