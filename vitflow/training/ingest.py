"""Training ingest: every step's batch read, decoded and augmented beside the training
process, in DataLoader worker processes, as a pure function of ``(seed, step, rank)``.

Why DataLoader workers rather than a Ray Data stream into the Ray Train workers: a batch
here is defined by ``(seed, step)`` (which classes, which images, which augmentation), not
by the order in which a stream delivers rows. A map-style dataset whose item is a step
computes exactly that batch wherever and whenever it runs, so a resumed run, a run with
another number of loader processes and a run with another number of ranks all see the same
pixels, with no state to checkpoint. The decode work stays on the node of the accelerator
it feeds (no bytes of decoded pixels cross the network), and each Ray Train worker's CPU
reservation (``scaling.cpus_per_worker``) is what its loader processes use.

Parallelism: ``data.loader_workers`` processes each build whole batches (steps ``s``,
``s + 1``, ... in turn, in order), up to two batches ahead per process. Within a batch, the
files not in the bounded cache are read with ``storage.read_in_flight`` requests open at
once, so object-store latency overlaps; a corpus larger than memory streams through the
cache.

Bad images: a file that cannot be read or decoded is replaced, in its slot, by another
image of its class (SIMO2) or of the training set (SimCLR), drawn from
``(seed, step, position, attempt)``, so the batch keeps its shape and stays a pure function
of the step. Each replacement is counted; :class:`BadImageTally` adds the counts of all
ranks and stops the run past ``data.max_error_fraction``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitflow.errors import VitflowError
from vitflow.training.data import ImageStore, UnreadableImage

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 16  # draws per slot before a class is declared unusable
_AUGMENT_STREAM = 2  # the augmentation seeds derive from (seed, _AUGMENT_STREAM, step, position)
_REPLACE_STREAM = 3  # replacement draws: (seed, _REPLACE_STREAM, step, position, attempt)


def augmentation_seed(seed: int, step: int, position: int) -> int:
    """Seed of the augmentation of the image at ``position`` of step ``step``'s global batch."""
    return int(np.random.SeedSequence([seed, _AUGMENT_STREAM, step, position]).generate_state(1)[0])


@dataclass
class StepBatch:
    """One rank's batch of one step.

    ``x`` is ``(B, 3, S, S)`` for SIMO2 and ``(2B, 3, S, S)`` for SimCLR (all first views,
    then all second views); ``indices`` are the dataset indices the plan drew (before any
    replacement); ``skipped`` counts the draws replaced because their file was unusable,
    ``bad`` maps each such file to its reason.
    """

    step: int
    x: torch.Tensor
    indices: list[int]
    skipped: int = 0
    bad: dict[str, str] = field(default_factory=dict)

    def pin_memory(self) -> StepBatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``, CUDA runs)."""
        self.x = self.x.pin_memory()
        return self


class StepBatches(Dataset):
    """Map-style dataset whose item ``step`` is this rank's :class:`StepBatch` of that step.

    Args:
        paths: training image paths (dataset indices index them).
        labels: class of every path.
        plan: ``step -> this rank's dataset indices`` (the sampler's ``batch``).
        offset: global batch position of this rank's first row (rank × rows per rank).
        transform: PIL image -> tensor (SIMO2) or two tensors (SimCLR).
        seed: the job's seed.
        same_class: replace an unusable image by one of its own class (SIMO2) rather than
            by any training image (SimCLR).
        store: where images are read and cached.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        plan: Callable[[int], list[int]],
        offset: int,
        transform: Callable,
        seed: int,
        same_class: bool,
        store: ImageStore,
    ):
        self.paths, self.plan, self.offset = list(paths), plan, offset
        self.transform, self.seed, self.same_class = transform, seed, same_class
        self.store = store
        labels_arr = np.asarray(labels)
        self.labels = labels_arr
        self.members = {int(c): np.flatnonzero(labels_arr == c) for c in np.unique(labels_arr)}

    def __len__(self) -> int:  # steps are unbounded; the loader's sampler picks them
        return 2**62

    def __getitem__(self, step: int) -> StepBatch:
        idx = self.plan(step)
        images = self.store.get_many([self.paths[i] for i in idx])
        skipped, bad = 0, {}
        for pos, img in enumerate(images):
            attempt = 0
            while isinstance(img, UnreadableImage):
                skipped += 1
                bad[img.path] = img.reason
                attempt += 1
                if attempt > MAX_REPLACEMENTS:
                    raise VitflowError(
                        f"step {step}: {MAX_REPLACEMENTS + 1} images drawn in a row for one slot "
                        f"could not be read or decoded (last: {img}); "
                        + (
                            f"is the class of {self.paths[idx[pos]]!r} unreadable as a whole?"
                            if self.same_class
                            else "is most of the training set unreadable?"
                        )
                    )
                img = self.store.get_many(
                    [self.paths[self._replacement(idx[pos], step, pos, attempt)]]
                )[0]
            images[pos] = img
        # fork_rng: the augmentation draws never touch the caller's global RNG, so dropout
        # and friends in the training process see the same stream with or without workers.
        views = []
        with torch.random.fork_rng(devices=[]):
            for pos, img in enumerate(images):
                # The CPU generator only (what torchvision's transforms draw from):
                # torch.manual_seed would also reseed the CUDA generators, which fork_rng
                # does not restore, and dropout on the GPU draws from those.
                torch.default_generator.manual_seed(
                    augmentation_seed(self.seed, step, self.offset + pos)
                )
                views.append(self.transform(img))
        if views and isinstance(views[0], tuple):  # SimCLR: (first views, second views)
            x = torch.cat([torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])])
        else:
            x = torch.stack(views)
        return StepBatch(step=step, x=x, indices=list(idx), skipped=skipped, bad=bad)

    def _replacement(self, index: int, step: int, pos: int, attempt: int) -> int:
        pool = self.members[int(self.labels[index])] if self.same_class else None
        rng = np.random.default_rng([self.seed, _REPLACE_STREAM, step, self.offset + pos, attempt])
        return int(rng.choice(pool)) if pool is not None else int(rng.integers(len(self.paths)))


