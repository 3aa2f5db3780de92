"""``vitflow eval``: score every feature set of an output on its own labels, side by side.

For each vector column: the weighted kNN classifier (:mod:`vitflow.analysis.knn`, DINO's
protocol) and the linear probe (:mod:`vitflow.analysis.probe`), on the train/test split the
``split`` column gives, or on a seeded stratified k-fold when it has no values. One embed job
with several feature sets followed by one eval is a layer/pooling sweep: the leaderboard
ranks them (kNN top-1, then linear top-1).

Bounded memory, whatever the output's size: one pass reads the small columns (id, label,
split, status) into per-row arrays (about 14 bytes a row); the vectors are never all read.
Test rows are taken in blocks of at most :data:`TEST_BLOCK_BYTES`; for each block one pass
streams every train row chunk by chunk through a running top-k (and gathers the next block).
The probe fits on at most ``max_probe_rows`` train rows (a seeded, class-proportional sample
when there are more; eval.json says how many), which with scikit-learn's copies takes about
``4 * max_probe_rows * dim * 4`` bytes.

Measured on the 2-core machine (vectors 768-d, 10 parts of 10,000 rows per 100k): 100k rows
(20k test), kNN only: 33 s, 0.58 GB peak; 300k rows (6k test), kNN only: 72 s, 0.53 GB; the
same with the default 50,000-row probe: 173 s, 0.96 GB. (Python with scikit-learn and
matplotlib imported: 0.23 GB.)
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from vitflow.analysis import knn, probe
from vitflow.analysis.sample import proportional_quotas, remix
from vitflow.analysis.splits import plan_eval, read_rows
from vitflow.errors import VitflowError

# Test vectors held at once (float32); the pass that scores one block gathers the next, so
# eval holds two blocks at most.
TEST_BLOCK_BYTES = 128 * 2**20
MAX_PROBE_ROWS = 50_000
EVAL_DIR = "_eval"
# Independent seeded choices from one hash of the ids (sample.remix salts).
PROBE_SALT, HOLDOUT_SALT = 2, 3  # (1: splits.FOLD_SALT)


@dataclass
class FeatureScore:
    """One feature set's scores and how they were obtained. In k-fold mode ``n_train`` and
    ``n_test`` are both the labelled ok rows: each is tested once, against the other folds."""

    name: str
    dim: int
    spec: dict | None
    knn_top1: float
    knn_top5: float
    linear_top1: float
    n_train: int
    n_test: int
    protocol: dict = field(default_factory=dict)
    folds: dict | None = None  # per fold: knn_top1, linear_top1 (k-fold mode)

    def to_json(self) -> dict:
        out = {
            "knn_top1": self.knn_top1,
            "knn_top5": self.knn_top5,
            "linear_top1": self.linear_top1,
            "dim": self.dim,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "spec": self.spec,
            "protocol": self.protocol,
        }
        if self.folds is not None:
            out["per_fold"] = self.folds
        return out


@dataclass
class EvalReport:
    """What :func:`evaluate` found: features in leaderboard order, and where it wrote them."""

    uri: str
    mode: str  # "split" | "folds"
    split: dict  # {"train": ..., "test": ...} or {"folds": 5, ...}
    seed: int
    excluded: dict
    scores: list[FeatureScore]
    data: dict
    eval_json: str | None = None
    chart: str | None = None

    def to_json(self) -> dict:
        from vitflow import __version__

        return {
            "format": "vitflow.eval/1",
            "uri": self.uri,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vitflow_version": __version__,
            "data": self.data,
            "mode": self.mode,
            "split" if self.mode == "split" else "folds": self.split,
            "seed": self.seed,
            "excluded": self.excluded,
            "leaderboard": [s.name for s in self.scores],
            "features": {s.name: s.to_json() for s in self.scores},
        }

    def leaderboard(self) -> str:
        from vitflow.analysis.leaderboard import leaderboard_text

        return leaderboard_text(self)


def evaluate(
    uri: str,
    *,
    feature: str | list[str] | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    folds: int = 5,
    seed: int = 0,
    storage_options: dict | None = None,
    max_probe_rows: int = MAX_PROBE_ROWS,
    c_grid: tuple[float, ...] = probe.C_GRID,
    write: bool = True,
    batch_rows: int | None = None,
    block_rows: int | None = None,
) -> EvalReport:
    """Score every feature set (kNN top-1/top-5, linear top-1) of an embed output or index.

    Args:
        uri: the output folder or reindexed index (local path or fsspec URL).
        feature: a vector column, or several (default: all of them).
        train_split: the ``split`` value of the train rows. Default ``train``.
        test_split: the ``split`` value of the test rows. Default: the first of ``test``,
            ``val``, ``validation`` present. When no row has a split, a seeded stratified
            ``folds``-fold cross-validation runs instead (rows of each class, ordered by a
            seeded hash of their id, go to folds 0, 1, ..., folds-1, 0, ...).
        k: kNN neighbours. Default 20 (DINO).
        temperature: kNN vote weight ``exp(sim / temperature)``. Default 0.07 (DINO).
        folds: folds of the cross-validation. Default 5.
        seed: seeds every choice (folds, the probe's held-out rows and sample).
        storage_options: fsspec options for object storage.
        max_probe_rows: most train rows the linear probe fits on. Default 50,000.
        c_grid: the probe's regularisation strengths to choose from
            (default :data:`vitflow.analysis.probe.C_GRID`).
        write: write ``OUTPUT/_eval/eval.json`` and ``leaderboard.png``. Default True.
        batch_rows: train rows per streamed chunk (default: ~32 MiB of vectors).
        block_rows: test rows per block (default: :data:`TEST_BLOCK_BYTES` of vectors).

    Returns:
        An :class:`EvalReport`, features best first.

    Example:
        >>> report = evaluate("embeddings")  # doctest: +SKIP
        >>> print(report.leaderboard())  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source, require_train_extra

    require_train_extra("vitflow eval")
    if folds < 2:
        raise VitflowError(f"folds must be at least 2, not {folds}")
    if not temperature > 0:
        raise VitflowError(f"temperature must be > 0, not {temperature}")
    if k < 1:
        raise VitflowError(f"k must be at least 1, not {k}")
    src = open_source(uri, storage_options)
    names = src.features(feature)
    rows = read_rows(src, seed)
    plan = plan_eval(rows, src.uri, train_split, test_split, folds)
    opts = _Options(k, temperature, seed, max_probe_rows, tuple(c_grid), batch_rows, block_rows)
    scores = [_score(src, name, rows, plan, opts) for name in names]
    scores.sort(key=lambda s: (-s.knn_top1, -s.linear_top1, s.name))
    report = EvalReport(
        src.uri,
        plan["mode"],
        plan["split"],
        seed,
        plan["excluded"],
        scores,
        {"kind": src.kind, "fingerprint": src.fingerprint, "rows": len(rows["ok"])},
    )
    if write:
        from vitflow.analysis.leaderboard import bar_chart

        body = (json.dumps(report.to_json(), indent=2) + "\n").encode()
        report.eval_json = src.write_file(f"{EVAL_DIR}/eval.json", body)
        report.chart = src.write_file(f"{EVAL_DIR}/leaderboard.png", bar_chart(report))
    return report


MATRIX_COLUMNS = (
    "dataset",
    "model",
    "feature",
    "dim",
    "knn_top1",
    "knn_top5",
    "linear_top1",
    "n_train",
    "n_test",
    "mode",
)


@dataclass
class MatrixEval:
    """:func:`evaluate_matrix`'s leaderboard: one row per (dataset, model, feature), each
    dataset's rows best first; pairs that could not be scored, with the reason."""

    uri: str
    rows: list[dict]
    skipped: list[dict]
    files: dict[str, str] = field(default_factory=dict)

    def leaderboard(self) -> str:
        head = f"{'dataset':<16} {'model':<20} {'feature':<14} {'dim':>6}  kNN@1   kNN@5   linear@1"
        lines = [f"vitflow eval: {self.uri} (every model x dataset)", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['dataset']:<16} {r['model']:<20} {r['feature']:<14} {r['dim']:>6}  "
                f"{r['knn_top1']:.4f}  {r['knn_top5']:.4f}  {r['linear_top1']:.4f}"
            )
        lines += [f"not scored: {s['model']}/{s['dataset']}: {s['reason']}" for s in self.skipped]
        lines += [f"written: {', '.join(self.files.values())}"] if self.files else []
        return "\n".join(lines)


