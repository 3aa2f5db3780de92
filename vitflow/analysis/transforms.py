"""Post-processing fitted at scale: standardisation and PCA (optionally whitened), fitted in
one streaming pass and stored beside the output.

The fit reads the feature's vectors part by part and merges each chunk's mean and centred
scatter into running float64 totals (Chan, Golub & LeVeque's pairwise update), so it is
exact and numerically stable without ever holding more than one chunk. Then:

- standardise: ``(x - mean) / scale`` with ``scale`` the population standard deviation
  (1 for a constant column), as scikit-learn's ``StandardScaler``;
- PCA: the eigendecomposition of the covariance (``ddof=1``; of the standardised data when
  both are asked for, derived from the same totals): components by decreasing eigenvalue,
  each signed so its largest-magnitude entry is positive (scikit-learn's ``svd_flip``);
  ``explained_variance`` = the eigenvalues;
- whitening divides each component by ``sqrt(explained_variance)``.

Stored as ``OUTPUT/_transforms/NAME.safetensors`` (float64 arrays ``mean``, ``scale``,
``components``, ``explained_variance``) and ``NAME.json`` (what it is, the fit's row count,
the fingerprint of the data it was fitted on, vitflow's version). The JSON is written last,
so a transform without one is incomplete and never loaded.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from vitflow.errors import VitflowError

TRANSFORMS_DIR = "_transforms"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class FittedTransform:
    """A fitted transform; :meth:`apply` maps ``(n, dim_in)`` vectors to ``(n, dim_out)``."""

    meta: dict  # the JSON beside the arrays
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def feature(self) -> str:
        return self.meta["feature"]

    @property
    def dim_out(self) -> int:
        return self.meta["dim_out"]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform rows (float32 out; a NaN row, such as an error row's, stays NaN)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.meta["dim_in"]:
            raise VitflowError(
                f"transform {self.name!r} takes {self.meta['dim_in']}-d vectors, not "
                f"{x.shape[1:]} ones"
            )
        y = (x.astype(np.float64) - self.arrays["mean"]) / self.arrays["scale"]
        if "components" in self.arrays:
            y = y @ self.arrays["components"].T
            if self.meta["whiten"]:
                y /= np.sqrt(self.arrays["explained_variance"])
        return y.astype(np.float32)

    def check(self, feature: str, fingerprint: str, uri: str) -> None:
        """Refuse, in one sentence, another feature or data other than the fit's."""
        if feature != self.feature:
            raise VitflowError(
                f"transform {self.name!r} was fitted on feature {self.feature!r}, not {feature!r}"
            )
        if fingerprint != self.meta["fitted_on"]["fingerprint"]:
            raise VitflowError(
                f"transform {self.name!r} was fitted on other data than {uri!r} holds now (its "
                f"{self.meta['rows']} rows had fingerprint "
                f"{self.meta['fitted_on']['fingerprint'][:12]}, the output now "
                f"{fingerprint[:12]}: re-embedded, completed or reindexed since), so fit it "
                f"again: vitflow fit {uri} --feature {self.feature} --name {self.name} "
                "--overwrite ..."
            )


class _Moments:
    """Running count, mean and centred scatter (full matrix or its diagonal), float64."""

    def __init__(self, dim: int, full: bool):
        self.n = 0
        self.full = full
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim) if full else dim)

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        xc = x - mb
        cb = xc.T @ xc if self.full else np.einsum("ij,ij->j", xc, xc)
        n = self.n + nb
        delta = mb - self.mean
        corr = np.outer(delta, delta) if self.full else delta * delta
        self.m2 += cb + corr * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def var(self) -> np.ndarray:
        """Population variance (``ddof=0``) per column."""
        return (np.diag(self.m2) if self.full else self.m2) / self.n


