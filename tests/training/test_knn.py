"""Weighted kNN against a slow reference written from Wu et al. 2018 / DINO's eval_knn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitflow.training.knn import knn_accuracy, knn_predict


def knn_reference(train_x, train_y, test_x, k, temperature):
    """One query at a time: cosine to every training row, top k, exp-weighted vote."""
    train_y = list(train_y)
    classes = sorted(set(train_y))
    preds = []
    for q in test_x:
        sims = []
        for i, x in enumerate(train_x):
            cos = float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x)))
            sims.append((cos, i))
        sims.sort(key=lambda s: -s[0])
        votes = dict.fromkeys(classes, 0.0)
        for cos, i in sims[:k]:
            votes[train_y[i]] += math.exp(cos / temperature)
        best = max(votes.values())
        preds.append(next(c for c in classes if votes[c] == best))  # first class on ties
    return np.array(preds)


def _random(n_train=120, n_test=40, dim=8, n_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n_train, dim)),
        rng.integers(0, n_classes, n_train),
        rng.normal(size=(n_test, dim)),
        rng.integers(0, n_classes, n_test),
    )


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 1.0)])
def test_matches_reference(k, temperature):
    train_x, train_y, test_x, _ = _random()
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    np.testing.assert_array_equal(got, knn_reference(train_x, train_y, test_x, k, temperature))


def test_string_labels_and_torch_inputs():
    train_x, train_y, test_x, test_y = _random(seed=1)
    names = np.array(["cat", "dog", "eel", "fox", "gnu"])
    got = knn_predict(torch.from_numpy(train_x), list(names[train_y]), torch.from_numpy(test_x))
    np.testing.assert_array_equal(got, knn_reference(train_x, names[train_y], test_x, 20, 0.07))
    assert knn_accuracy(train_x, names[train_y], test_x, names[test_y]) == pytest.approx(
        np.mean(got == names[test_y])
    )


def test_k1_is_nearest_neighbour():
    train_x, train_y, test_x, _ = _random(seed=2)
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    nearest = train_y[np.argmax(b @ a.T, axis=1)]
    np.testing.assert_array_equal(knn_predict(train_x, train_y, test_x, k=1), nearest)


def test_separated_clusters_are_perfect():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 32)) * 10
    y_tr, y_te = np.repeat(np.arange(6), 30), np.repeat(np.arange(6), 10)
    x_tr = centers[y_tr] + rng.normal(size=(len(y_tr), 32))
    x_te = centers[y_te] + rng.normal(size=(len(y_te), 32))
    assert knn_accuracy(x_tr, y_tr, x_te, y_te) == 1.0


def test_random_labels_are_near_chance():
    train_x, train_y, test_x, test_y = _random(n_train=1000, n_test=800, dim=16, n_classes=4)
    assert 0.18 < knn_accuracy(train_x, train_y, test_x, test_y) < 0.32


def test_chunking_does_not_change_predictions():
    train_x, train_y, test_x, _ = _random(seed=4)
    whole = knn_predict(train_x, train_y, test_x)
    np.testing.assert_array_equal(knn_predict(train_x, train_y, test_x, chunk_size=7), whole)


def test_k_larger_than_train_is_clipped():
    train_x, train_y, test_x, _ = _random(n_train=15, seed=5)
    np.testing.assert_array_equal(
        knn_predict(train_x, train_y, test_x, k=100), knn_predict(train_x, train_y, test_x, k=15)
    )


def test_small_temperature_stays_finite():
    # exp(1 / 0.001) overflows float32; the per-row shift must keep the vote exact.
    train_x, train_y, test_x, _ = _random(seed=6)
    got = knn_predict(train_x, train_y, test_x, k=10, temperature=0.001)
    ref = knn_predict(train_x, train_y, test_x, k=1)  # such a sharp vote is the top-1 label
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(test_x=np.zeros((3, 5))), "Expected test_x with 8 columns"),
        (dict(train_y=np.zeros(3)), r"Expected train_y to have shape \(120,\)"),
        (dict(train_x=np.zeros(8)), "Expected train_x to be a non-empty"),
        (dict(k=0), "Expected k to be an int >= 1"),
        (dict(temperature=0.0), "Expected temperature > 0"),
    ],
)
def test_validation(kwargs, match):
    train_x, train_y, test_x, test_y = _random()
    args = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y) | kwargs
    with pytest.raises(ValueError, match=match):
        knn_accuracy(**args)
