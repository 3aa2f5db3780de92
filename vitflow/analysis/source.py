"""An embeddings output opened for streaming: the one reader every analysis goes through.

An embed output's parquet parts (checked against its manifest, in part order) and a
reindexed Delta index's data files (one snapshot) look alike here: :meth:`batches` yields
arrow tables of a bounded size, part by part, with vectors as ``fixed_size_list<float32>[D]``
whatever the storage. Nothing reads more than one batch of vectors at a time, so an output
of any size streams through in bounded memory.

The source also says what the data is (:attr:`EmbeddingSource.fingerprint`): fitted
transforms remember it and refuse data they were not fitted on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyarrow.types as pat

from vitflow import columns
from vitflow.errors import VitflowError

# Vectors per streamed batch: about this many bytes of float32 (a 768-d feature: 2,730 rows).
# Measured on 100k x 768: streaming every vector peaks ~130 MB above the imports at 8 MiB,
# ~210 MB at 16-32 MiB, for no gain in speed.
CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class EmbeddingSource:
    """An output opened for streaming (see :func:`open_source`)."""

    uri: str
    kind: str  # "parts" (vitflow embed) | "delta" (vitflow reindex)
    dataset: pads.Dataset
    fragments: tuple  # parquet parts / Delta data files, in a fixed order
    dims: dict[str, int]  # vector column -> width
    specs: dict[str, dict]  # vector column -> how it was made (layers, pool, aggregate)
    data: dict[str, Any]  # what the fingerprint is made of
    fs: Any = field(repr=False)
    path: str = ""

    @property
    def fingerprint(self) -> str:
        """sha256 of :attr:`data`: the same rows and vectors give the same fingerprint."""
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()

    def features(self, feature: str | Sequence[str] | None = None) -> list[str]:
        """The vector columns asked for (all of them by default), each checked to exist."""
        if feature is None:
            if not self.dims:
                raise VitflowError(f"{self.uri!r} has no vector columns")
            return list(self.dims)
        names = [feature] if isinstance(feature, str) else list(feature)
        for name in names:
            if name not in self.dims:
                raise VitflowError(
                    f"feature {name!r} is not in {self.uri!r}; it has {', '.join(self.dims)}"
                )
        return names

    def feature(self, feature: str | None) -> str:
        """One vector column: ``feature``, or the only one there is."""
        if feature is None and len(self.dims) != 1:
            raise VitflowError(
                f"{self.uri!r} has several features ({', '.join(self.dims)}); name one with "
                "feature=... (--feature)"
            )
        return self.features(feature)[0]

    def batches(
        self,
        names: Sequence[str],
        *,
        ok: bool = False,
        split: str | None = None,
        ids: Sequence[str] | None = None,
        batch_rows: int | None = None,
    ) -> Iterator[tuple[int, pa.Table]]:
        """``(fragment index, table)`` of the columns ``names``, part by part in a fixed order
        (rows in storage order), at most ``batch_rows`` rows each (default: about
        :data:`CHUNK_BYTES` of vectors); only ok rows with ``ok``, only rows of ``split``,
        only rows whose id is in ``ids``. Empty batches are skipped.

        Each part is read with ``ParquetFile.iter_batches`` rather than a dataset scanner:
        a scanner decodes whole row groups ahead (an embed part is one), which for wide
        vectors holds several times more memory than the batch itself."""
        vectors = [n for n in names if n in self.dims]
        if batch_rows is None:
            width = 4 * sum(self.dims[n] for n in vectors)
            batch_rows = max(256, CHUNK_BYTES // width) if width else 1 << 16
        flt = rows_filter(split, include_errors=not ok)
        extra = [columns.STATUS] * ok + [columns.SPLIT] * (split is not None)
        if ids is not None:
            cond = pads.field(columns.ID).isin(pa.array(list(ids), pa.string()))
            flt = cond if flt is None else flt & cond
            extra.append(columns.ID)
        need = list(dict.fromkeys([*names, *extra]))
        for i, fragment in enumerate(self.fragments):
            f = pq.ParquetFile(fragment.path, filesystem=self.dataset.filesystem, pre_buffer=False)
            have = set(f.schema_arrow.names)
            read = [c for c in need if c in have]
            for batch in f.iter_batches(batch_size=batch_rows, columns=read, use_threads=False):
                table = pa.Table.from_batches([batch])
                for c in need:
                    if c not in have:  # a Delta data file older than a column
                        table = table.append_column(
                            self.dataset.schema.field(c),
                            pa.nulls(len(table), self.dataset.schema.field(c).type),
                        )
                if flt is not None:
                    table = table.filter(flt)
                if table.num_rows:
                    yield i, self._fixed(table.select(list(names)), vectors)

    def count(self, *, ok: bool = False, split: str | None = None) -> int:
        """Rows :meth:`batches` would give with the same ``ok`` and ``split``."""
        return self.dataset.count_rows(filter=rows_filter(split, include_errors=not ok))

    def empty_table(self, names: Sequence[str]) -> pa.Table:
        """No rows, with the columns (and vector types) :meth:`batches` gives."""
        schema = pa.schema([self.dataset.schema.field(n) for n in names])
        return self._fixed(schema.empty_table(), [n for n in names if n in self.dims])

    def _fixed(self, table: pa.Table, vectors: list[str]) -> pa.Table:
        # A Delta index stores list<float32> (its protocol has no fixed-size lists).
        for name in vectors:
            col = table.column(name)
            if not pat.is_fixed_size_list(col.type):
                i = table.schema.get_field_index(name)
                table = table.set_column(i, name, col.cast(pa.list_(pa.float32(), self.dims[name])))
        return table

    def write_file(self, relpath: str, data: bytes) -> str:
        """Write ``data`` atomically at ``relpath`` beside the output; returns its location."""
        from vitflow.storage import write_atomic

        path = posixpath.join(self.path.rstrip("/"), relpath)
        write_atomic(self.fs, path, data)
        return posixpath.join(self.uri.rstrip("/"), relpath)


def rows_filter(
    split: str | None = None, *, include_errors: bool = False
) -> pads.Expression | None:
    """The row filter every reader uses: ok rows (unless ``include_errors``) of ``split``."""
    flt = None if include_errors else pads.field(columns.STATUS) == columns.STATUS_OK
    if split is not None:
        cond = pads.field(columns.SPLIT) == split
        flt = cond if flt is None else flt & cond
    return flt


def open_source(uri: str, storage_options: dict | None = None) -> EmbeddingSource:
    """Open an embed output (checked against its manifest) or a reindexed Delta index.

    Raises:
        VitflowError: nothing there, no manifest, parts that disagree with it, no Delta table.
    """
    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise VitflowError(f"no embeddings at {uri!r}")
    if fs.exists(path.rstrip("/") + "/_delta_log"):
        return _open_delta(uri, storage_options, fs, path)
    from vitflow.loading import _pair_manifest

    pair = _pair_manifest(fs, path)
    if pair is not None:
        return _open_pair(uri, fs, path, pair)
    return _open_parts(uri, fs, path)


def _open_pair(uri: str, fs, path: str, pair: dict) -> EmbeddingSource:
    """A model/dataset folder of a matrix output: its split outputs read as one (each row
    keeps the split value its output gave it), so eval's train/test protocol runs on it."""
    splits = list(pair.get("splits") or {})
    if not splits:
        raise VitflowError(f"{uri!r} lists no split outputs in its manifest")
    if len(splits) == 1:  # e.g. a dataset without split folders: "all", rows without a split
        return _open_parts(
            f"{uri.rstrip('/')}/{splits[0]}", fs, posixpath.join(path.rstrip("/"), splits[0])
        )
    subs = [
        _open_parts(f"{uri.rstrip('/')}/{s}", fs, posixpath.join(path.rstrip("/"), s))
        for s in splits
    ]
    for s, sub in zip(splits, subs, strict=True):
        values = set(sub.dataset.to_table(columns=[columns.SPLIT]).column(0).unique().to_pylist())
        if values != {s}:
            # A split named in `splits:` as a list of files keeps its rows' own (often no)
            # split values: read as one, its rows would not say which split they are.
            raise VitflowError(
                f"the rows of {uri.rstrip('/')}/{s} carry split values "
                f"{sorted(map(str, values))}, not {s!r}, so its splits cannot be read as one "
                "output; read each split output on its own"
            )
    if any(sub.dims != subs[0].dims for sub in subs):
        raise VitflowError(
            f"the split outputs of {uri!r} hold different features: "
            + "; ".join(f"{s}: {sub.dims}" for s, sub in zip(splits, subs, strict=True))
        )
    dataset = pads.dataset(
        [f.path for sub in subs for f in sub.fragments],
        format="parquet",
        filesystem=subs[0].dataset.filesystem,
    )
    data = {"kind": "pair", "splits": {s: sub.data for s, sub in zip(splits, subs, strict=True)}}
    return EmbeddingSource(
        uri,
        "parts",
        dataset,
        tuple(dataset.get_fragments()),
        subs[0].dims,
        subs[0].specs,
        data,
        fs,
        path,
    )


