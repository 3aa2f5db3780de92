"""Reading embeddings back: one call to a DataFrame, or plain pandas/polars/duckdb."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.types as pat

from vitflow import columns
from vitflow.errors import VitflowError


def load_embeddings(
    uri: str,
    feature: str | None = None,
    split: str | None = None,
    include_errors: bool = False,
    return_vectors: bool = False,
    storage_options: dict | None = None,
):
    """Load an embeddings output written by ``vitflow embed``.

    Args:
        uri: the output folder (local path or fsspec URL).
        feature: keep only this vector column (default: all of them).
        split: keep only rows of this split (default: all).
        include_errors: keep ``status == 'error'`` rows too (default: ok rows only).
        storage_options: fsspec options for object storage (endpoint, anonymous access).
        return_vectors: also return the ``feature`` vectors as one ``float32`` array
            ``(rows, dim)`` in DataFrame order; needs ``feature`` (or a single feature).

    Returns:
        A DataFrame, or ``(DataFrame, ndarray)`` when ``return_vectors``.

    Example:
        >>> df, X = load_embeddings("embeddings", feature="emb", split="train",
        ...                         return_vectors=True)  # doctest: +SKIP
    """
    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise VitflowError(f"no embeddings at {uri!r}")
    if fs.exists(path.rstrip("/") + "/_delta_log"):
        # An index kept by `vitflow reindex`: read one committed snapshot, never raw files.
        from vitflow.index_table import read_index

        table = read_index(uri, feature, split, include_errors, storage_options)
        vector_cols = [f.name for f in table.schema if pat.is_fixed_size_list(f.type)]
    else:
        table, vector_cols = _read_parts(fs, path, uri, feature, split, include_errors)
    df = table.to_pandas()
    if not return_vectors:
        return df
    name = feature or (vector_cols[0] if len(vector_cols) == 1 else None)
    if name is None:
        raise VitflowError(
            f"return_vectors needs feature=...; {uri!r} has {', '.join(vector_cols)}"
        )
    return df, vectors_of(table.column(name))


def _read_parts(fs, path, uri, feature, split, include_errors):
    from vitflow.storage import arrow_fs

    dataset = pads.dataset(
        path, format="parquet", filesystem=arrow_fs(fs), exclude_invalid_files=True
    )
    vector_cols = [f.name for f in dataset.schema if pat.is_fixed_size_list(f.type)]
    if feature is not None and feature not in vector_cols:
        raise VitflowError(
            f"feature {feature!r} is not in {uri!r}; it has {', '.join(vector_cols)}"
        )
    keep = [
        f.name for f in dataset.schema if f.name not in vector_cols or feature in (None, f.name)
    ]
    flt = None
    if not include_errors:
        flt = pads.field(columns.STATUS) == columns.STATUS_OK
    if split is not None:
        cond = pads.field(columns.SPLIT) == split
        flt = cond if flt is None else flt & cond
    return dataset.to_table(columns=keep, filter=flt), vector_cols


def vectors_of(col: pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list<float32>[D]`` column -> ``(rows, D)`` float32 (NaN rows for nulls)."""
    col = col.combine_chunks()
    dim = col.type.list_size
    if col.null_count:
        filled = np.full((len(col), dim), np.nan, dtype=np.float32)
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        filled[valid] = col.filter(col.is_valid()).flatten().to_numpy().reshape(-1, dim)
        return filled
    return col.flatten().to_numpy().reshape(-1, dim).astype(np.float32, copy=False)
