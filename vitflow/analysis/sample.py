"""Deterministic samples of an output: the same seed gives the same rows, whatever the
sharding.

Every row gets a key that depends only on its id and the seed (:func:`id_keys`: the first
8 bytes of BLAKE2b of the id, keyed with the seed); a sample of ``n`` is the ``n`` rows with
the smallest keys. Each part keeps its ``n`` smallest and merges them into a running best,
so memory is ``O(n)`` plus one batch, and splitting the same rows into other parts cannot
change which are chosen. Keys are uniform 64-bit numbers, so "smallest keys" is a uniform
random sample without replacement.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa

from vitflow import columns


def id_keys(
    ids: pa.Array | pa.ChunkedArray | list[str], seed: int, *, salt: str = ""
) -> np.ndarray:
    """``uint64`` key of each id: BLAKE2b-64 of its UTF-8 bytes, keyed with ``salt`` and
    ``seed``. Independent of where the row is stored; another seed (or salt) gives an
    unrelated order."""
    key = hashlib.blake2b(f"vitflow{salt}:{int(seed)}".encode(), digest_size=16).digest()
    if isinstance(ids, pa.ChunkedArray | pa.Array):
        ids = ids.cast(pa.binary()).to_pylist()
    else:
        ids = [s.encode() for s in ids]
    digest = b"".join(
        [hashlib.blake2b(s, digest_size=8, key=key).digest() for s in ids]  # type: ignore[arg-type]
    )
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)


def remix(keys: np.ndarray, salt: int) -> np.ndarray:
    """Another independent ``uint64`` key per row from :func:`id_keys`' keys (splitmix64 of
    ``key XOR salt``): one hash of the ids serves several seeded choices."""
    with np.errstate(over="ignore"):
        z = np.asarray(keys, np.uint64) ^ np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def proportional_quotas(counts: dict, n: int) -> dict:
    """Split ``n`` over groups in proportion to ``counts`` (largest remainder, Hamilton):
    each group gets ``floor(n * c / total)``; the seats left over go one each to the groups
    with the largest remainders, ties to the larger group, then to the group that sorts
    first. No group gets more rows than it has; ``n >= total`` takes every row."""
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    exact = {g: n * c / total for g, c in counts.items()}
    quotas = {g: int(np.floor(e)) for g, e in exact.items()}
    left = n - sum(quotas.values())
    order = sorted(counts, key=lambda g: (-(exact[g] - quotas[g]), -counts[g], _sort_key(g)))
    for g in order[:left]:
        quotas[g] += 1
    return quotas


def _sort_key(group):
    return (group is None, "" if group is None else str(group))


def sample_embeddings(
    uri: str,
    n: int,
    seed: int = 0,
    *,
    feature: str | None = None,
    split: str | None = None,
    stratify: bool = False,
    storage_options: dict | None = None,
):
    """A deterministic sample of ``n`` ok rows (vectors with their metadata) of an embed
    output or a reindexed index.

    The rows are those with the ``n`` smallest :func:`id_keys` (seeded hash of the id), so
    the same seed gives the same rows however the output is split into parts, and (without
    ``stratify``) a larger ``n`` extends a smaller sample. With ``stratify=True`` each label
    (rows without one form their own group) gets :func:`proportional_quotas` of ``n`` by
    its share of the rows (largest remainder), and its rows with the smallest keys.

    Args:
        uri: the output folder or index (local path or fsspec URL).
        n: rows to return (all rows when there are fewer).
        seed: which sample; the same seed gives the same rows.
        feature: keep only this vector column (default: all of them).
        split: sample only rows of this split (default: all).
        stratify: sample each label in proportion to its share (see above).
        storage_options: fsspec options for object storage.

    Returns:
        A DataFrame like :func:`vitflow.load_embeddings`'s, ordered by key (rank in the
        sample), with a fresh index.

    Example:
        >>> df = sample_embeddings("embeddings", 1000, seed=0, feature="emb")  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source

    if n < 0:
        raise ValueError(f"Expected n >= 0, but got {n}")
    src = open_source(uri, storage_options)
    vectors = src.features(feature)
    if stratify:
        counts: Counter = Counter()
        for _, t in src.batches([columns.LABEL], ok=True, split=split):
            counts.update(t.column(columns.LABEL).to_pylist())
        quotas = proportional_quotas(dict(counts), n)
        groups = [g for g, q in quotas.items() if q > 0]
        code_of = {g: i for i, g in enumerate(groups)}
        picked = [_Smallest(quotas[g]) for g in groups]
        for _, t in src.batches([columns.ID, columns.LABEL], ok=True, split=split):
            codes = np.asarray([code_of.get(g, -1) for g in t[columns.LABEL].to_pylist()])
            keys = id_keys(t.column(columns.ID), seed)
            ids = np.asarray(t.column(columns.ID).to_pylist(), dtype=object)
            for c in np.unique(codes[codes >= 0]):
                picked[c].add(keys[codes == c], ids[codes == c])
        keys, ids = _Smallest.merge(picked)
    else:
        best = _Smallest(n)
        for _, t in src.batches([columns.ID], ok=True, split=split):
            best.add(
                id_keys(t.column(columns.ID), seed), np.asarray(t[columns.ID].to_pylist(), object)
            )
        keys, ids = best.result()
    rank = {i: r for r, i in enumerate(ids[np.lexsort((ids.astype(str), keys))])}
    want = [c for c in src.dataset.schema.names if c in columns.META_COLUMNS] + vectors
    pieces = [t for _, t in src.batches(want, ok=True, split=split, ids=list(rank))] if rank else []
    table = pa.concat_tables(pieces) if pieces else src.empty_table(want)
    order = np.argsort([rank[i] for i in table.column(columns.ID).to_pylist()], kind="stable")
    table = table.take(pa.array(order, pa.int64()))
    return table.to_pandas()


class _Smallest:
    """The ``n`` (key, id) pairs with the smallest keys seen so far (ties by id).

    Batches are buffered and cut back to ``n`` once the buffer holds ``max(2n, 65536)``
    pairs, so each row is sorted O(1) times: O(rows) work and O(n) memory in all."""

    def __init__(self, n: int):
        self.n = n
        self.keys: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.size = 0

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        if self.n == 0:
            return
        if len(keys) > self.n:
            keys, ids = self._cut(keys, ids)
        self.keys.append(keys)
        self.ids.append(ids)
        self.size += len(keys)
        if self.size > max(2 * self.n, 1 << 16):
            keys, ids = self.result()
            self.keys, self.ids, self.size = [keys], [ids], len(keys)

    def _cut(self, keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` smallest by (key, id), in that order."""
        if len(keys) > self.n:
            keep = keys <= np.partition(keys, self.n - 1)[self.n - 1]
            keys, ids = keys[keep], ids[keep]
        order = np.lexsort((ids.astype(str), keys))[: self.n]
        return keys[order], ids[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.keys:
            return np.empty(0, np.uint64), np.empty(0, object)
        return self._cut(np.concatenate(self.keys), np.concatenate(self.ids))

    @staticmethod
    def merge(parts: list[_Smallest]) -> tuple[np.ndarray, np.ndarray]:
        done = [p.result() for p in parts]
        if not done:
            return np.empty(0, np.uint64), np.empty(0, object)
        return np.concatenate([k for k, _ in done]), np.concatenate([i for _, i in done])
