"""Closed-form checks of the poolers against numpy written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitflow.config import EmbedConfig, FeatureConfig
from vitflow.pooling import (
    POOL_NAMES,
    POOLS,
    aggregate_layers,
    find_pool,
    normalize_vectors,
    pool_map,
    pool_names,
    pool_tokens,
)

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


# --- the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POOLS))
def test_each_pool_gives_the_width_its_rule_says(name):
    pool = POOLS[name]
    if pool.kind == "token":
        out = pool_tokens(torch.randn(2, 7, 5), torch.randn(2, 3, 5), name)
        assert out.shape == (2, pool.width(5))
    else:
        out = pool_map(torch.rand(2, 4, 3, 3), name)
        assert out.shape == (2, pool.width(4))


def test_cls_mean_is_twice_as_wide_and_the_rest_keep_the_width():
    assert {n: p.width(384) for n, p in POOLS.items()} == {
        "cls": 384,
        "mean": 384,
        "cls_mean": 768,
        "avg": 384,
        "max": 384,
        "gem": 384,
    }


def test_kinds_and_cls_needs():
    assert pool_names("token") == ("cls", "mean", "cls_mean")
    assert pool_names("token", has_cls=False) == ("mean",)
    assert pool_names("map") == ("avg", "max", "gem")
    assert [n for n, p in POOLS.items() if p.needs_cls] == ["cls", "cls_mean"]


def test_mean_on_a_map_is_avg():
    x = torch.from_numpy(rng.normal(size=(2, 4, 3, 5)).astype(np.float32))
    assert find_pool("mean", "map") is POOLS["avg"]
    assert torch.equal(pool_map(x, "mean"), pool_map(x, "avg"))
    assert find_pool("mean", "token") is POOLS["mean"]


def test_a_pool_of_the_other_kind_is_not_found():
    assert find_pool("gem", "token") is None and find_pool("cls", "map") is None
    with pytest.raises(ValueError, match="map pool .*avg, max or gem.* got 'cls'"):
        pool_map(torch.ones(1, 2, 2, 2), "cls")
    with pytest.raises(ValueError, match="token pool .*cls, mean or cls_mean.* got 'gem'"):
        pool_tokens(torch.ones(1, 4, 3), torch.ones(1, 1, 3), "gem")


def test_the_job_config_allows_exactly_the_registry_names():
    schema = EmbedConfig.model_json_schema()["$defs"]["FeatureConfig"]["properties"]["pool"]
    assert schema["enum"] == list(POOL_NAMES) == ["cls", "mean", "cls_mean", "avg", "max", "gem"]
    for name in POOL_NAMES:
        assert FeatureConfig(pool=name).pool == name
        assert name in schema["description"]
    with pytest.raises(ValueError):
        FeatureConfig(pool="head")  # the projection head is a source, not a pool


def test_the_registry_loads_without_torch():
    import subprocess
    import sys

    code = "import sys, vitflow.config, vitflow.pooling; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