def evaluate_matrix(
    uri: str, *, storage_options: dict | None = None, write: bool = True, **options
) -> MatrixEval:
    """Score every model/dataset pair of a matrix output (``vitflow matrix``) with
    :func:`evaluate` (same ``options``; each pair's ``_eval/`` is written beside it) and
    gather one leaderboard with model and dataset columns: ``OUT/_eval/leaderboard.json``
    and ``leaderboard.csv``. A pair eval cannot score (a dataset without labels, or without
    a test split and too few rows per class for folds) is listed as not scored, with the
    reason, and the others are still scored.

    Example:
        >>> print(evaluate_matrix("matrix-out").leaderboard())  # doctest: +SKIP
    """
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    from vitflow.matrix import MATRIX_INDEX, split_uri
    from vitflow.storage import open_fs, write_atomic

    fs, path = open_fs(uri, storage_options)
    index_file = posixpath.join(path.rstrip("/"), MATRIX_INDEX)
    try:
        with fs.open(index_file, "rb") as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        raise VitflowError(
            f"{uri!r} is not a matrix output (no {MATRIX_INDEX}); evaluate one output with "
            "evaluate()"
        ) from None
    rows, skipped = [], []
    for model in index.get("models", []):
        for dataset in index.get("datasets", {}):
            pair = split_uri(uri, model, dataset)
            try:
                report = evaluate(pair, storage_options=storage_options, write=write, **options)
            except VitflowError as e:
                skipped.append({"model": model, "dataset": dataset, "reason": str(e)})
                continue
            for sc in report.scores:
                rows.append(
                    {
                        "dataset": dataset,
                        "model": model,
                        "feature": sc.name,
                        "dim": sc.dim,
                        "knn_top1": sc.knn_top1,
                        "knn_top5": sc.knn_top5,
                        "linear_top1": sc.linear_top1,
                        "n_train": sc.n_train,
                        "n_test": sc.n_test,
                        "mode": report.mode,
                    }
                )
    order = {d: i for i, d in enumerate(index.get("datasets", {}))}
    rows.sort(key=lambda r: (order[r["dataset"]], -r["knn_top1"], -r["linear_top1"], r["model"]))
    result = MatrixEval(uri, rows, skipped)
    if write:
        base = posixpath.join(path.rstrip("/"), EVAL_DIR)
        body = {"format": "vitflow.matrix-eval/1", "uri": uri, "rows": rows, "skipped": skipped}
        write_atomic(fs, f"{base}/leaderboard.json", (json.dumps(body, indent=1) + "\n").encode())
        buf = io.BytesIO()
        table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in MATRIX_COLUMNS})
        pacsv.write_csv(table.select(list(MATRIX_COLUMNS)), buf)
        write_atomic(fs, f"{base}/leaderboard.csv", buf.getvalue())
        out = uri.rstrip("/")
        result.files = {
            "json": f"{out}/{EVAL_DIR}/leaderboard.json",
            "csv": f"{out}/{EVAL_DIR}/leaderboard.csv",
        }
    return result


