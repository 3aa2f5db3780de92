"""Reading embeddings back: one call to a DataFrame, or plain pandas/polars/duckdb.

Light on purpose: pyarrow, pandas and fsspec only (no torch, no Ray). A reader trusts an
output only as far as its manifest vouches for it: a folder without ``_manifest.json`` (a
run that was killed, or a full disk) or whose parts disagree with the manifest is refused
in one sentence, unless partial data is asked for with ``allow_incomplete=True``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyarrow.types as pat

from vitflow import columns
from vitflow.errors import VitflowError

log = logging.getLogger(__name__)


def load_embeddings(
    uri: str,
    feature: str | None = None,
    split: str | None = None,
    include_errors: bool = False,
    return_vectors: bool = False,
    storage_options: dict | None = None,
    *,
    allow_incomplete: bool = False,
    transform: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
):
    """Load an embeddings output written by ``vitflow embed`` (or an index kept by
    ``vitflow reindex``), or a slice of a ``vitflow matrix`` output.

    Args:
        uri: the output folder (local path or fsspec URL); for a matrix output, its root
            with ``model`` and ``dataset``, or one ``<model>/<dataset>`` folder of it.
        feature: keep only this vector column (default: all of them).
        split: keep only rows of this split (default: all).
        include_errors: keep ``status == 'error'`` rows too (default: ok rows only).
        return_vectors: also return the ``feature`` vectors as one ``float32`` array
            ``(rows, dim)`` in DataFrame order; needs ``feature`` (or a single feature).
        storage_options: fsspec options for object storage (endpoint, anonymous access).
        allow_incomplete: read whatever complete parts there are of an output that has no
            manifest or fewer rows than its manifest lists (a warning says what is missing);
            by default such an output is refused.
        transform: apply this transform, fitted beside the output by ``vitflow fit``
            (:func:`vitflow.analysis.transforms.fit_transform`), to the ``feature`` column
            (which then holds the transformed vectors). One fitted on other data (the output
            was re-embedded, completed or reindexed since) is refused.
        model, dataset: the slice of a matrix output (``uri/model/dataset``): its splits
            together, or the one named by ``split``; the ``split`` column says which.

    Returns:
        A DataFrame, or ``(DataFrame, ndarray)`` when ``return_vectors``.

    Example:
        >>> df, X = load_embeddings("embeddings", feature="emb", split="train",
        ...                         return_vectors=True)  # doctest: +SKIP
    """
    from vitflow.storage import open_fs

    if model is not None or dataset is not None:
        if model is None or dataset is None:
            raise VitflowError("a matrix output is sliced by model= and dataset= together")
        uri = f"{uri.rstrip('/')}/{model}/{dataset}"
    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise VitflowError(f"no embeddings at {uri!r}")
    pair = _pair_manifest(fs, path)
    if pair is not None:
        return _load_pair(
            uri,
            pair,
            split,
            dict(
                feature=feature,
                include_errors=include_errors,
                return_vectors=return_vectors,
                storage_options=storage_options,
                allow_incomplete=allow_incomplete,
                transform=transform,
            ),
        )
    if fs.exists(path.rstrip("/") + "/_delta_log"):
        # An index kept by `vitflow reindex`: read one committed snapshot, never raw files.
        from vitflow.index_table import read_index

        table = read_index(uri, feature, split, include_errors, storage_options)
        vector_cols = [f.name for f in table.schema if pat.is_fixed_size_list(f.type)]
    else:
        files = checked_parts(fs, path, uri, allow_incomplete=allow_incomplete)
        paths = [posixpath.join(path.rstrip("/"), name) for name in files]
        table, vector_cols = _read_parts(fs, paths, uri, feature, split, include_errors)
    if transform is not None:
        table = _transformed(table, uri, transform, feature, vector_cols, storage_options)
    df = table.to_pandas()
    if not return_vectors:
        return df
    name = feature or (vector_cols[0] if len(vector_cols) == 1 else None)
    if name is None:
        raise VitflowError(
            f"return_vectors needs feature=...; {uri!r} has {', '.join(vector_cols)}"
        )
    return df, vectors_of(table.column(name))


def _pair_manifest(fs, path: str) -> dict | None:
    """The manifest of one model/dataset folder of a matrix output, or None."""
    from vitflow.matrix import PAIR_LAYOUT

    f = posixpath.join(path.rstrip("/"), columns.MANIFEST_NAME)
    # A listing cached by this process while a run was writing the folder may hold an old
    # size for the manifest (s3fs reads that many bytes): look again.
    fs.invalidate_cache(path)
    try:
        with fs.open(f, "rb") as fh:
            m = json.loads(fh.read())
    except (FileNotFoundError, ValueError):
        return None  # not a pair; the ordinary reader names what is wrong with the folder
    return m if isinstance(m, dict) and m.get("layout") == PAIR_LAYOUT else None


def _load_pair(uri: str, pair: dict, split: str | None, kw: dict):
    """A model/dataset folder: each split's output loaded as itself, tagged and stacked."""
    import pandas as pd

    splits = list(pair.get("splits", {}))
    if kw["transform"] is not None and split is None and len(splits) > 1:
        # A transform is fitted beside one split output, on its rows: applied to the others
        # it would be refused, and transforms fitted on each split apart would stack vectors
        # in different bases.
        raise VitflowError(
            f"transform= applies to one split output of {uri!r}: pass split= (one of "
            f"{', '.join(splits)})"
        )
    if split is not None:
        if split not in splits:
            raise VitflowError(
                f"{uri!r} has no split {split!r}; its splits: {', '.join(splits) or 'none'}"
            )
        splits = [split]
    frames, vectors = [], []
    for s in splits:
        got = load_embeddings(f"{uri.rstrip('/')}/{s}", **kw)
        df, x = got if kw["return_vectors"] else (got, None)
        df[columns.SPLIT] = s
        frames.append(df)
        vectors.append(x)
    df = pd.concat(frames, ignore_index=True)
    if not kw["return_vectors"]:
        return df
    return df, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)


