"""Nearest-neighbour search over an output: a faiss index beside it, and exact search.

``vitflow index OUTPUT --feature emb`` builds ``OUTPUT/_index/FEATURE.faiss`` (the index),
``FEATURE.rows.parquet`` (id, path, label of index row i: the ok rows in storage order) and
``FEATURE.json`` (how it was built, the data's fingerprint, recall@10), the JSON last: an
index without one is incomplete and never read. Similarity is the inner product of
L2-normalised vectors (cosine), so index hits and exact search rank alike.

The index type is chosen by size:

- up to :data:`FLAT_MAX_ROWS` rows, ``IndexFlatIP``: exact, and a query over 100,000
  768-d rows takes a few milliseconds, so nothing is gained by approximating;
- above, ``IVF{nlist},Flat`` (inverted lists, full vectors, so the similarities it prints are
  exact for the rows it finds): ``nlist`` about ``4 * sqrt(rows)``, its k-means trained on a
  seeded sample (:func:`vitflow.sample_embeddings`, at least 39 rows per list) and
  ``nprobe`` chosen as the smallest power of two whose recall@10 on the sample queries
  reaches :data:`RECALL_TARGET`.

Either way the vectors are added part by part (one batch in memory besides the index), and
recall@10 against exact search (:func:`exact_neighbours`: blocked products over all rows,
streamed) is measured on a seeded sample of :data:`RECALL_QUERIES` rows, printed and stored.
faiss (``faiss-cpu``, the ``[analysis]`` extra) is imported only here.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.analysis.knn import KnnAccumulator, l2_normalize
from vitflow.errors import VitflowError

INDEX_DIR = "_index"
FLAT_MAX_ROWS = 100_000
RECALL_QUERIES = 1000
RECALL_TARGET = 0.95
TRAIN_PER_LIST = 64  # k-means sample rows per inverted list (faiss warns below 39)
TRAIN_BYTES = 1 << 30  # at most this much float32 training sample
ROWS = (columns.ID, columns.PATH, columns.LABEL)


@dataclass
class Neighbours:
    """What :func:`search` found: the query and its neighbours, best first."""

    query: str  # the image path or the row id asked about
    feature: str
    method: str  # "flat index" | "ivf index (nprobe N)" | "exact (no index)"
    rows: list[dict] = field(default_factory=list)  # rank, id, path, label, similarity

    def text(self) -> str:
        lines = [f"vitflow search: {self.query} ({self.feature}, {self.method})"]
        for r in self.rows:
            lines.append(
                f"  {r['rank']:>3}  {r['similarity']:.4f}  {r['label'] or '-':<12}  {r['path']}"
            )
        return "\n".join(lines)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VitflowError(
            "vitflow index needs faiss-cpu, which a plain install leaves out: "
            "pip install 'vitflow[analysis]'"
        ) from None
    return faiss


def exact_neighbours(
    src, name: str, queries: np.ndarray, k: int, *, batch_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar ok rows of each query, by a streamed pass over all rows.

    Returns:
        ``(similarities, positions)``, both ``(q, k)``, best first; positions count ok rows
        in storage order (an index's row numbers); ``-1`` / ``-inf`` where there are fewer
        than ``k`` rows.
    """
    from vitflow.loading import vectors_of

    acc = KnnAccumulator(queries, k=k)
    offset = 0
    for _, t in src.batches([name], ok=True, batch_rows=batch_rows):
        acc.update(vectors_of(t.column(name)), np.arange(offset, offset + t.num_rows))
        offset += t.num_rows
    order = np.argsort(-acc.sims, axis=1, kind="stable")
    return np.take_along_axis(acc.sims, order, 1), np.take_along_axis(acc.labels, order, 1)


