"""``_manifest.json``: what produced an embeddings output, so it can be trusted and reproduced."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from vitflow import columns

_PACKAGES = ("vitflow", "timm", "torch", "ray", "pyarrow", "pillow")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _feature_entry(p, pca: dict | None = None) -> dict[str, Any]:
    """How one feature set was made: blocks and pooling, or the projection head."""
    if p.source == "head":
        return {"dim": p.dim, "source": "head", "normalize": p.normalize}
    if p.dense:
        # A map per image: `dim` values, cells row by row (shape h, w, D), float16.
        return {
            "dim": p.dim,
            "dense": True,
            "shape": list(p.shape),
            "stride": p.stride,
            "dtype": "float16",
            "layers": list(p.indices),
            "aggregate": p.aggregate,
            "norm": p.norm,
            "normalize": p.normalize,
            "shift": p.shift,
            **(
                {
                    "pca": {
                        "components": p.pca,
                        "fitted_on_images": int(pca["images"][0]),
                        "explained_variance": round(float(pca["explained"].sum()), 6),
                        "file": "_dense/pca.safetensors",
                    }
                }
                if p.pca and pca is not None
                else {}
            ),
        }
    return {
        "dim": p.dim,
        "layers": list(p.indices),
        "pool": p.pool,
        "aggregate": p.aggregate,
        "norm": p.norm,
        "normalize": p.normalize,
    }


def build_manifest(
    cfg,
    backbone,
    features,
    *,
    counts,
    seconds,
    stats,
    actors,
    listing=None,
    parts=None,
    timings=None,
    identity=None,
) -> dict[str, Any]:
    """Everything needed to reproduce and trust an output: config, model, features, counts."""
    model = backbone.model
    return {
        "format": "vitflow.embeddings/1",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "model": {
            "name": cfg.model.name,
            "architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
            # checkpoint | hub | random: a reader can tell random vectors from real ones.
            "weights": cfg.model.weights_source,
            "checkpoint": cfg.model.checkpoint,
            "checkpoint_sha256": backbone.checkpoint_sha256,
            "num_params": sum(p.numel() for p in model.parameters()),
            "data_config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()
            },
        },
        "features": {
            p.name: _feature_entry(p, (backbone.dense_pca or {}).get(p.name)) for p in features
        },
        "columns": [
            *columns.META_COLUMNS,
            *(p.name for p in features),
            *([columns.MAE_LOSS] if cfg.model.mae_loss is not None else []),
        ],
        # What the vectors depend on (vitflow.identity): equal fingerprints, comparable vectors.
        "identity": None
        if identity is None
        else {"fingerprint": _fingerprint(identity), "vectors": identity},
        "counts": counts,
        # Rows of every part file: readers refuse an output whose parts disagree.
        "parts": parts,
        # What the source held besides the listed files: nothing is left out unsaid.
        "listing": None
        if listing is None
        else {"by_extension": dict(listing.by_extension), "skipped": listing.skipped.to_dict()},
        # Where the time went: listing, the stream (decode, model, write summed over tasks and
        # actors), the model actors' busy share, steady-state images/s, the final check.
        "timing": {
            "wall_seconds": round(seconds, 3),
            "images_per_second": round(counts["listed"] / seconds, 2) if seconds else None,
            "model_seconds": round(stats.get("model_seconds", 0.0), 3),
            **(timings or {}),
        },
        "execution": {"actors": actors, **{k: v for k, v in stats.items() if k != "model_seconds"}},
        "versions": versions(),
    }


def _fingerprint(identity: dict[str, Any]) -> str:
    from vitflow.identity import fingerprint

    return fingerprint(identity)


def write_manifest(
    fs, output_path: str, manifest: dict[str, Any], retry_s: float | None = None
) -> None:
    """Write ``_manifest.json`` atomically: a full disk or a kill leaves the old one or none,
    never an empty or half-written file."""
    from vitflow.storage import write_atomic

    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    write_atomic(fs, f"{output_path.rstrip('/')}/{columns.MANIFEST_NAME}", data, retry_s=retry_s)


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of an embeddings output (local path or fsspec URL)."""
    from vitflow.storage import open_fs

    fs, path = open_fs(uri)
    with fs.open(f"{path.rstrip('/')}/{columns.MANIFEST_NAME}", "r") as f:
        return json.load(f)
