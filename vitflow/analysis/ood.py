"""How far out of distribution a collection is, in a backbone's embedding space (issue 13).

Each image of a collection scores the mean cosine distance (``1 - cosine similarity``) to
its ``k`` nearest neighbours in a reference collection: images like the reference score
near 0, images unlike anything in it score high. A collection's summary (mean, median,
spread) says how far it sits from the reference as a whole. This works for any backbone;
:mod:`vitflow.mae` gives the model-specific view (how well an MAE reconstructs it).

The search is exact and streamed (:class:`~vitflow.analysis.knn.KnnAccumulator`): each
block of query rows meets every reference row once, so memory is bounded by a block and the
cost is ``queries x reference``. Scoring a collection against itself never lets a row be its
own neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from vitflow import columns
from vitflow.analysis.knn import KnnAccumulator
from vitflow.analysis.source import EmbeddingSource

QUERY_ROWS = 4096  # query rows per pass over the reference


def knn_distance(
    reference: EmbeddingSource,
    query: EmbeddingSource,
    feature: str,
    k: int = 10,
    *,
    same: bool = False,
    query_rows: int = QUERY_ROWS,
) -> pa.Table:
    """Each ok query row's mean cosine distance to its ``k`` nearest ok reference rows.

    Args:
        reference: the in-distribution collection.
        query: the collection scored.
        feature: the vector column both share.
        k: neighbours per row (fewer when the reference has fewer rows).
        same: ``query`` is ``reference`` (a row is never its own neighbour).
        query_rows: query rows per pass over the reference.

    Returns:
        ``id``, ``split``, ``ood_knn`` (float32) per ok query row, in storage order; NaN for
        a row whose vector is not finite (a Delta file older than the feature).

    Raises:
        ValueError: the widths differ, or the reference has no finite ok vector.
    """
    if reference.dims.get(feature) != query.dims.get(feature):
        raise ValueError(
            f"feature {feature!r} is {reference.dims.get(feature)}-d in the reference and "
            f"{query.dims.get(feature)}-d in the query: score with the same model and feature"
        )
    from vitflow.loading import vectors_of

    out = []
    start = 0
    names = [columns.ID, columns.SPLIT, feature]
    for _, block in query.batches(names, ok=True, batch_rows=query_rows):
        n = block.num_rows
        positions = np.arange(start, start + n)
        # Against itself, a row's position is its group: it never meets itself.
        queries = vectors_of(block.column(feature))
        good = np.isfinite(queries).all(axis=1)
        acc = KnnAccumulator(
            np.where(good[:, None], queries, 0), k=k, groups=positions if same else None
        )
        ref_start = 0
        for _, ref in reference.batches([feature], ok=True):
            vectors = vectors_of(ref.column(feature))
            ref_positions = np.arange(ref_start, ref_start + ref.num_rows)
            keep = np.isfinite(vectors).all(axis=1)  # a NaN would sort as the nearest
            acc.update(
                vectors[keep],
                ref_positions[keep],
                groups=ref_positions[keep] if same else None,
            )
            ref_start += ref.num_rows
        sims = np.where(np.isfinite(acc.sims), acc.sims, np.nan)
        found = np.isfinite(acc.sims).sum(axis=1)
        if n and (found == 0).all():
            raise ValueError("the reference has no ok rows with finite vectors to compare with")
        with np.errstate(invalid="ignore"):
            distance = 1.0 - np.nanmean(np.where(found[:, None] > 0, sims, 0.0), axis=1)
        distance[~good | (found == 0)] = np.nan
        out.append(
            pa.table(
                {
                    columns.ID: block.column(columns.ID),
                    columns.SPLIT: block.column(columns.SPLIT),
                    "ood_knn": pa.array(distance.astype(np.float32)),
                }
            )
        )
        start += n
    if not out:
        return pa.table(
            {
                columns.ID: pa.array([], pa.string()),
                columns.SPLIT: pa.array([], pa.string()),
                "ood_knn": pa.array([], pa.float32()),
            }
        )
    return pa.concat_tables(out)


def summarize(scores: Mapping[str, np.ndarray], column: str = "ood_knn") -> pa.Table:
    """One row per collection: ``dataset``, ``score`` (``column``, the score's name), ``n``
    (finite scores), ``mean``, ``median``, ``std``, ``p10``, ``p90`` of its per-image
    scores."""
    rows = []
    for name, values in scores.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        stats = (
            [np.mean(v), np.median(v), np.std(v), *np.percentile(v, [10, 90])]
            if len(v)
            else [np.nan] * 5
        )
        rows.append({"dataset": name, "score": column, "n": len(v), **_named(stats)})
    return pa.Table.from_pylist(rows)


def _named(stats: list[float]) -> dict[str, float]:
    return dict(zip(("mean", "median", "std", "p10", "p90"), map(float, stats), strict=True))