def _transformed(table, uri, name, feature, vector_cols, storage_options) -> pa.Table:
    """``table`` with its ``feature`` column put through the fitted transform ``name``."""
    from vitflow.analysis.transforms import checked_transform

    feature = feature or (vector_cols[0] if len(vector_cols) == 1 else None)
    if feature is None:
        raise VitflowError(
            f"transform={name!r} applies to one feature: pass feature=...; {uri!r} has "
            f"{', '.join(vector_cols)}"
        )
    fitted = checked_transform(uri, name, feature, storage_options)
    col = table.column(feature)
    y = fitted.apply(vectors_of(col))
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    out = pa.FixedSizeListArray.from_arrays(
        pa.array(y.reshape(-1)), fitted.dim_out, mask=pa.array(~valid) if col.null_count else None
    )
    return table.set_column(table.schema.get_field_index(feature), feature, out)


def checked_parts(fs, path: str, uri: str, *, allow_incomplete: bool = False) -> list[str]:
    """The part files of an embed output, after checking them against its manifest.

    Raises:
        VitflowError: no manifest, a part the manifest lists is missing or has another row
            count, or a part is corrupt (named). With ``allow_incomplete`` only a corrupt
            part is an error; missing data is a warning.
    """
    from vitflow.sinks import part_files

    out = path.rstrip("/")
    names = part_files(fs, out)
    manifest = _manifest(fs, out)
    rows: dict[str, int] = {}
    for name in names:
        try:
            rows[name] = pq.read_metadata(fs.open(posixpath.join(out, name), "rb")).num_rows
        except Exception as e:
            raise VitflowError(
                f"part {posixpath.join(uri.rstrip('/'), name)!r} is corrupt or truncated "
                f"({type(e).__name__}: {str(e)[:200]}); delete it and rerun the job with "
                "--resume to compute it again"
            ) from None
    if manifest is None:
        problem = (
            f"{uri!r} has no {columns.MANIFEST_NAME}: the run that writes it did not finish "
            "(killed, or out of disk), or this is not a vitflow output"
        )
        _incomplete(problem, f"{len(names)} parts with {sum(rows.values())} rows", allow_incomplete)
        return names
    expected = manifest.get("parts")
    if expected is None:  # outputs from before per-part counts: the total must agree
        expected = {}
        if sum(rows.values()) != manifest["counts"]["listed"]:
            _incomplete(
                f"{uri!r} holds {sum(rows.values())} rows but its manifest lists "
                f"{manifest['counts']['listed']} files",
                "the rows that are there",
                allow_incomplete,
            )
    wrong = [
        f"{name} {'is missing' if name not in rows else f'has {rows[name]} rows, not {n}'}"
        for name, n in expected.items()
        if rows.get(name) != n
    ] + [f"{name} is not in the manifest" for name in names if expected and name not in expected]
    if wrong:
        _incomplete(
            f"{uri!r} does not match its manifest ({'; '.join(wrong[:3])}"
            + (f"; +{len(wrong) - 3} more" if len(wrong) > 3 else "")
            + ")",
            "the parts that are there",
            allow_incomplete,
        )
    return [n for n in names if n in rows]