@dataclass(frozen=True)
class _Options:
    k: int
    temperature: float
    seed: int
    max_probe_rows: int
    c_grid: tuple[float, ...]
    batch_rows: int | None
    block_rows: int | None


def _score(src, name: str, rows: dict, plan: dict, opts: _Options) -> FeatureScore:
    """kNN and linear probe of one feature: pass 0 gathers the probe's rows and the first
    test block; then, per test block, one pass streams the train rows through the running
    top-k and gathers the next block."""
    label, keys, fold = rows["label"], rows["keys"], plan["fold"]
    train_pos, test_pos = np.flatnonzero(plan["train"]), np.flatnonzero(plan["test"])
    if not len(train_pos) or not len(test_pos):
        raise VitflowError(
            f"{src.uri!r} has {len(train_pos)} labelled train and {len(test_pos)} labelled test "
            "rows; eval needs both"
        )
    probe_pos = _probe_rows(train_pos, label, keys, opts.max_probe_rows)
    block = opts.block_rows or max(1, TEST_BLOCK_BYTES // (4 * src.dims[name]))
    blocks = [test_pos[i : i + block] for i in range(0, len(test_pos), block)]
    n_rows, n_folds = len(label), 1 if fold is None else plan["split"]["folds"]

    x_probe, x_test = _pass(src, name, n_rows, opts.batch_rows, gather=[probe_pos, blocks[0]])
    probe_fold = None if fold is None else fold[probe_pos]
    probes = _fit_probes(x_probe, label[probe_pos], keys[probe_pos], probe_fold, n_folds, opts)
    del x_probe
    # Rows right per fold (one "fold" in split mode): kNN top-1, kNN top-5, linear; rows.
    right = np.zeros((4, n_folds), np.int64)
    for b, pos in enumerate(blocks):
        y = label[pos]
        group = np.zeros(len(pos), np.int64) if fold is None else fold[pos]
        pred = np.empty(len(pos), np.int64)
        for f in np.unique(group):
            pred[group == f] = probes[f].predict(x_test[group == f])
        acc = knn.KnnAccumulator(x_test, k=opts.k, groups=None if fold is None else group)
        x_test = None  # the accumulator keeps the normalised copy

        def on_train(at, x, acc=acc):
            acc.update(x, label[at], None if fold is None else fold[at])

        nxt = [blocks[b + 1]] if b + 1 < len(blocks) else []
        gathered = _pass(
            src, name, n_rows, opts.batch_rows, train=plan["train"], on_train=on_train, gather=nxt
        )
        hit = knn.topk_correct(acc.votes(len(rows["classes"]), opts.temperature), y, ks=(1, 5))
        for i, ok in enumerate((hit[1], hit[5], pred == y, np.ones(len(y), bool))):
            right[i] += np.bincount(group[ok], minlength=n_folds)
        x_test = gathered[0] if gathered else None
    total = right.sum(axis=1)
    per_fold = None
    if fold is not None:
        per_fold = {
            "knn_top1": (right[0] / np.maximum(right[3], 1)).tolist(),
            "linear_top1": (right[2] / np.maximum(right[3], 1)).tolist(),
            "n_test": right[3].tolist(),
        }
    return FeatureScore(
        name=name,
        dim=src.dims[name],
        spec=src.specs.get(name),
        knn_top1=float(total[0] / total[3]),
        knn_top5=float(total[1] / total[3]),
        linear_top1=float(total[2] / total[3]),
        n_train=len(train_pos),
        n_test=len(test_pos),
        protocol=_protocol(plan, opts, probes, len(probe_pos)),
        folds=per_fold,
    )


def _protocol(plan: dict, opts: _Options, probes: list, probe_rows: int) -> dict:
    """How one feature was scored, for eval.json."""
    one = plan["fold"] is None
    return {
        ("split" if one else "folds"): plan["split"],
        "seed": opts.seed,
        "knn": {
            "k": opts.k,
            "temperature": opts.temperature,
            "similarity": "cosine (L2-normalised vectors)",
            "vote": "sum over the k nearest train rows of exp(sim / temperature)",
            "top5": "true class among the 5 best-voted classes (a class with no vote never counts)",
        },
        "linear": {
            "model": "scikit-learn LogisticRegression (lbfgs, multinomial), max_iter "
            f"{probe.MAX_ITER}, on StandardScaler features",
            "C": probes[0].C if one else [p.C for p in probes],
            "C_grid": list(opts.c_grid),
            "holdout": probe.HOLDOUT,
            "holdout_top1": (
                {str(c): v for c, v in probes[0].scores.items()}
                if one
                else [{str(c): v for c, v in p.scores.items()} for p in probes]
            ),
            "n_train": probe_rows,
            "max_train_rows": opts.max_probe_rows,
            "converged": all(p.converged for p in probes),
        },
        "excluded": plan["excluded"],
    }


def _probe_rows(train_pos, label, keys, max_rows: int) -> np.ndarray:
    """All train rows, or a class-proportional sample of ``max_rows`` of them (each class's
    rows with the smallest seeded keys), in storage order."""
    if len(train_pos) <= max_rows:
        return train_pos
    y = label[train_pos]
    classes, counts = np.unique(y, return_counts=True)
    quotas = proportional_quotas(
        dict(zip(classes.tolist(), counts.tolist(), strict=True)), max_rows
    )
    salted = remix(keys[train_pos], PROBE_SALT)
    keep = []
    for c, q in quotas.items():
        rows = np.flatnonzero(y == c)
        keep.append(rows[np.argsort(salted[rows], kind="stable")[:q]])
    return np.sort(train_pos[np.concatenate(keep)])


def _fit_probes(x, y, keys, fold, n_folds: int, opts: _Options) -> list[probe.LinearProbe]:
    """One probe (split mode), or one per fold trained on the other folds' rows."""
    salted = remix(keys, HOLDOUT_SALT)
    if fold is None:
        return [probe.fit_probe(x, y, probe.holdout_mask(y, salted), c_grid=opts.c_grid)]
    out = []
    for f in range(n_folds):
        rows = fold != f
        mask = probe.holdout_mask(y[rows], salted[rows])
        out.append(probe.fit_probe(x[rows], y[rows], mask, c_grid=opts.c_grid))
    return out


def _pass(src, name, n_rows, batch_rows, *, train=None, on_train=None, gather=()):
    """One pass over the vectors of ``name`` in storage order: rows under the ``train`` mask
    go to ``on_train(positions, vectors)`` a chunk at a time; the rows at each sorted array
    of positions in ``gather`` are collected and returned (one array each)."""
    from vitflow.loading import vectors_of

    out = [np.empty((len(p), src.dims[name]), np.float32) for p in gather]
    offset = 0
    for _, t in src.batches([name], batch_rows=batch_rows):
        n = t.num_rows
        x = None
        if train is not None:
            local = np.flatnonzero(train[offset : offset + n])
            if len(local):
                x = vectors_of(t.column(name))
                on_train(offset + local, x[local])
        for arr, pos in zip(out, gather, strict=True):
            lo, hi = np.searchsorted(pos, [offset, offset + n])
            if hi > lo:
                x = vectors_of(t.column(name)) if x is None else x
                arr[lo:hi] = x[pos[lo:hi] - offset]
        offset += n
    if offset != n_rows:
        raise VitflowError(
            f"{src.uri!r} changed while eval read it ({n_rows} rows, then {offset}); rerun it"
        )
    return out
