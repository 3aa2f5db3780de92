"""Who trains and who is tested: an output's labels and splits read once, then the eval plan.

One pass reads the small columns (id, label, split, status) of every row into per-row
arrays in storage order (:func:`read_rows`, about 14 bytes a row); :func:`plan_eval` turns
them into train/test masks from the ``split`` column, or, when no row has a split value, a
seeded stratified k-fold (:func:`assign_folds`). Every row is accounted for:
``n_train + n_test + error + no_label + other_split`` is the output's row count (split
mode; in k-fold mode every labelled ok row is both trained on and tested, in turn).
"""

from __future__ import annotations

import numpy as np

from vitflow import columns
from vitflow.analysis.sample import id_keys, remix
from vitflow.errors import VitflowError

TEST_SPLITS = ("test", "val", "validation")  # the default test split: the first present
FOLD_SALT = 1  # sample.remix salt of the fold assignment


def assign_folds(labels: np.ndarray, keys: np.ndarray, folds: int) -> np.ndarray:
    """Stratified folds: the rows of each class, ordered by ``keys``, go to folds 0, 1, ...,
    ``folds - 1``, 0, 1, ... in turn; so every class is spread evenly and the folds depend on
    the seed (through the keys), never on row order or sharding."""
    labels, keys = np.asarray(labels), np.asarray(keys)
    out = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rows[np.argsort(keys[rows], kind="stable")]] = np.arange(len(rows)) % folds
    return out


def read_rows(src, seed: int) -> dict:
    """One pass over the small columns: per row (in storage order) its seeded key, class
    index (-1: no label; classes sorted by name), split index (-1: none) and ok flag."""
    keys, label_idx, split_idx, ok = [], [], [], []
    labels: dict[str, int] = {}
    splits: dict[str, int] = {}
    names = [columns.ID, columns.LABEL, columns.SPLIT, columns.STATUS]
    for _, t in src.batches(names, batch_rows=1 << 16):
        keys.append(id_keys(t.column(columns.ID), seed))
        for col, vocab, out in (
            (columns.LABEL, labels, label_idx),
            (columns.SPLIT, splits, split_idx),
        ):
            out.append(
                np.asarray(
                    [
                        -1 if v is None else vocab.setdefault(v, len(vocab))
                        for v in t[col].to_pylist()
                    ],
                    np.int32,
                )
            )
        ok.append(np.asarray(t.column(columns.STATUS).to_pylist(), object) == columns.STATUS_OK)
    classes = sorted(labels)
    remap = np.empty(len(labels) + 1, np.int32)
    remap[-1] = -1
    for i, name in enumerate(classes):
        remap[labels[name]] = i
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.empty(0, dt)  # noqa: E731
    return {
        "keys": cat(keys, np.uint64),
        "label": remap[cat(label_idx, np.int32)],
        "classes": classes,
        "split": cat(split_idx, np.int32),
        "splits": {name: i for name, i in splits.items()},
        "ok": cat(ok, bool),
    }


def plan_eval(rows: dict, uri: str, train_split: str, test_split: str | None, folds: int) -> dict:
    """Which rows train and test (or which fold each row is tested in), and what is left out."""
    ok, label, split = rows["ok"], rows["label"], rows["split"]
    labelled = ok & (label >= 0)
    excluded = {"error": int(np.sum(~ok))}
    present = np.unique(label[labelled])
    if len(present) < 2:
        # One class scores 1.0 whatever the vectors: a leaderboard of that would mislead.
        held = ", ".join(rows["classes"][i] for i in present) or "no labelled ok row"
        raise VitflowError(
            f"{uri!r} has {len(present)} class among its labelled ok rows ({held}); "
            "kNN and linear-probe accuracy need at least two (labels come from the class "
            "folders, or a list file's label column)"
        )
    if not (split[ok] >= 0).any():
        fold = np.full(len(ok), -1, np.int64)
        fold[labelled] = assign_folds(
            label[labelled], remix(rows["keys"][labelled], FOLD_SALT), folds
        )
        excluded.update(no_label=int(np.sum(ok & (label < 0))), other_split=0)
        return {
            "mode": "folds",
            "split": {
                "folds": folds,
                "stratified": True,
                "why": "no row has a split value",
                "assignment": "per class, rows ordered by a seeded hash of their id go to "
                "folds 0..k-1 in turn",
            },
            "train": labelled,
            "test": labelled,
            "fold": fold,
            "excluded": excluded,
        }
    present = rows["splits"]
    counts = {name: int(np.sum(ok & (split == i))) for name, i in present.items()}
    listed = ", ".join(f"{n} {c}" for n, c in sorted(counts.items())) or "none"
    if train_split not in present:
        raise VitflowError(
            f"{uri!r} has no rows of split {train_split!r} (splits: {listed}); "
            "name the train split with --train-split"
        )
    if test_split is None:
        test_split = next((s for s in TEST_SPLITS if s in present), None)
        if test_split is None:
            raise VitflowError(
                f"{uri!r} has no test, val or validation split (splits: {listed}); "
                "name the test split with --test-split"
            )
    elif test_split not in present:
        raise VitflowError(f"{uri!r} has no rows of split {test_split!r} (splits: {listed})")
    if test_split == train_split:
        raise VitflowError(f"the train and test splits are both {train_split!r}; pick two")
    in_train, in_test = split == present[train_split], split == present[test_split]
    used = ok & (in_train | in_test)
    excluded.update(
        no_label=int(np.sum(used & (label < 0))), other_split=int(np.sum(ok & ~in_train & ~in_test))
    )
    return {
        "mode": "split",
        "split": {"train": train_split, "test": test_split},
        "train": labelled & in_train,
        "test": labelled & in_test,
        "fold": None,
        "excluded": excluded,
    }
