"""Training data: the class folders, a held-out split for the kNN monitor, and per-step
batches that every worker draws for itself without overlap.

Batches are a pure function of ``(seed, step, rank)``: a resumed run draws exactly the
batches the interrupted one would have, and no data has to be shipped between workers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.decode import DecodeError, decode_image
from vitflow.errors import ConfigError
from vitflow.sources import list_images
from vitflow.storage import read_bytes

log = logging.getLogger(__name__)

HOLDOUT_SPLITS = ("val", "validation", "test")


@dataclass(frozen=True)
class ClassFolders:
    """Image paths with integer labels, split into train and held-out parts."""

    classes: list[str]
    train_paths: list[str]
    train_labels: list[int]
    holdout_paths: list[str]
    holdout_labels: list[int]


def list_class_folders(uri: str, holdout_fraction: float, seed: int) -> ClassFolders:
    """List ``uri/<class>/*`` (or ``uri/<split>/<class>/*``) and split off a held-out set.

    A val/validation/test split folder is the held-out set when present; otherwise a
    deterministic ``holdout_fraction`` of each class is.
    """
    listing = list_images(SourceConfig(uri=uri, labels="folder", split="auto")).table
    # Files the listing refused to read (a symlink leaving the folder, a name that is not
    # UTF-8, a pipe) are left out of training, counted, and never opened.
    refused = pc.is_valid(listing.column(columns.LIST_ERROR))
    n_refused = pc.sum(refused).as_py() or 0
    if n_refused:
        first = listing.filter(refused).slice(0, 1)
        log.warning(
            "data.uri %s: %d files are left out of training, e.g. %s (%s)",
            uri,
            n_refused,
            first.column(columns.PATH)[0].as_py(),
            first.column(columns.LIST_ERROR)[0].as_py(),
        )
        listing = listing.filter(pc.invert(refused))
    labels = listing.column(columns.LABEL).to_pylist()
    if any(lbl is None for lbl in labels):
        loose = [
            p
            for p, lbl in zip(listing.column(columns.PATH).to_pylist(), labels, strict=True)
            if lbl is None
        ]
        raise ConfigError(
            f"data.uri {uri!r} needs one subfolder per class, but {len(loose)} images lie "
            f"directly in it (e.g. {loose[0]}); move them into class folders"
        )
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ConfigError(
            f"data.uri {uri!r} has {len(classes)} class folder(s) ({', '.join(classes)}); "
            "contrastive training needs at least 2 — one subfolder per class"
        )
    index = {c: i for i, c in enumerate(classes)}
    paths = listing.column(columns.PATH).to_pylist()
    splits = listing.column(columns.SPLIT).to_pylist()
    train, hold = [], []
    # Split folders match case-insensitively (Val/, TEST/), like the listing's own rule.
    splits = [s.lower() if s else s for s in splits]
    if any(s in HOLDOUT_SPLITS for s in splits):
        for p, lbl, s in zip(paths, labels, splits, strict=True):
            (hold if s in HOLDOUT_SPLITS else train).append((p, index[lbl]))
    else:
        rng = np.random.default_rng(seed)
        for c in classes:
            members = [p for p, lbl in zip(paths, labels, strict=True) if lbl == c]
            order = rng.permutation(len(members))
            n_hold = int(round(len(members) * holdout_fraction))
            for j, k in enumerate(order):
                (hold if j < n_hold else train).append((members[k], index[c]))
    return ClassFolders(
        classes=classes,
        train_paths=[p for p, _ in train],
        train_labels=[y for _, y in train],
        holdout_paths=[p for p, _ in hold],
        holdout_labels=[y for _, y in hold],
    )


class ImageStore:
    """Decoded RGB images by path, with a bounded in-memory cache (small corpora are read once)."""

    def __init__(self, max_cached: int):
        self.max_cached = max_cached
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, path: str) -> Image.Image:
        img = self._cache.get(path)
        if img is not None:
            self._cache.move_to_end(path)
            return img
        try:
            img = decode_image(read_bytes(path))
        except DecodeError as e:
            raise ConfigError(
                f"training image {path!r} cannot be decoded: {e}; remove or fix it"
            ) from e
        if self.max_cached:
            self._cache[path] = img
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return img


def simclr_indices(
    n: int, global_batch: int, step: int, seed: int, rank: int, world: int
) -> list[int]:
    """This rank's share of step ``step``'s global batch: distinct images, disjoint across ranks."""
    if global_batch > n:
        raise ConfigError(
            f"simclr.batch_size {global_batch} is larger than the {n} training images; lower it"
        )
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(n, size=global_batch, replace=False)
    per = global_batch // world
    return chosen[rank * per : (rank + 1) * per].tolist()


def stack_views(images, transform) -> torch.Tensor:
    return torch.stack([transform(img) for img in images])