def _scale(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    # scikit-learn's StandardScaler: a column whose variance is within float64 rounding of 0
    # counts as constant and keeps scale 1.
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def default_name(feature: str, standardize: bool, pca: int | None, whiten: bool) -> str:
    """``emb-std``, ``emb-pca128``, ``emb-std-pca128w``."""
    return (
        feature
        + ("-std" if standardize else "")
        + (f"-pca{pca}" if pca else "")
        + ("w" if whiten else "")
    )


def fit_transform(
    uri: str,
    *,
    feature: str | None = None,
    standardize: bool = False,
    pca: int | None = None,
    whiten: bool = False,
    name: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    batch_rows: int | None = None,
) -> FittedTransform:
    """Fit standardisation and/or PCA on a feature in one streaming pass; store it beside
    the output as ``_transforms/NAME.{safetensors,json}``.

    Args:
        uri: the output folder or reindexed index (local path or fsspec URL).
        feature: the vector column (default: the only one).
        standardize: subtract the mean and divide by the standard deviation.
        pca: keep this many principal components (of the standardised data with
            ``standardize``).
        whiten: divide each component by the square root of its variance (needs ``pca``).
        name: the transform's name (default from the options, e.g. ``emb-std-pca128w``).
        split: fit on the rows of this split only (default: all ok rows).
        overwrite: replace a transform of the same name.
        storage_options: fsspec options for object storage.
        batch_rows: rows per streamed chunk (default: ~32 MiB of vectors).

    Returns:
        The :class:`FittedTransform`; ``vitflow.load_embeddings(uri, feature=...,
        transform=name)`` applies it.

    Example:
        >>> fit_transform("embeddings", feature="emb", pca=128, whiten=True)  # doctest: +SKIP
    """
    from vitflow import __version__
    from vitflow.analysis.source import open_source
    from vitflow.loading import vectors_of

    if not standardize and not pca:
        raise VitflowError("nothing to fit: ask for --standardize and/or --pca N")
    if whiten and not pca:
        raise VitflowError("--whiten whitens principal components: it needs --pca N")
    src = open_source(uri, storage_options)
    feature = src.feature(feature)
    dim = src.dims[feature]
    if pca is not None and not 1 <= pca <= dim:
        raise VitflowError(f"--pca {pca} is out of range: {feature!r} has {dim} dimensions")
    name = name or default_name(feature, standardize, pca, whiten)
    if not _NAME.match(name):
        raise VitflowError(
            f"transform name {name!r} must be letters, digits, '.', '_' or '-' (at most 100)"
        )
    json_path = posixpath.join(src.path.rstrip("/"), TRANSFORMS_DIR, f"{name}.json")
    if not overwrite and src.fs.exists(json_path):
        raise VitflowError(
            f"transform {name!r} already exists in {uri!r}; pass --overwrite to replace it, or "
            "--name to keep both"
        )

    moments = _Moments(dim, full=bool(pca))
    for _, t in src.batches([feature], ok=True, split=split, batch_rows=batch_rows):
        moments.add(vectors_of(t.column(feature)))
    n = moments.n
    if n < 2:
        raise VitflowError(f"{uri!r} has {n} ok rows{_of(split)}; a fit needs at least 2")
    mean = moments.mean
    scale = _scale(moments.var(), mean, n) if standardize else np.ones(dim)
    arrays = {"mean": mean, "scale": scale}
    meta_pca = {}
    if pca:
        cov = moments.m2 / (n - 1) / np.outer(scale, scale)
        w, v = np.linalg.eigh(cov)  # ascending
        top = np.argsort(-w, kind="stable")[:pca]
        components = v[:, top].T  # (pca, dim)
        biggest = np.argmax(np.abs(components), axis=1)
        components *= np.sign(components[np.arange(pca), biggest])[:, None]
        variance = np.clip(w[top], 0.0, None)
        if whiten and variance.min() <= 1e-12 * max(variance.max(), 1e-300):
            k = int(np.argmax(variance <= 1e-12 * max(variance.max(), 1e-300)))
            raise VitflowError(
                f"component {k + 1} of {feature!r} has no variance, so it cannot be whitened; "
                f"ask for at most {k} components"
            )
        arrays.update(components=components, explained_variance=variance)
        meta_pca = {"explained_variance_ratio": float(variance.sum() / max(np.trace(cov), 1e-300))}
    kind = "+".join(k for k, on in (("standardize", standardize), ("pca", bool(pca))) if on)
    meta = {
        "format": "vitflow.transform/1",
        "name": name,
        "feature": feature,
        "kind": kind,
        "standardize": standardize,
        "n_components": pca,
        "whiten": whiten,
        "dim_in": dim,
        "dim_out": pca or dim,
        "rows": n,
        "split": split,
        **meta_pca,
        "fitted_on": {"fingerprint": src.fingerprint, **src.data},
        "arrays": f"{name}.safetensors",
        "vitflow_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from safetensors.numpy import save

    blob = save(
        {k: np.ascontiguousarray(a, dtype=np.float64) for k, a in arrays.items()},
        metadata={"feature": feature, "fingerprint": src.fingerprint},
    )
    src.write_file(f"{TRANSFORMS_DIR}/{name}.safetensors", blob)
    src.write_file(f"{TRANSFORMS_DIR}/{name}.json", (json.dumps(meta, indent=2) + "\n").encode())
    return FittedTransform(meta, arrays)


def _of(split: str | None) -> str:
    return "" if split is None else f" of split {split!r}"


def load_transform(uri: str, name: str, storage_options: dict | None = None) -> FittedTransform:
    """The transform ``name`` stored beside ``uri`` (not checked against the data yet)."""
    from safetensors.numpy import load

    from vitflow.storage import open_fs

    fs, path = open_fs(uri, storage_options)
    folder = posixpath.join(path.rstrip("/"), TRANSFORMS_DIR)
    try:
        with fs.open(posixpath.join(folder, f"{name}.json"), "rb") as f:
            meta = json.load(f)
        with fs.open(posixpath.join(folder, meta["arrays"]), "rb") as f:
            arrays = load(f.read())
    except FileNotFoundError:
        have = sorted(
            posixpath.basename(p)[: -len(".json")]
            for p in (fs.ls(folder, detail=False) if fs.exists(folder) else [])
            if p.endswith(".json")
        )
        raise VitflowError(
            f"no transform {name!r} beside {uri!r} ("
            + (f"it has {', '.join(have)}" if have else "it has none")
            + "); fit one with `vitflow fit`"
        ) from None
    return FittedTransform(meta, arrays)


def checked_transform(
    uri: str, name: str, feature: str, storage_options: dict | None = None
) -> FittedTransform:
    """:func:`load_transform`, refused unless fitted on ``feature`` of the data ``uri``
    holds now."""
    from vitflow.analysis.source import open_source

    transform = load_transform(uri, name, storage_options)
    transform.check(feature, open_source(uri, storage_options).fingerprint, uri)
    return transform