def rows_at(src, positions, names=ROWS) -> pa.Table:
    """The columns ``names`` of the ok rows at ``positions`` (storage order), in that order."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    want = np.unique(positions[positions >= 0])
    got, offset = [], 0
    for _, t in src.batches(list(names), ok=True):
        lo, hi = np.searchsorted(want, [offset, offset + t.num_rows])
        if hi > lo:
            got.append(t.take(pa.array(want[lo:hi] - offset)))
        offset += t.num_rows
        if hi == len(want):
            break
    table = pa.concat_tables(got) if got else src.empty_table(list(names))
    return table.take(pa.array(np.searchsorted(want, positions[positions >= 0])))


def index_paths(src, name: str) -> dict[str, str]:
    """Where the index of feature ``name`` lives, relative to the output."""
    return {
        k: posixpath.join(INDEX_DIR, f"{name}.{ext}")
        for k, ext in (("index", "faiss"), ("rows", "rows.parquet"), ("meta", "json"))
    }


def build_index(
    uri: str,
    *,
    feature: str | None = None,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    recall_queries: int = RECALL_QUERIES,
    storage_options: dict | None = None,
    batch_rows: int | None = None,
) -> dict:
    """Build the nearest-neighbour index of one feature beside the output.

    Args:
        uri: an embed output or a reindexed index (local path or fsspec URL).
        feature: the vector column (default: the only one).
        kind: ``flat`` (exact), ``ivf`` or ``auto`` (flat up to :data:`FLAT_MAX_ROWS` rows).
        nlist: inverted lists of an IVF index (default about ``4 * sqrt(rows)``).
        nprobe: lists an IVF query visits (default: chosen on the sample, see above).
        seed: seeds the training sample and the recall queries.
        recall_queries: rows whose neighbours measure recall@10. Default 1,000.
        storage_options: fsspec options for object storage.
        batch_rows: rows per streamed batch (default: about 8 MiB of vectors).

    Returns:
        The index's JSON (also written as ``_index/FEATURE.json``).

    Example:
        >>> meta = build_index("embeddings", feature="emb")  # doctest: +SKIP
        >>> meta["recall_at_10"]["value"]  # doctest: +SKIP
        1.0
    """
    from vitflow import __version__
    from vitflow.analysis.sample import sample_embeddings
    from vitflow.analysis.source import open_source
    from vitflow.loading import vectors_of

    faiss = _faiss()
    if kind not in ("auto", "flat", "ivf"):
        raise VitflowError(f"index kind must be auto, flat or ivf, not {kind!r}")
    src = open_source(uri, storage_options)
    name = src.feature(feature)
    dim, n = src.dims[name], src.count(ok=True)
    if n == 0:
        raise VitflowError(f"{uri!r} has no ok rows to index")
    paths = index_paths(src, name)
    _remove(src, paths["meta"])  # from here until the new JSON, no index is trusted
    kind = ("flat" if n <= FLAT_MAX_ROWS else "ivf") if kind == "auto" else kind
    train_rows = 0
    if kind == "ivf":
        nlist = nlist or max(1, round(4 * math.sqrt(n)))
        train_rows = min(n, TRAIN_PER_LIST * nlist, TRAIN_BYTES // (4 * dim))
        nlist = max(1, min(nlist, train_rows // 39))
        train = sample_embeddings(
            uri, train_rows, seed, feature=name, storage_options=storage_options
        )
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(l2_normalize(np.stack(train[name].to_numpy())))
        del train
    else:
        index = faiss.IndexFlatIP(dim)
    writer = None
    rows_path = posixpath.join(src.path.rstrip("/"), paths["rows"])
    src.fs.makedirs(posixpath.dirname(rows_path), exist_ok=True)
    with src.fs.open(rows_path, "wb") as f:
        for _, t in src.batches([*ROWS, name], ok=True, batch_rows=batch_rows):
            index.add(l2_normalize(vectors_of(t.column(name))))
            rows = t.select(list(ROWS))
            writer = writer or pq.ParquetWriter(f, rows.schema)
            writer.write_table(rows, row_group_size=1 << 16)
        writer.close()
    if index.ntotal != n:
        raise VitflowError(f"{uri!r} changed while it was indexed ({n} rows, then {index.ntotal})")
    recall = _recall(src, name, index, kind, nprobe, seed, recall_queries, storage_options)
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = recall["nprobe"]
    src.write_file(paths["index"], faiss.serialize_index(index).tobytes())
    meta = {
        "format": "vitflow.index/1",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "feature": name,
        "dim": dim,
        "rows": int(n),
        "kind": kind,
        "factory": "Flat" if kind == "flat" else f"IVF{nlist},Flat",
        "metric": "inner product of L2-normalised vectors (cosine similarity)",
        "nlist": nlist if kind == "ivf" else None,
        "nprobe": recall["nprobe"],
        "train_rows": train_rows or None,
        "seed": seed,
        "recall_at_10": {k: v for k, v in recall.items() if k != "nprobe"},
        "built_on": {"kind": src.kind, "fingerprint": src.fingerprint},
        "files": {"index": paths["index"], "rows": paths["rows"]},
        "versions": {"faiss": faiss.__version__, "vitflow": __version__},
    }
    meta["uri"] = src.write_file(paths["meta"], (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _recall(src, name, index, kind, nprobe, seed, n_queries, storage_options) -> dict:
    """recall@10 of ``index`` against exact search on a seeded sample of its own rows (and,
    for IVF without ``nprobe``, the smallest power-of-two nprobe reaching the target)."""
    import faiss

    from vitflow.analysis.sample import sample_embeddings

    sample = sample_embeddings(
        src.uri, n_queries, seed, feature=name, storage_options=storage_options
    )
    q = l2_normalize(np.stack(sample[name].to_numpy()))
    k = min(10, index.ntotal)
    _, exact = exact_neighbours(src, name, q, k)

    def measure(probe: int | None) -> float:
        if probe is not None:
            faiss.extract_index_ivf(index).nprobe = probe
        _, found = index.search(q, k)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))

    out = {
        "k": k,
        "queries": len(q),
        "against": "exact search over every row (blocked inner products)",
    }
    if kind == "flat":
        return {**out, "value": measure(None), "nprobe": None}
    nlist = faiss.extract_index_ivf(index).nlist
    tried: dict[str, float] = {}
    probes = [nprobe] if nprobe else [2**i for i in range(int(math.log2(nlist)) + 1)] + [nlist]
    for p in dict.fromkeys(min(p, nlist) for p in probes):
        tried[str(p)] = measure(p)
        if tried[str(p)] >= RECALL_TARGET:
            break
    chosen = int(next(iter(p for p, r in tried.items() if r >= RECALL_TARGET), list(tried)[-1]))
    return {**out, "value": tried[str(chosen)], "nprobe": chosen, "by_nprobe": tried}


def _remove(src, relpath: str) -> None:
    path = posixpath.join(src.path.rstrip("/"), relpath)
    if src.fs.exists(path):
        src.fs.rm(path)


def read_index(src, name: str, *, required: bool = False):
    """``(faiss index, meta)`` of feature ``name``, or ``(None, None)`` when none is built.

    Raises:
        VitflowError: the index was built on other data (the output changed since), or is
            missing with ``required``.
    """
    paths = index_paths(src, name)
    base = src.path.rstrip("/")
    try:
        with src.fs.open(posixpath.join(base, paths["meta"]), "rb") as f:
            meta = json.load(f)
    except FileNotFoundError:
        if required:
            raise VitflowError(
                f"{src.uri!r} has no index of {name!r}; build it with "
                f"`vitflow index {src.uri} --feature {name}`"
            ) from None
        return None, None
    if meta["built_on"]["fingerprint"] != src.fingerprint:
        raise VitflowError(
            f"the index of {name!r} in {src.uri!r} was built on other data (the output was "
            "re-embedded, completed or reindexed since); rebuild it with "
            f"`vitflow index {src.uri} --feature {name}`"
        )
    faiss = _faiss()
    with src.fs.open(posixpath.join(base, paths["index"]), "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
    return index, meta


def index_rows(src, meta: dict, positions: np.ndarray) -> pa.Table:
    """id, path, label of index rows ``positions`` (from the index's rows file)."""
    positions = np.asarray(positions, np.int64)
    with src.fs.open(posixpath.join(src.path.rstrip("/"), meta["files"]["rows"]), "rb") as f:
        pf = pq.ParquetFile(f)
        if positions.size == 0:  # e.g. an IVF search whose probed lists were all empty
            return pf.schema_arrow.empty_table()
        starts = np.cumsum(
            [0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        )
        groups = sorted({int(np.searchsorted(starts, p, side="right") - 1) for p in positions})
        table = pf.read_row_groups(groups)
    local = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    return table.take(pa.array(np.searchsorted(local, positions)))


def search(
    uri: str,
    *,
    image: str | None = None,
    id: str | None = None,
    k: int = 10,
    feature: str | None = None,
    job: str | None = None,
    storage_options: dict | None = None,
) -> Neighbours:
    """The ``k`` nearest ok rows of a query image (embedded as the job did) or of a row.

    Uses the index beside the output when one is built (``vitflow index``); otherwise an
    exact streamed search over every row.

    Args:
        uri: an embed output or a reindexed index.
        image: a query image file (local or fsspec URL), embedded with the output's model,
            weights, preprocessing and feature spec (:mod:`vitflow.analysis.query`).
        id: or the id of a row of the output.
        k: neighbours to return. Default 10.
        feature: the vector column (default: the only one).
        job: the job file to embed ``image`` with instead of the stored one (a Delta index
            needs it); it must give the output's vectors.
        storage_options: fsspec options for object storage.

    Example:
        >>> print(search("embeddings", image="query.jpg", k=5).text())  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source
    from vitflow.loading import vectors_of

    if (image is None) == (id is None):
        raise VitflowError("give a query: an image (--image FILE) or a row id (--id ID)")
    if k < 1:
        raise VitflowError(f"k must be at least 1, not {k}")
    src = open_source(uri, storage_options)
    name = src.feature(feature)
    if image is not None:
        from vitflow.analysis.query import query_embedder

        vectors, errors = query_embedder(uri, job=job, storage_options=storage_options).embed(
            [image], storage_options
        )
        if errors[0] is not None:
            raise VitflowError(f"cannot embed {image!r}: {errors[0]}")
        q = vectors[name]
    else:
        got = [t for _, t in src.batches([name, columns.STATUS], ids=[id])]
        table = pa.concat_tables(got) if got else None
        if table is None or not table.num_rows:
            raise VitflowError(f"no row with id {id!r} in {uri!r}")
        if table.column(columns.STATUS)[0].as_py() != columns.STATUS_OK:
            raise VitflowError(f"row {id!r} is an error row: it has no vector")
        q = vectors_of(table.column(name))[:1]
    q = l2_normalize(q)
    index, meta = read_index(src, name)
    if index is None:
        sims, pos = exact_neighbours(src, name, q, k)
        rows, method = rows_at(src, pos[0]), "exact search (no index: `vitflow index` builds one)"
    else:
        sims, pos = index.search(q, min(k, index.ntotal))
        rows = index_rows(src, meta, pos[0][pos[0] >= 0])
        method = f"{meta['kind']} index" + (f", nprobe {meta['nprobe']}" if meta["nprobe"] else "")
    found = rows.to_pylist()
    sims = sims[0][pos[0] >= 0]
    return Neighbours(
        query=image if image is not None else f"id {id}",
        feature=name,
        method=method,
        rows=[
            {"rank": i + 1, **r, "similarity": float(s)}
            for i, (r, s) in enumerate(zip(found, sims, strict=True))
        ],
    )
