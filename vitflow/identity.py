"""Which settings the vectors depend on: one function, used by resume, the index and the
manifest alike.

Two jobs whose :func:`vector_identity` agree produce the same vector for the same file: the
same weights (by content, wherever they were loaded from), model settings, feature spec,
preprocessing and label rules. Resume adds what must also not change under an interrupted
run (the part layout and the listed files); the index adds its format version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vitflow.backbone import weights_fingerprint
from vitflow.config import EmbedConfig

# Each part of the identity, as a sentence names it when it changes.
PARTS = {
    "weights_sha256": "the model weights",
    "model": "the model settings (name, kwargs, extractor, mae_loss)",
    "features": "the feature spec",
    "preprocessing": "the preprocessing (source.max_pixels, compute.precision, compute.decode, "
    "compute.jpeg_draft)",
    "labels": "the label/split rules (source.labels, source.split, source.within)",
    "format": "the index format",
}


def vector_identity(cfg: EmbedConfig, weights: bytes) -> dict[str, Any]:
    """Everything the vectors depend on, as plain JSON-able data.

    ``model.checkpoint`` and ``model.weights`` are left out: the weights' hash already says
    whether the model is the same, wherever it came from. Decode settings that change
    pixels appear only when they differ from the exact path, so jobs that never used them
    keep the identity they always had.
    """
    pre: dict[str, Any] = {"max_pixels": cfg.source.max_pixels, "precision": cfg.compute.precision}
    if cfg.compute.decode != "cpu":
        pre["decode"] = cfg.compute.decode
    if cfg.compute.jpeg_draft:
        pre["jpeg_draft"] = True
    return {
        "weights_sha256": weights_fingerprint(weights),
        # mae_loss only where set: outputs made before it existed compare as they did.
        "model": cfg.model.model_dump(
            mode="json",
            include={"name", "kwargs", "extractor"}
            | ({"mae_loss"} if cfg.model.mae_loss is not None else set()),
        ),
        # dense and shift only where set: vectors made before they existed compare as they did.
        "features": [
            f.model_dump(
                mode="json",
                exclude=(set() if f.dense else {"dense", "shift"})
                | (set() if f.pca else {"pca", "pca_sample"}),
            )
            for f in cfg.features
        ],
        "preprocessing": pre,
        # `within` (a split folder read as part of its dataset) changes ids, labels and the
        # split; it appears only where set, so other jobs keep the identity they had.
        "labels": cfg.source.model_dump(
            mode="json",
            include={"labels", "split", "within"} if cfg.source.within else {"labels", "split"},
        ),
    }


def fingerprint(data: dict[str, Any]) -> str:
    """sha256 of a JSON-able identity (key order does not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Name what differs between two identities, e.g. ``the feature spec (added: cls)``."""
    parts = []
    for key, what in PARTS.items():
        if old.get(key) == new.get(key):
            continue
        if key == "features":
            was = {f["name"]: f for f in old.get(key) or []}
            now = {f["name"]: f for f in new.get(key) or []}
            detail = [
                f"{verb}: {', '.join(names)}"
                for verb, names in (
                    ("added", [n for n in now if n not in was]),
                    ("removed", [n for n in was if n not in now]),
                    ("changed", [n for n in now if n in was and now[n] != was[n]]),
                )
                if names
            ]
            what += f" ({'; '.join(detail)})" if detail else " (order)"
        parts.append(what)
    return ", ".join(parts) or "the job"
