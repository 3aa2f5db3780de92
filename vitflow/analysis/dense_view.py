"""The usual check that dense features are sane: a few images, each beside the first three
principal components of its dense map as RGB (colours shared across the images, so the same
part of the same kind of object gets the same colour)."""

from __future__ import annotations

import posixpath

import numpy as np

DENSE_DIR = "_dense"


def dense_preview(
    uri: str,
    feature: str,
    *,
    images: int = 6,
    seed: int = 0,
    storage_options: dict | None = None,
    model: str | None = None,
    dataset: str | None = None,
) -> str:
    """Write ``<output>/_dense/<feature>.png`` for ``images`` ok rows sampled with ``seed``
    (of a matrix output: its ``model``/``dataset`` pair) and return where it went.

    Example:
        >>> dense_preview("embeddings", "patches")  # doctest: +SKIP
        'embeddings/_dense/patches.png'
    """
    import fsspec
    import pyarrow.dataset as pads

    from vitflow import columns
    from vitflow.analysis.plots import dense_panel
    from vitflow.analysis.source import open_source, require_train_extra
    from vitflow.decode import decode_image
    from vitflow.errors import VitflowError
    from vitflow.loading import load_dense
    from vitflow.storage import open_fs, write_atomic

    require_train_extra("dense_preview")
    if model is not None or dataset is not None:
        if model is None or dataset is None:
            raise VitflowError("a matrix output is sliced by model= and dataset= together")
        uri = f"{uri.rstrip('/')}/{model}/{dataset}"
    # Only the pictured rows' maps are read: the ids first, then those rows.
    ok_ids = (
        open_source(uri, storage_options)
        .dataset.to_table(
            columns=[columns.ID], filter=pads.field(columns.STATUS) == columns.STATUS_OK
        )
        .column(0)
        .to_pylist()
    )
    if not ok_ids:
        raise VitflowError(f"{uri!r} has no ok row to picture")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(ok_ids), size=min(images, len(ok_ids)), replace=False))
    df, maps = load_dense(
        uri, feature, storage_options=storage_options, ids=[ok_ids[i] for i in picked]
    )
    fs, out = open_fs(uri, storage_options)
    crop = _model_view(fs, out)
    pictures, titles = [], []
    for path in df[columns.PATH]:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            pictures.append(crop(decode_image(f.read())))
        titles.append(posixpath.basename(str(path)))
    png = dense_panel(pictures, [m.astype(np.float32) for m in maps], titles=titles)
    write_atomic(fs, posixpath.join(out.rstrip("/"), DENSE_DIR, f"{feature}.png"), png)
    return f"{uri.rstrip('/')}/{DENSE_DIR}/{feature}.png"


def _model_view(fs, path: str):
    """The model's own resize and crop (from the output's manifest), so each picture shows
    what the map covers."""
    from vitflow.loading import embed_manifest
    from vitflow.preprocess import Preprocessor

    dc = dict((embed_manifest(fs, path).get("model") or {}).get("data_config") or {})
    if not dc:
        return np.asarray
    for key in ("input_size", "mean", "std"):
        if key in dc:
            dc[key] = tuple(dc[key])
    return Preprocessor(dc).resize_crop
