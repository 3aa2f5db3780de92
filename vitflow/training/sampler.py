"""Class-balanced batches for SIMO2: ``classes × samples_per_class``, sharded by class.

Every global batch is a pure function of ``(seed, step)`` and the labels: no hidden state
advances between steps, so a resumed run (or one restarted with a different number of
workers) draws exactly the batches it would have drawn. Each step draws afresh: a random
set of classes, then, per class, ``samples_per_class`` distinct samples (with replacement
only for classes too small to supply them). Over many steps every sample is seen in
expectation; an exact per-class epoch would need history and break that purity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPLACEMENT_MODES = ("auto", "never")


class ClassBalancedBatchSampler:
    """Indices of class-balanced batches, split across DDP ranks by whole classes.

    The global batch of step ``s`` holds ``classes_per_batch`` distinct classes × exactly
    ``samples_per_class`` samples, class-major (class ``c``'s samples contiguous), so the
    loss can view it as ``(C, K, D)``. Rank ``r`` of ``W`` receives classes
    ``[r * C / W:(r + 1) * C / W]`` of that batch, so each rank's SIMO2 loss sees complete
    classes and no two ranks share a sample within a step.

    Args:
        labels: class label of every dataset index.
        classes_per_batch: classes per *global* batch; None means all classes.
        samples_per_class: samples of each class per batch (``K``, at least 2).
        rank: this worker's rank (default 0).
        world_size: number of workers (default 1); must divide ``classes_per_batch``.
        seed: base seed; batches depend only on ``(seed, step)`` (default 0).
        replacement: ``auto`` samples classes smaller than ``samples_per_class`` with
            replacement and warns once; ``never`` refuses them (default ``auto``).

    Example:
        >>> sampler = ClassBalancedBatchSampler([0, 0, 1, 1, 2, 2], 2, samples_per_class=2)
        >>> len(sampler.batch(0))
        4
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int | None,
        samples_per_class: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        replacement: str = "auto",
    ) -> None:
        labels_arr = np.asarray(labels)
        if labels_arr.ndim != 1 or labels_arr.size == 0:
            raise ValueError(f"Expected a non-empty 1-D label sequence, but got {labels_arr.shape}")
        if not np.issubdtype(labels_arr.dtype, np.integer):
            raise ValueError(
                f"Expected integer labels, but got dtype {labels_arr.dtype}; map class names "
                "to integers first"
            )
        self.classes, inverse = np.unique(labels_arr, return_inverse=True)  # (n_classes,)
        n_classes = len(self.classes)
        if n_classes < 2:
            raise ValueError(
                f"Expected at least 2 classes in labels, but got {n_classes}; class-balanced "
                "contrastive training needs labels from several classes"
            )
        cpb = n_classes if classes_per_batch is None else classes_per_batch
        if not 2 <= cpb <= n_classes:
            raise ValueError(
                f"Expected 2 <= classes_per_batch <= {n_classes} (the number of classes), but "
                f"got {classes_per_batch}; lower classes_per_batch or pass None for all classes"
            )
        if samples_per_class < 2:
            raise ValueError(
                f"Expected samples_per_class >= 2 (the same-class term needs pairs), but got "
                f"{samples_per_class}; set samples_per_class to 2 or more"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Expected 0 <= rank < world_size, but got {rank=} {world_size=}")
        if cpb % world_size:
            raise ValueError(
                f"Expected classes_per_batch divisible by world_size={world_size}, but got "
                f"{cpb}; ranks split batches by whole classes, so choose a multiple of "
                f"{world_size} for classes_per_batch (or change the number of workers)"
            )
        if cpb // world_size < 2:
            raise ValueError(
                f"Expected >= 2 classes per rank, but got {cpb // world_size} "
                f"({cpb} classes over {world_size} ranks); set classes_per_batch to at least "
                f"{2 * world_size}"
            )
        if seed < 0:
            raise ValueError(f"Expected seed >= 0, but got {seed}")
        if replacement not in REPLACEMENT_MODES:
            raise ValueError(
                f"Expected replacement in {REPLACEMENT_MODES}, but got {replacement!r}"
            )

        # Dataset indices of each class, grouped once: (n_classes,) arrays of indices.
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=n_classes)
        self.class_indices = np.split(order, np.cumsum(counts)[:-1])
        small = [int(c) for c, n in zip(self.classes, counts, strict=True) if n < samples_per_class]
        if small:
            named = ", ".join(map(str, small[:20])) + (" ..." if len(small) > 20 else "")
            if replacement == "never":
                raise ValueError(
                    f"Expected every class to have >= {samples_per_class} samples, but classes "
                    f"[{named}] have fewer; lower samples_per_class, drop those classes, or use "
                    "replacement='auto'"
                )
            log.warning(
                "Classes [%s] have fewer than %d samples; sampling them with replacement",
                named,
                samples_per_class,
            )
        self.classes_per_batch = cpb
        self.samples_per_class = samples_per_class
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.step = 0  # next step that iteration yields; the only state besides the seed

    def global_batch(self, step: int) -> list[int]:
        """Indices of the whole batch of ``step`` across all ranks, class-major."""
        if step < 0:
            raise ValueError(f"Expected step >= 0, but got {step}")
        # Seeding with (seed, step) makes every step independent of all others.
        rng = np.random.default_rng([self.seed, step])
        k = self.samples_per_class
        chosen = rng.choice(len(self.classes), size=self.classes_per_batch, replace=False)
        parts = []
        for c in chosen:  # one draw per class, not per sample
            idx = self.class_indices[c]
            parts.append(rng.choice(idx, size=k, replace=len(idx) < k))
        return np.concatenate(parts).tolist()  # (C * K,)

    def batch(self, step: int) -> list[int]:
        """This rank's indices for ``step``: its whole classes of the global batch."""
        per_rank = self.classes_per_batch // self.world_size * self.samples_per_class
        start = self.rank * per_rank
        return self.global_batch(step)[start : start + per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's batches forever from ``self.step``, advancing it.

        A ``DataLoader`` with workers prefetches, so ``self.step`` runs ahead of training;
        checkpoint the number of optimiser steps taken and restore it as ``step``.
        """
        while True:
            # Advance before yielding so state_dict() counts the batches already handed out.
            step, self.step = self.step, self.step + 1
            yield self.batch(step)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to reproduce the batches: seed and next step."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        missing = {"seed", "step"} - set(state)
        if missing:
            raise ValueError(f"Expected keys seed and step in sampler state, but {missing} missing")
        self.seed, self.step = int(state["seed"]), int(state["step"])