def _open_parts(uri: str, fs, path: str) -> EmbeddingSource:
    from vitflow.loading import _manifest, checked_parts
    from vitflow.storage import arrow_fs

    out = path.rstrip("/")
    names = checked_parts(fs, path, uri)
    if not names:
        raise VitflowError(f"no parquet parts under {uri!r}")
    manifest = _manifest(fs, out) or {}
    dataset = pads.dataset(
        [posixpath.join(out, n) for n in names], format="parquet", filesystem=arrow_fs(fs)
    )
    fragments = tuple(dataset.get_fragments())
    dims = vector_dims(dataset.schema)
    specs = {
        name: {k: v for k, v in entry.items() if k != "dim"}
        for name, entry in (manifest.get("features") or {}).items()
    }
    parts = manifest.get("parts") or {
        n: f.metadata.num_rows for n, f in zip(names, fragments, strict=True)
    }
    data = {
        "kind": "parts",
        "identity": (manifest.get("identity") or {}).get("fingerprint"),
        "parts": {n: parts[n] for n in names},
    }
    return EmbeddingSource(uri, "parts", dataset, fragments, dims, specs, data, fs, path)


def vector_dims(schema: pa.Schema) -> dict[str, int]:
    """The vector columns (``fixed_size_list<float32>``) and their widths; a dense feature's
    map (``float16``, :mod:`vitflow.features`) is not a vector to score, search or plot."""
    return {
        f.name: f.type.list_size
        for f in schema
        if pat.is_fixed_size_list(f.type) and pat.is_float32(f.type.value_type)
    }


