"""Closed-form checks of the poolers against numpy written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitflow.pooling import aggregate_layers, normalize_vectors, pool_map, pool_tokens

rng = np.random.default_rng(0)


def test_token_pools_match_numpy():
    patch = rng.normal(size=(3, 7, 5)).astype(np.float32)
    prefix = rng.normal(size=(3, 5, 5)).astype(np.float32)  # CLS + 4 registers
    p, q = torch.from_numpy(patch), torch.from_numpy(prefix)
    np.testing.assert_allclose(pool_tokens(p, q, "mean"), patch.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(pool_tokens(p, q, "cls"), prefix[:, 0], rtol=1e-6)
    np.testing.assert_allclose(
        pool_tokens(p, q, "cls_mean"),
        np.concatenate([prefix[:, 0], patch.mean(axis=1)], axis=1),
        rtol=1e-6,
    )


def test_mean_never_sees_prefix_tokens():
    patch = torch.ones(1, 4, 3)
    prefix = torch.full((1, 5, 3), 1000.0)
    assert torch.equal(pool_tokens(patch, prefix, "mean"), torch.ones(1, 3))


def test_cls_without_prefix_tokens_refused():
    with pytest.raises(ValueError, match="CLS"):
        pool_tokens(torch.ones(1, 4, 3), None, "cls")


def test_map_pools_match_numpy():
    x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(pool_map(t, "avg"), x.mean(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_allclose(pool_map(t, "max"), x.max(axis=(2, 3)), rtol=1e-6)
    gem = (np.clip(x, 1e-6, None) ** 3).mean(axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(pool_map(t, "gem"), gem, rtol=1e-5)


def test_gem_is_between_avg_and_max_on_positive_maps():
    x = torch.rand(2, 3, 4, 4) + 0.1
    g, a, m = pool_map(x, "gem"), pool_map(x, "avg"), pool_map(x, "max")
    assert torch.all(g >= a - 1e-6) and torch.all(g <= m + 1e-6)


def test_aggregate_concat_keeps_layer_order_and_mean_averages():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]])
    assert aggregate_layers([a, b], "concat").tolist() == [[1.0, 2.0, 3.0, 5.0]]
    assert aggregate_layers([a, b], "mean").tolist() == [[2.0, 3.5]]
    with pytest.raises(ValueError, match="one width"):
        aggregate_layers([a, torch.ones(1, 3)], "mean")


def test_l2_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = normalize_vectors(x, "l2")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert torch.equal(normalize_vectors(x, "none"), x)