def _as_is(batch: StepBatch) -> StepBatch:
    return batch


def step_loader(
    dataset: StepBatches, start: int, stop: int, *, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches of steps ``start .. stop - 1`` in order, built by ``workers`` processes
    (0: in this process), each up to two batches ahead."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )


class BadImageTally:
    """Counts of unusable training images over all ranks, and the error budget.

    Every rank calls :meth:`sync` at the same steps (a collective); all ranks then hold the
    same totals and take the same decision, so a run over budget stops on every rank at once
    instead of leaving the others waiting in DDP.

    Args:
        max_error_fraction: stop when more than this share of the draws failed; None = off.
    """

    def __init__(self, max_error_fraction: float | None):
        self.max_error_fraction = max_error_fraction
        self.drawn = self.skipped = 0  # totals over all ranks, as of the last sync
        self.bad: dict[str, str] = {}
        self._drawn = self._skipped = 0  # this rank, since the last sync
        self._new: dict[str, str] = {}

    def add(self, batch: StepBatch) -> None:
        self._drawn += len(batch.indices) + batch.skipped
        self._skipped += batch.skipped
        for p, why in batch.bad.items():
            if p not in self.bad:
                self._new[p] = why

    def sync(self) -> dict[str, str]:
        """Add up every rank's counts; return the files first found bad since the last sync.

        Raises:
            VitflowError: more than ``max_error_fraction`` of all draws so far failed.
        """
        import torch.distributed as dist

        from vitflow.training.distributed import rank_and_world

        local = (self._drawn, self._skipped, self._new)
        _, world = rank_and_world()
        parts: list[Any] = [local]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, local)
        new: dict[str, str] = {}
        for drawn, skipped, found in parts:
            self.drawn += drawn
            self.skipped += skipped
            new.update({p: w for p, w in found.items() if p not in self.bad})
        self.bad.update(new)
        self._drawn = self._skipped = 0
        self._new = {}
        frac = self.skipped / self.drawn if self.drawn else 0.0
        if self.max_error_fraction is not None and frac > self.max_error_fraction:
            first = next(iter(self.bad.items()), ("?", "?"))
            raise VitflowError(
                f"{self.skipped} of {self.drawn} training images drawn so far ({frac:.1%}) could "
                f"not be read or decoded, more than data.max_error_fraction="
                f"{self.max_error_fraction:g}; e.g. {first[0]} ({first[1]}). Fix or remove the "
                "files (or raise the budget) and rerun to resume"
            )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "skipped": self.skipped, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn, self.skipped = int(state["drawn"]), int(state["skipped"])
        self.bad = dict(state["bad"])
