"""The linear probe: logistic regression on standardised features, with its regularisation
chosen on a held-out share of the train rows.

The protocol, exactly:

1. Hold out a stratified share of train (:func:`holdout_mask`: in each class with at least
   2 rows, ``round(0.2 * n)`` rows, at least 1 and at most ``n - 1``: those with the
   smallest seeded id keys, so the choice does not depend on row order or sharding).
2. For each ``C`` in :data:`C_GRID`: standardise on the other rows (scikit-learn's
   ``StandardScaler``), fit ``LogisticRegression(C=C, max_iter=1000)`` (lbfgs, multinomial),
   score top-1 on the held-out rows. The best ``C`` wins; ties go to the smaller ``C``
   (stronger regularisation).
3. Standardise on all train rows and refit with that ``C``; that model predicts the test rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
HOLDOUT = 0.2
DEFAULT_C = 1.0  # when no row can be held out to choose C
MAX_ITER = 1000


def holdout_mask(labels: np.ndarray, keys: np.ndarray, fraction: float = HOLDOUT) -> np.ndarray:
    """Boolean mask of the held-out rows: per class (``labels``), the ``round(fraction * n)``
    rows with the smallest ``keys`` (at least 1, never the class's last row; a class with a
    single row is never held out)."""
    labels, keys = np.asarray(labels), np.asarray(keys)
    out = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        h = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        out[rows[np.argsort(keys[rows], kind="stable")[:h]]] = True
    return out


@dataclass
class LinearProbe:
    """A fitted probe: ``predict`` takes raw vectors and gives class indices."""

    C: float | None
    scores: dict[float, float] = field(default_factory=dict)  # C -> held-out top-1
    converged: bool = True
    scaler: object = None
    model: object = None
    constant: int | None = None  # a train set with one class predicts it everywhere

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.constant is not None:
            return np.full(len(x), self.constant, np.int64)
        return self.model.predict(self.scaler.transform(x)).astype(np.int64)


def _fit(x: np.ndarray, y: np.ndarray, C: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=C, max_iter=MAX_ITER).fit(scaler.transform(x), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return scaler, model, converged


def fit_probe(
    x: np.ndarray, y: np.ndarray, holdout: np.ndarray, *, c_grid: tuple[float, ...] = C_GRID
) -> LinearProbe:
    """Choose ``C`` on the ``holdout`` rows, then refit on all rows (see the module doc).

    Args:
        x: train vectors ``(n, D)``.
        y: their class indices ``(n,)``.
        holdout: boolean mask of the rows that score each ``C`` (:func:`holdout_mask`).
        c_grid: the ``C`` values tried, in increasing order.

    Returns:
        The fitted :class:`LinearProbe`; ``C`` is None when there was nothing to choose
        (one class only) and :data:`DEFAULT_C` (scikit-learn's default) when there were
        no held-out rows to choose with.
    """
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return LinearProbe(C=None, constant=int(y[0]) if len(y) else 0)
    fit_rows = ~holdout
    scores: dict[float, float] = {}
    converged = True
    if holdout.any() and len(np.unique(y[fit_rows])) > 1:
        for C in c_grid:
            scaler, model, ok = _fit(x[fit_rows], y[fit_rows], C)
            converged &= ok
            pred = model.predict(scaler.transform(x[holdout]))
            scores[C] = float(np.mean(pred == y[holdout]))
    best = max(scores, key=lambda C: (scores[C], -C)) if scores else DEFAULT_C
    scaler, model, ok = _fit(x, y, best)
    return LinearProbe(best, scores, converged and ok, scaler, model)