def _open_delta(uri: str, storage_options, fs, path: str) -> EmbeddingSource:
    from vitflow.index_table import (
        delta_storage_options,
        feature_dims,
        open_table,
        stored_job,
        table_schema,
    )

    dt = open_table(uri, delta_storage_options(uri, storage_options))
    if dt is None:
        raise VitflowError(f"no index (Delta table) at {uri!r}; build it with `vitflow reindex`")
    fingerprint, job = stored_job(dt)
    dataset = dt.to_pyarrow_dataset()
    specs = {
        f["name"]: {k: v for k, v in f.items() if k != "name"} for f in job.get("features") or []
    }
    data = {"kind": "delta", "identity": fingerprint, "version": dt.version()}
    return EmbeddingSource(
        uri,
        "delta",
        dataset,
        tuple(dataset.get_fragments()),
        feature_dims(table_schema(dt)),
        specs,
        data,
        fs,
        path,
    )


def describe_spec(spec: dict | None) -> str:
    """One line for a feature's spec: ``layers [8, 9, 10, 11] mean concat``."""
    if not spec:
        return "-"
    if spec.get("source") == "head":
        return "projection head"
    layers = spec.get("layers")
    layers = f"last {layers}" if isinstance(layers, int) else f"{layers}"
    words = [f"layers {layers}", spec.get("pool"), spec.get("aggregate")]
    if spec.get("norm"):
        words.append("norm")
    return " ".join(str(w) for w in words if w is not None)


def require_train_extra(command: str) -> None:
    """Refuse in one sentence when scikit-learn or matplotlib (the ``[analysis]`` extra) is
    missing."""
    needed = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
    missing = [dist for mod, dist in needed.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise VitflowError(
            f"{command} needs {' and '.join(missing)}, which a plain install leaves out: "
            "pip install 'vitflow[analysis]'"
        )
