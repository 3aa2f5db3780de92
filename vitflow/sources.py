"""Listing a source: every image file under a folder or fsspec URL, with label and split.

The listing is the job's ledger: each listed file comes out as exactly one row (``ok`` or
``error``), so it is computed once, on the driver, before any work starts.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.errors import ConfigError

SPLIT_NAMES = frozenset({"train", "validation", "val", "test"})


def image_id(relpath: str) -> str:
    """Stable id of an image: 16 hex chars of BLAKE2b over its path relative to the source root.

    Relative, so the same corpus copied to another bucket or machine keeps its ids.
    """
    return hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).hexdigest()


def label_and_split(relpath: str, labels: str, split: str | None) -> tuple[str | None, str | None]:
    """Derive ``(label, split)`` from a path relative to the source root.

    The split is the first folder named train/validation/val/test (when ``split='auto'``);
    the label is the nearest parent folder that is not that split folder (when
    ``labels='folder'``). A file directly in the root has no label.
    """
    folders = relpath.split("/")[:-1]
    found_split = None
    if split == "auto":
        found_split = next((p for p in folders if p.lower() in SPLIT_NAMES), None)
    label = None
    if labels == "folder":
        label = next((p for p in reversed(folders) if p != found_split), None)
    return label, found_split


@dataclass(frozen=True)
class Listing:
    """The files of a source: an arrow table with one row per image (see :func:`list_images`)."""

    root: str
    protocol: str
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows


def open_fs(uri: str, storage_options: dict[str, Any] | None = None):
    """``(filesystem, path)`` for a local path or fsspec URL."""
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open {uri!r}: {e}; check the URL's protocol (e.g. s3://bucket/prefix) and "
            "that its fsspec package is installed"
        ) from e


def list_images(cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> Listing:
    """List the images under ``cfg.uri`` (recursively), sorted by path.

    Hidden files and folders (``.name``) are skipped. Columns: ``id``, ``path`` (full path
    or URL), ``relpath``, ``label``, ``split``, ``size``, ``mtime``.
    """
    fs, root = open_fs(cfg.uri, storage_options)
    try:
        return _list(fs, root, cfg)
    except (OSError, PermissionError) as e:  # missing credentials, denied, unreachable
        raise ConfigError(
            f"cannot list source {cfg.uri!r}: {type(e).__name__}: {e}; check the credentials "
            "(AWS_ACCESS_KEY_ID/..., ~/.aws) and the storage: block"
        ) from e


def _list(fs, root: str, cfg: SourceConfig) -> Listing:
    if not fs.exists(root):
        raise ConfigError(f"source {cfg.uri!r} does not exist; fix source.uri")
    if not fs.isdir(root):
        raise ConfigError(f"source {cfg.uri!r} is a file; source.uri must be a folder or prefix")
    root = root.rstrip("/")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    rows = []
    for path, info in sorted(fs.find(root, withdirs=False, detail=True).items()):
        rel = posixpath.relpath(path, root) if protocol == "file" else path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if not rel.lower().endswith(cfg.extensions):
            continue
        label, split = label_and_split(rel, cfg.labels, cfg.split)
        rows.append(
            {
                columns.ID: image_id(rel),
                columns.PATH: path if protocol == "file" else f"{protocol}://{path}",
                "relpath": rel,
                columns.LABEL: label,
                columns.SPLIT: split,
                "size": int(info.get("size") or 0),
                "mtime": _mtime(info),
            }
        )
    if not rows:
        raise ConfigError(
            f"no images found under {cfg.uri!r} (looked for {', '.join(cfg.extensions)}); "
            "check source.uri and source.extensions"
        )
    schema = pa.schema(
        [
            (columns.ID, pa.string()),
            (columns.PATH, pa.string()),
            ("relpath", pa.string()),
            (columns.LABEL, pa.string()),
            (columns.SPLIT, pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.string()),
        ]
    )
    return Listing(root=root, protocol=protocol, table=pa.Table.from_pylist(rows, schema=schema))


def _mtime(info: dict[str, Any]) -> str | None:
    # Local: float seconds; S3: LastModified datetime or an ETag. Kept as text, for change checks.
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None
