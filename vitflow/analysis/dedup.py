"""Near-duplicate groups: rows whose cosine similarity reaches a threshold, joined
transitively (union-find), written to ``OUTPUT/_dedup/groups.parquet``.

Pairs are found one of two ways, both in bounded memory:

- ``exact``: blocked matrix products. The ok rows are taken in blocks of at most
  :data:`BLOCK_BYTES` of vectors; each block meets every row stored after its start as the
  parts stream by, in tiles of at most :data:`~vitflow.analysis.knn.TILE_ELEMENTS`
  similarities. Every pair is compared once, so the work grows with rows squared: fine up to
  a few hundred thousand rows on a CPU.
- ``index``: the range search of the faiss index ``vitflow index`` built beside the output
  (:mod:`vitflow.analysis.search`): each streamed chunk asks the index for every row above
  the threshold. With an IVF index this is approximate (a pair split across inverted lists
  the query does not visit is missed) but it scales past what the exact method can do.
  ``auto`` uses the index when it is built, else the exact method.

Union-find keeps one integer per ok row (8 bytes) and always roots a group at its first row
in storage order, the group's "first member". The output has one row per member of a group
of two or more: ``id``, ``group`` (0, 1, ... in order of the first members) and
``similarity`` (cosine to the first member, 1 for itself; chaining means a member can be
below the threshold against the first member while above it against another member).
``groups.json`` beside it says how it was made.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.analysis.knn import TILE_ELEMENTS, l2_normalize
from vitflow.errors import VitflowError

DEDUP_DIR = "_dedup"
BLOCK_BYTES = 128 * 2**20


class UnionFind:
    """Groups over ``n`` items whose root is always the group's smallest item; unions of
    whole arrays of pairs at once (vectorised: each round points every larger root at the
    smallest root it meets, until every pair shares a root)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        r = self.parent[x]
        while True:
            up = self.parent[r]
            if np.array_equal(up, r):
                self.parent[x] = r  # path compression
                return r
            r = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        while len(a):
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))

    def roots(self) -> np.ndarray:
        return self.find(np.arange(len(self.parent)))


@dataclass
class DedupResult:
    """What :func:`find_duplicates` found and wrote."""

    uri: str
    feature: str
    threshold: float
    method: str
    rows: int  # ok rows compared
    groups: int
    members: int  # rows in groups of two or more
    largest: list[int]  # sizes of the largest groups
    path: str | None = None

    def text(self) -> str:
        return "\n".join(
            [
                f"vitflow dedup: {self.uri} ({self.feature}, cosine >= {self.threshold}, "
                f"{self.method})",
                f"  rows compared : {self.rows}",
                f"  groups        : {self.groups} ({self.members} rows; "
                f"{self.members - self.groups} could go)",
                f"  largest       : {', '.join(map(str, self.largest)) or '-'}",
                f"  wrote         : {self.path}",
            ]
        )


