"""Training ingest: batches are a pure function of (seed, step, rank) whatever the number of
loader processes, after a resume, and over any number of ranks; reads from object storage
give the same pixels; the decoded-image cache stays within its bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitflow.config import load_config
from vitflow.synthetic import make_image_folder
from vitflow.training.config import TrainConfig
from vitflow.training.data import ImageStore, list_class_folders
from vitflow.training.ingest import step_loader
from vitflow.training.loop import make_ingest

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_image_folder(root, classes=("a", "b", "c", "d"), per_class=8, size=(48, 40), splits=None)
    return root


def job(data, method: str = "simo2", world: int = 1, **over) -> TrainConfig:
    base = {
        "method": method,
        "data": {"uri": str(data), "image_size": 24, "holdout_fraction": 0.0},
        "model": {"name": "test_resnet"},
        "simo2": {"samples_per_class": 3, "classes_per_batch": 4},
        "simclr": {"batch_size": 8},
        "scaling": {"num_workers": world},
        "output": {"uri": "unused"},
        "seed": 5,
    }
    return load_config(
        base=base, overrides=[f"{k}={v}" for k, v in over.items()], schema=TrainConfig
    )


def batches(cfg: TrainConfig, start: int, stop: int, workers: int, rank: int = 0):
    folders = list_class_folders(cfg.data.uri, 0.0, cfg.seed, cfg.storage.options_for(cfg.data.uri))
    ds = make_ingest(cfg, folders, MEAN, STD, rank, cfg.scaling.num_workers)
    return [(b.step, b.x, b.indices) for b in step_loader(ds, start, stop, workers=workers)]


def assert_same(a, b) -> None:
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    assert [i for _, _, i in a] == [i for _, _, i in b]
    for (_, x, _), (_, y, _) in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["simo2", "simclr"])
def test_same_batches_with_any_number_of_loader_processes_and_after_resume(folder, method):
    cfg = job(folder, method)
    in_process = batches(cfg, 0, 5, workers=0)
    assert_same(batches(cfg, 0, 5, workers=2), in_process)
    assert_same(batches(cfg, 3, 5, workers=2), in_process[3:])  # resumed at step 3
    # Steps differ from each other (a constant batch would pass the checks above).
    assert not torch.equal(in_process[0][1], in_process[1][1])
    rows = 12 if method == "simo2" else 16  # SimCLR: two views of 8 images
    assert in_process[0][1].shape == (rows, 3, 24, 24)


@pytest.mark.timeout(120)
def test_another_seed_gives_other_batches(folder):
    a, b = batches(job(folder), 0, 1, 0), batches(job(folder, seed=6), 0, 1, 0)
    assert not torch.equal(a[0][1], b[0][1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["simo2", "simclr"])
def test_two_ranks_split_the_one_rank_batch(folder, method):
    one = batches(job(folder, method), 0, 3, workers=0)
    two = [batches(job(folder, method, world=2), 0, 3, workers=0, rank=r) for r in (0, 1)]
    for step in range(3):
        x1, x_r = one[step][1], [two[r][step][1] for r in (0, 1)]
        if method == "simo2":
            want = torch.cat(x_r)
        else:  # each rank: its first views, then its second views
            h = [x.shape[0] // 2 for x in x_r]
            want = torch.cat([x_r[0][: h[0]], x_r[1][: h[1]], x_r[0][h[0] :], x_r[1][h[1] :]])
        torch.testing.assert_close(want, x1, rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_object_storage_gives_the_same_batches(folder, s3_bucket):
    fs, bucket, endpoint = s3_bucket
    fs.put(str(folder), f"{bucket}/imgs", recursive=True)
    local = batches(job(folder), 0, 2, workers=0)
    remote = batches(
        job(f"s3://{bucket}/imgs", **{"storage.endpoint_url": endpoint}), 0, 2, workers=0
    )
    for (_, x, _), (_, y, _) in zip(local, remote, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_cache_is_bounded_by_count_and_bytes(folder):
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:6]
    store = ImageStore(max_cached=3)
    store.get_many(paths)
    assert list(store._cache) == paths[3:]  # the newest three
    one_image = 48 * 40 * 3
    store = ImageStore(max_cached=100, max_cached_bytes=2 * one_image)
    store.get_many(paths)
    assert len(store._cache) == 2 and store._cached_bytes == 2 * one_image
    assert ImageStore(max_cached=0).get(paths[0]).size == (48, 40)
