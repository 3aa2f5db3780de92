"""Weighted k-nearest-neighbour classification in bounded memory: the DINO protocol.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(arXiv:1805.01978), as DINO's ``eval_knn.py`` runs it: L2-normalise, take the ``k`` most
cosine-similar train rows, weight each neighbour's vote by ``exp(sim / T)``, rank the
classes by summed weight (top-1, top-5).

Here the train rows arrive in chunks (:class:`KnnAccumulator`), so neither the train matrix
nor the test x train similarity matrix is ever held: each chunk meets the test rows in
tiles of at most :data:`TILE_ELEMENTS` similarities, and a running top-k per test row keeps
the best neighbours seen so far. The result equals the full-matrix computation up to the
order of neighbours with exactly equal similarity.
"""

from __future__ import annotations

import numpy as np

# Similarities per tile (test rows x chunk rows, float32): 16 MiB, whatever the sizes.
TILE_ELEMENTS = 2**22


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class KnnAccumulator:
    """The running ``k`` nearest train rows of a block of test rows.

    Args:
        test: test vectors ``(m, D)``; normalised here.
        k: neighbours per test row. Default 20 (DINO). With fewer train rows, every train
            row is a neighbour.
        groups: optional ``(m,)`` ints; a train row never neighbours a test row of the same
            group (cross-validation folds: the fold a row is tested in).

    Example:
        >>> acc = KnnAccumulator(np.eye(2), k=1)
        >>> acc.update(np.array([[1.0, 0.1], [0.0, 1.0]]), np.array([3, 4]))
        >>> acc.labels.tolist()
        [[3], [4]]
    """

    def __init__(self, test: np.ndarray, k: int = 20, groups: np.ndarray | None = None):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"Expected k to be an int >= 1, but got {k!r}")
        self.test = l2_normalize(test)  # (m, D)
        self.k = int(k)
        self.groups = None if groups is None else np.asarray(groups)
        m = len(self.test)
        self.sims = np.full((m, self.k), -np.inf, np.float32)  # (m, k), unordered
        self.labels = np.full((m, self.k), -1, np.int64)  # (m, k); -1: no neighbour yet

    def update(
        self, train: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
    ) -> None:
        """Meet one chunk of train rows ``(c, D)`` with their integer labels ``(c,)``."""
        c = len(train)
        if c == 0 or len(self.test) == 0:
            return
        train = l2_normalize(train)
        labels = np.asarray(labels, np.int64)
        rows = max(1, TILE_ELEMENTS // (c + self.k))
        for s in range(0, len(self.test), rows):
            sim = self.test[s : s + rows] @ train.T  # (q, c) cosine similarities
            if self.groups is not None and groups is not None:
                sim[self.groups[s : s + rows, None] == np.asarray(groups)[None, :]] = -np.inf
            both = np.concatenate([self.sims[s : s + rows], sim], axis=1)  # (q, k + c)
            del sim
            top = np.argpartition(both, c - 1, axis=1)[:, c:]  # (q, k): the k largest
            kept = np.take_along_axis(self.labels[s : s + rows], np.minimum(top, self.k - 1), 1)
            self.sims[s : s + rows] = np.take_along_axis(both, top, axis=1)
            # columns < k are the running best, the others this chunk's rows
            self.labels[s : s + rows] = np.where(
                top < self.k, kept, labels[np.maximum(top - self.k, 0)]
            )

    def votes(self, n_classes: int, temperature: float = 0.07) -> np.ndarray:
        """``(m, n_classes)`` summed vote weights ``exp(sim / temperature)`` (float64)."""
        return knn_votes(self.sims, self.labels, n_classes, temperature)


def knn_votes(
    sims: np.ndarray, labels: np.ndarray, n_classes: int, temperature: float = 0.07
) -> np.ndarray:
    """Class scores from neighbours: ``sims``/``labels`` ``(m, k)`` (label -1 or similarity
    -inf: no neighbour) -> ``(m, n_classes)`` sums of ``exp(sim / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0, but got {temperature}")
    m = len(sims)
    weights = np.exp(sims.astype(np.float64) / temperature)  # exp(-inf) = 0
    valid = (labels >= 0) & np.isfinite(sims)
    out = np.zeros((m, n_classes), np.float64)
    rows = np.broadcast_to(np.arange(m)[:, None], labels.shape)
    np.add.at(out, (rows[valid], labels[valid]), weights[valid])
    return out


def topk_correct(scores: np.ndarray, truth: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Per row, whether its true class is among the ``k`` best-scored, for each ``k``.

    Classes are ranked by score, ties to the class with the smaller index (a stable sort).
    A class without a single vote is never a hit: with fewer than ``k`` voted classes, the
    unvoted ones would otherwise fill the top-k in arbitrary order."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (m, C), best first
    truth = np.asarray(truth)
    known = (truth >= 0) & (truth < scores.shape[1])
    safe = np.where(known, truth, 0)
    rank = np.argmax(order == safe[:, None], axis=1)  # position of the true class
    voted = known & (scores[np.arange(len(safe)), safe] > 0)
    return {k: voted & (rank < k) for k in ks}