def _incomplete(problem: str, what: str, allow: bool) -> None:
    if allow:
        log.warning("%s; reading %s (allow_incomplete=True)", problem, what)
        return
    raise VitflowError(
        f"{problem}. Rerun the job with --resume to complete it, or pass "
        "allow_incomplete=True to read the parts that are there"
    )


def embed_manifest(fs, path: str) -> dict:
    """The embed manifest of the output at ``path``; for a model/dataset folder of a matrix
    output, that of its first split (its splits share model, features and preprocessing).
    Empty where there is none."""
    pair = _pair_manifest(fs, path)
    if pair is not None and pair.get("splits"):
        path = posixpath.join(path.rstrip("/"), next(iter(pair["splits"])))
    return _manifest(fs, path.rstrip("/")) or {}


def _manifest(fs, out: str) -> dict | None:
    try:
        with fs.open(posixpath.join(out, columns.MANIFEST_NAME), "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise VitflowError(
            f"{posixpath.join(out, columns.MANIFEST_NAME)!r} is not valid JSON ({e}); "
            "rerun the job with --resume to write it again"
        ) from None


def _read_parts(fs, paths, uri, feature, split, include_errors):
    from vitflow.storage import arrow_fs

    if not paths:
        raise VitflowError(f"no parquet parts under {uri!r}")
    dataset = pads.dataset(paths, format="parquet", filesystem=arrow_fs(fs))
    lists = [f.name for f in dataset.schema if pat.is_fixed_size_list(f.type)]
    if feature is not None and feature not in lists:
        raise VitflowError(f"feature {feature!r} is not in {uri!r}; it has {', '.join(lists)}")
    # Dense maps (float16, large) are read only when named; the vectors by default.
    dense = [
        f.name for f in dataset.schema if f.name in lists and pat.is_float16(f.type.value_type)
    ]
    vector_cols = [n for n in lists if n not in dense] if feature is None else [feature]
    keep = [f.name for f in dataset.schema if f.name not in lists or f.name in vector_cols]
    flt = None
    if not include_errors:
        flt = pads.field(columns.STATUS) == columns.STATUS_OK
    if split is not None:
        cond = pads.field(columns.SPLIT) == split
        flt = cond if flt is None else flt & cond
    return dataset.to_table(columns=keep, filter=flt), vector_cols


def load_dense(
    uri: str,
    feature: str,
    split: str | None = None,
    storage_options: dict | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    ids: Sequence[str] | None = None,
):
    """A dense feature's maps (``features: [{dense: true}]``) as one ``float16`` array
    ``(rows, h, w, D)``, with the ok rows' other columns as a DataFrame in the same order.
    ``ids`` reads only those rows (a map is large: read what you need).

    Example:
        >>> df, maps = load_dense("embeddings", "patches")  # doctest: +SKIP
        >>> maps.shape  # doctest: +SKIP
        (1000, 16, 16, 384)
    """
    from vitflow.analysis.source import open_source

    if model is not None or dataset is not None:
        if model is None or dataset is None:
            raise VitflowError("a matrix output is sliced by model= and dataset= together")
        uri = f"{uri.rstrip('/')}/{model}/{dataset}"
    src = open_source(uri, storage_options)
    entry = (embed_manifest(src.fs, src.path).get("features") or {}).get(feature) or {}
    if not entry.get("dense"):
        raise VitflowError(
            f"feature {feature!r} of {uri!r} is not a dense map (its manifest says "
            f"{entry or 'nothing about it'}); read vectors with load_embeddings"
        )
    flt = pads.field(columns.STATUS) == columns.STATUS_OK
    if split is not None:
        flt = flt & (pads.field(columns.SPLIT) == split)
    if ids is not None:
        flt = flt & pads.field(columns.ID).isin(list(ids))
    table = src.dataset.to_table(
        columns=[*(c for c in columns.META_COLUMNS if c in src.dataset.schema.names), feature],
        filter=flt,
    )
    shape = tuple(entry["shape"])
    flat = table.column(feature).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    maps = flat.astype(np.float16, copy=False).reshape(table.num_rows, *shape)
    return table.drop_columns([feature]).to_pandas(), maps


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
