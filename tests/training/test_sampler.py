"""ClassBalancedBatchSampler: batch shape and layout, rank sharding, determinism, resume."""

from __future__ import annotations

import logging

import pytest

from vitflow.training.sampler import ClassBalancedBatchSampler

# 6 classes (labels 10..15, 7 or 8 samples each), interleaved so a class is not contiguous.
LABELS = [10 + (i % 6) for i in range(45)]


def _label_runs(labels, batch, k):
    """Labels of each contiguous block of k indices; each block must be one class."""
    blocks = [batch[i : i + k] for i in range(0, len(batch), k)]
    runs = []
    for block in blocks:
        assert len({labels[i] for i in block}) == 1, f"block {block} mixes classes"
        runs.append(labels[block[0]])
    return runs


@pytest.mark.parametrize(("cpb", "k"), [(4, 3), (None, 2), (2, 5)])
def test_global_batch_shape_and_class_major_layout(cpb, k):
    sampler = ClassBalancedBatchSampler(LABELS, cpb, k, seed=3)
    n_classes = cpb or 6
    for step in range(20):
        batch = sampler.batch(step)
        assert len(batch) == n_classes * k
        classes = _label_runs(LABELS, batch, k)
        assert len(set(classes)) == n_classes  # distinct classes, K each
        assert len(set(batch)) == len(batch)  # every class has >= k samples: no repeats


def test_ranks_split_by_whole_classes_and_are_disjoint():
    k = 3
    ranks = [ClassBalancedBatchSampler(LABELS, 4, k, rank=r, world_size=2, seed=1) for r in (0, 1)]
    whole = ClassBalancedBatchSampler(LABELS, 4, k, seed=1)
    for step in range(20):
        b0, b1 = ranks[0].batch(step), ranks[1].batch(step)
        assert len(b0) == len(b1) == 2 * k
        assert not set(b0) & set(b1)
        assert b0 + b1 == whole.batch(step) == ranks[0].global_batch(step)
        c0, c1 = _label_runs(LABELS, b0, k), _label_runs(LABELS, b1, k)
        assert len(set(c0)) == 2 and not set(c0) & set(c1)


def test_deterministic_per_seed_and_step():
    a = ClassBalancedBatchSampler(LABELS, 3, 2, seed=7)
    b = ClassBalancedBatchSampler(LABELS, 3, 2, seed=7)
    c = ClassBalancedBatchSampler(LABELS, 3, 2, seed=8)
    assert [a.batch(s) for s in range(10)] == [b.batch(s) for s in range(10)]
    assert [a.batch(s) for s in range(10)] != [c.batch(s) for s in range(10)]
    assert a.batch(0) != a.batch(1)


def test_resume_reproduces_batches():
    first = ClassBalancedBatchSampler(LABELS, 4, 2, seed=5)
    it = iter(first)
    seen = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state == {"seed": 5, "step": 7}
    upcoming = [next(it) for _ in range(3)]

    resumed = ClassBalancedBatchSampler(LABELS, 4, 2, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(3)] == upcoming
    assert resumed.batch(3) == seen[3]
    with pytest.raises(ValueError, match="seed and step"):
        resumed.load_state_dict({"step": 1})


def test_small_class_auto_replacement_warns(caplog):
    labels = [0] * 10 + [1] * 10 + [2] * 2  # class 2 has 2 < 4 samples
    with caplog.at_level(logging.WARNING, logger="vitflow.training.sampler"):
        sampler = ClassBalancedBatchSampler(labels, None, 4)
    assert "Classes [2]" in caplog.text and "replacement" in caplog.text
    batch = sampler.batch(0)
    assert _label_runs(labels, batch, 4).count(2) == 1
    small = [i for i in batch if labels[i] == 2]
    assert len(small) == 4 and set(small) <= {20, 21}  # drawn with replacement


def test_small_class_never_raises_naming_class():
    labels = [0] * 10 + [1] * 10 + [7] * 2
    with pytest.raises(ValueError, match=r"classes \[7\].*replacement='auto'"):
        ClassBalancedBatchSampler(labels, None, 4, replacement="never")


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        ([0] * 8, {}, "at least 2 classes"),
        (LABELS, {"classes_per_batch": 7}, "lower classes_per_batch"),
        (LABELS, {"samples_per_class": 1}, "set samples_per_class to 2"),
        (LABELS, {"classes_per_batch": 5, "world_size": 2}, "multiple of 2 for classes_per_batch"),
        (LABELS, {"classes_per_batch": 2, "world_size": 2}, "at least 4"),
        (LABELS, {"rank": 2, "world_size": 2}, "rank < world_size"),
        (LABELS, {"replacement": "sometimes"}, "replacement in"),
        ([0.5, 1.5], {}, "map class names to integers"),
    ],
)
def test_invalid_configuration(labels, kwargs, match):
    args = {"classes_per_batch": 4, "samples_per_class": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassBalancedBatchSampler(labels, **args)
