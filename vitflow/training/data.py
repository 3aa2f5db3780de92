"""Training data: the class folders, a held-out split for the kNN monitor, and per-step
batches that every worker draws for itself without overlap.

Batches are a pure function of ``(seed, step, rank)``: a resumed run draws exactly the
batches the interrupted one would have, and no data has to be shipped between workers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.decode import DecodeError, decode_image
from vitflow.errors import ConfigError
from vitflow.sources import list_images
from vitflow.storage import READ_MANY_IN_FLIGHT, read_many

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


def list_class_folders(
    uri: str, holdout_fraction: float, seed: int, storage_options: dict[str, Any] | None = None
) -> ClassFolders:
    """List ``uri/<class>/*`` (or ``uri/<split>/<class>/*``) and split off a held-out set.

    A val/validation/test split folder is the held-out set when present; otherwise a
    deterministic ``holdout_fraction`` of each class is.
    """
    listing = list_images(
        SourceConfig(uri=uri, labels="folder", split="auto"), storage_options
    ).table
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


class UnreadableImage(Exception):
    """A training image that cannot be read or decoded; ``str(e)`` names the path and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class ImageStore:
    """Decoded RGB images by path, read through object-storage-friendly batches.

    A bounded LRU cache keeps up to ``max_cached`` images and ``max_cached_bytes`` bytes of
    pixels, so a small corpus is read once while a corpus larger than memory streams. Files
    that failed are remembered and never read again in this process.

    Args:
        max_cached: most images kept (0 = no cache).
        max_cached_bytes: most bytes of decoded pixels kept (default 1 GiB).
        storage_options: fsspec options for object-storage paths.
        read_in_flight: most reads open at once (hides object-store latency).
    """

    def __init__(
        self,
        max_cached: int,
        max_cached_bytes: int = 2**30,
        storage_options: dict[str, Any] | None = None,
        read_in_flight: int = READ_MANY_IN_FLIGHT,
    ):
        self.max_cached, self.max_cached_bytes = max_cached, max_cached_bytes
        self.storage_options = storage_options
        self.read_in_flight = read_in_flight
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._cached_bytes = 0
        self.bad: dict[str, str] = {}  # path -> reason, for every failure seen here

    def get(self, path: str) -> Image.Image:
        """One image; raises :class:`UnreadableImage` for a file that cannot be used."""
        (got,) = self.get_many([path])
        if isinstance(got, UnreadableImage):
            raise got
        return got

    def get_many(self, paths: list[str]) -> list[Image.Image | UnreadableImage]:
        """Images in order, each an image or its :class:`UnreadableImage`; the files not in
        the cache are read with up to ``read_in_flight`` requests open at once."""
        out: list[Image.Image | UnreadableImage | None] = [None] * len(paths)
        misses: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            if p in self.bad:
                out[i] = UnreadableImage(p, self.bad[p])
            elif p in self._cache:
                self._cache.move_to_end(p)
                out[i] = self._cache[p]
            else:
                misses.setdefault(p, []).append(i)
        todo = list(misses)
        raw = (
            read_many(todo, self.storage_options, max_in_flight=self.read_in_flight) if todo else []
        )
        for p, data in zip(todo, raw, strict=True):
            try:
                if isinstance(data, Exception):
                    raise data
                img: Image.Image | UnreadableImage = decode_image(data)
            except (DecodeError, OSError) as e:
                self.bad[p] = f"{type(e).__name__}: {e}"
                img = UnreadableImage(p, self.bad[p])
            else:
                self._put(p, img)
            for i in misses[p]:
                out[i] = img
        return out  # type: ignore[return-value]

    def _put(self, path: str, img: Image.Image) -> None:
        size = img.width * img.height * 3
        if not self.max_cached or size > self.max_cached_bytes:
            return
        self._cache[path] = img
        self._cached_bytes += size
        while len(self._cache) > self.max_cached or self._cached_bytes > self.max_cached_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.width * old.height * 3


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
