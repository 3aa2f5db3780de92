"""Weighted k-nearest-neighbour classification of embeddings: the standard SSL probe.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(arXiv:1805.01978), as used by DINO's ``eval_knn.py``: L2-normalise, take the ``k`` most
cosine-similar training rows, weight each neighbour's vote by ``exp(sim / T)``, predict the
class with the largest summed weight. No training, so it tracks representation quality
during pretraining at the cost of one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Similarity rows are computed a chunk of test rows at a time; this bounds one chunk's
# (rows x n_train) float32 matrix to 256 MiB whatever the size of the test set.
MAX_CHUNK_ELEMENTS = 2**26

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


def _as_features(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(
            f"Expected {name} to be a non-empty (N, D) array, but got {tuple(t.shape)}"
        )
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _as_labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.shape != (n,):
        raise ValueError(f"Expected {name} to have shape ({n},), but got {a.shape}")
    return a


def knn_predict(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Predict a label for each test row by a similarity-weighted vote of its k neighbours.

    Runs on ``train_x``'s device (a CUDA tensor keeps the work on the GPU). Ties between
    classes go to the class that sorts first.

    Args:
        train_x: training embeddings ``(N, D)``, torch or numpy.
        train_y: training labels ``(N,)``: ints or strings.
        test_x: embeddings to classify ``(M, D)``.
        k: neighbours per query. Default 20 (DINO). Clipped to ``N`` without error, so
            small debug sets still give an answer (then every training row votes).
        temperature: vote weight ``exp(sim / temperature)``. Default 0.07.
        chunk_size: test rows per similarity matrix; default keeps one chunk under
            ``MAX_CHUNK_ELEMENTS`` floats.

    Returns:
        ``(M,)`` numpy array of predicted labels, values taken from ``train_y``.
    """
    train = _as_features(train_x, "train_x")
    test = _as_features(test_x, "test_x", device=train.device)
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"Expected test_x with {train.shape[1]} columns like train_x, but got {test.shape[1]}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Expected k to be an int >= 1, but got {k!r}")
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0, but got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"Expected chunk_size >= 1, but got {chunk_size}")
    classes, train_idx = np.unique(
        _as_labels(train_y, train.shape[0], "train_y"), return_inverse=True
    )
    labels = torch.as_tensor(train_idx.reshape(-1), device=train.device)  # (N,)
    k = min(k, train.shape[0])
    rows = chunk_size or max(1, MAX_CHUNK_ELEMENTS // train.shape[0])

    train = F.normalize(train, dim=1)
    preds = []
    for q in F.normalize(test, dim=1).split(rows):
        sim = q @ train.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k), most similar first
        # Subtracting each row's best similarity scales its weights by one constant, which
        # leaves the argmax unchanged but keeps exp() finite for small temperatures.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (m, k)
        votes = torch.zeros(q.shape[0], len(classes), device=q.device)  # (m, C)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return classes[torch.cat(preds).cpu().numpy()]


def knn_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier (:func:`knn_predict`) on a test set.

    Args:
        train_x: training embeddings ``(N, D)``, torch or numpy.
        train_y: training labels ``(N,)``.
        test_x: test embeddings ``(M, D)``.
        test_y: test labels ``(M,)``; a label absent from ``train_y`` always counts wrong.
        k: neighbours per query. Default 20; clipped to ``N``.
        temperature: vote weight ``exp(sim / temperature)``. Default 0.07.
        chunk_size: test rows per similarity matrix; default bounds memory.

    Returns:
        Fraction of test rows classified correctly, in ``[0, 1]``.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn_accuracy(x, [0, 0, 1, 1], x, [0, 0, 1, 1], k=2)
        1.0
    """
    pred = knn_predict(
        train_x, train_y, test_x, k=k, temperature=temperature, chunk_size=chunk_size
    )
    truth = _as_labels(test_y, len(pred), "test_y")
    return float(np.mean(pred == truth))