def find_duplicates(
    uri: str,
    *,
    threshold: float = 0.95,
    feature: str | None = None,
    method: str = "auto",
    storage_options: dict | None = None,
    block_rows: int | None = None,
    batch_rows: int | None = None,
    write: bool = True,
) -> DedupResult:
    """Find groups of near-duplicate rows and write ``OUTPUT/_dedup/groups.parquet``.

    Args:
        uri: an embed output or a reindexed index (local path or fsspec URL).
        threshold: the cosine similarity at which two rows are duplicates. Default 0.95.
        feature: the vector column (default: the only one).
        method: ``exact``, ``index`` or ``auto`` (see the module docstring).
        storage_options: fsspec options for object storage.
        block_rows: rows per block of the exact method (default: :data:`BLOCK_BYTES`).
        batch_rows: rows per streamed batch (default: about 8 MiB of vectors).
        write: write the parquet and its JSON. Default True.

    Example:
        >>> print(find_duplicates("embeddings", threshold=0.95).text())  # doctest: +SKIP
    """
    from vitflow.analysis.search import read_index
    from vitflow.analysis.source import open_source

    if not -1.0 <= threshold <= 1.0:
        raise VitflowError(f"threshold is a cosine similarity in [-1, 1], not {threshold}")
    if method not in ("auto", "exact", "index"):
        raise VitflowError(f"method must be auto, exact or index, not {method!r}")
    src = open_source(uri, storage_options)
    name = src.feature(feature)
    n = src.count(ok=True)
    uf = UnionFind(n)
    index, meta = (None, None) if method == "exact" else read_index(src, name)
    if method == "index" and index is None:
        raise VitflowError(f"{uri!r} has no index of {name!r}; build it with `vitflow index`")
    if index is not None:
        _index_pairs(src, name, index, threshold, uf, batch_rows)
        how = f"{meta['kind']} index range search" + (
            f", nprobe {meta['nprobe']}" if meta["nprobe"] else ""
        )
    else:
        block = block_rows or max(1, BLOCK_BYTES // (4 * src.dims[name]))
        _exact_pairs(src, name, n, block, threshold, uf, batch_rows)
        how = "exact blocked products"
    table = _members(src, name, uf.roots(), batch_rows)
    sizes = np.bincount(table.column("group").to_numpy()) if table.num_rows else np.zeros(0, int)
    result = DedupResult(
        src.uri,
        name,
        threshold,
        how,
        n,
        len(sizes),
        table.num_rows,
        sorted(sizes.tolist(), reverse=True)[:5],
    )
    if write:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        result.path = src.write_file(posixpath.join(DEDUP_DIR, "groups.parquet"), buf.getvalue())
        info = {
            "format": "vitflow.dedup/1",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "feature": name,
            "threshold": threshold,
            "method": how,
            "rows": n,
            "groups": result.groups,
            "members": result.members,
            "built_on": {"kind": src.kind, "fingerprint": src.fingerprint},
            "columns": {
                "id": "the row's id",
                "group": "0, 1, ... in storage order of each group's first member",
                "similarity": "cosine similarity to the group's first member (1 for itself)",
            },
        }
        src.write_file(
            posixpath.join(DEDUP_DIR, "groups.json"), (json.dumps(info, indent=2) + "\n").encode()
        )
    return result


def _exact_pairs(src, name, n, block, threshold, uf, batch_rows) -> None:
    """Pass p compares block p against every row stored from its start on, and gathers
    block p + 1 on the way (pass 0 only gathers block 0)."""
    from vitflow.loading import vectors_of

    starts = list(range(0, n, block))
    current: np.ndarray | None = None
    for p in range(len(starts) + 1):
        a0 = starts[p - 1] if p else 0
        nxt = (starts[p], min(starts[p] + block, n)) if p < len(starts) else None
        gathered = np.empty((nxt[1] - nxt[0], src.dims[name]), np.float32) if nxt else None
        offset = 0
        for _, t in src.batches([name], ok=True, batch_rows=batch_rows):
            c = t.num_rows
            lo, hi = offset, offset + c
            if (current is not None and hi > a0) or (nxt and lo < nxt[1] and hi > nxt[0]):
                x = l2_normalize(vectors_of(t.column(name)))
                if current is not None and hi > a0:
                    _block_pairs(current, a0, x, lo, threshold, uf)
                if nxt and lo < nxt[1] and hi > nxt[0]:
                    s, e = max(lo, nxt[0]), min(hi, nxt[1])
                    gathered[s - nxt[0] : e - nxt[0]] = x[s - lo : e - lo]
            offset = hi
        if offset != n:
            raise VitflowError(f"{src.uri!r} changed while dedup read it ({n} rows, then {offset})")
        current = gathered


def _block_pairs(block, a0, chunk, c0, threshold, uf) -> None:
    """Union every pair (block row i, chunk row j) with j stored after i and similarity >=
    ``threshold``; ``a0``, ``c0`` are the global positions of their first rows."""
    rows = max(1, TILE_ELEMENTS // len(chunk))
    cols = c0 + np.arange(len(chunk))
    for s in range(0, len(block), rows):
        sim = block[s : s + rows] @ chunk.T  # (q, c) cosine similarities
        i, j = np.nonzero(sim >= threshold)
        i, j = a0 + s + i, cols[j]
        later = j > i
        if later.any():
            uf.union(i[later], j[later])


def _index_pairs(src, name, index, threshold, uf, batch_rows) -> None:
    from vitflow.loading import vectors_of

    offset = 0
    for _, t in src.batches([name], ok=True, batch_rows=batch_rows):
        x = l2_normalize(vectors_of(t.column(name)))
        # faiss keeps pairs strictly above the radius; step just below it to keep ">=".
        lims, _, found = index.range_search(x, float(np.nextafter(np.float32(threshold), -2)))
        rows = offset + np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
        keep = found != rows
        uf.union(rows[keep], found[keep])
        offset += len(x)


def _members(src, name, roots: np.ndarray, batch_rows) -> pa.Table:
    """id, group, similarity of every row in a group of two or more: one pass gathers the
    first members' vectors, the next compares each member with its first member."""
    from vitflow.loading import vectors_of

    schema = pa.schema([("id", pa.string()), ("group", pa.int64()), ("similarity", pa.float32())])
    counts = np.bincount(roots, minlength=len(roots))
    grouped = counts[roots] >= 2
    firsts = np.flatnonzero(grouped & (roots == np.arange(len(roots))))
    if not len(firsts):
        return schema.empty_table()
    group_of = np.full(len(roots), -1, np.int64)
    group_of[firsts] = np.arange(len(firsts))
    group = np.where(grouped, group_of[roots], -1)
    first_vec = np.empty((len(firsts), src.dims[name]), np.float32)
    offset = 0
    for _, t in src.batches([name], ok=True, batch_rows=batch_rows):
        lo, hi = np.searchsorted(firsts, [offset, offset + t.num_rows])
        if hi > lo:
            x = l2_normalize(vectors_of(t.column(name)))
            first_vec[lo:hi] = x[firsts[lo:hi] - offset]
        offset += t.num_rows
    ids, groups, sims = [], [], []
    offset = 0
    for _, t in src.batches([columns.ID, name], ok=True, batch_rows=batch_rows):
        local = np.flatnonzero(grouped[offset : offset + t.num_rows])
        if len(local):
            x = l2_normalize(vectors_of(t.column(name))[local])
            g = group[offset + local]
            sim = np.einsum("ij,ij->i", x, first_vec[g])
            sim[offset + local == firsts[g]] = 1.0
            ids.append(t.column(columns.ID).take(pa.array(local)))
            groups.append(g)
            sims.append(sim.astype(np.float32))
        offset += t.num_rows
    table = pa.table(
        {
            "id": pa.concat_arrays([a for c in ids for a in c.chunks]),
            "group": np.concatenate(groups),
            "similarity": np.concatenate(sims),
        },
        schema=schema,
    )
    # storage order within each group: the first member first
    order = np.argsort(table.column("group").to_numpy(), kind="stable")
    return table.take(pa.array(order))
