"""Listing a source: every image file under a folder or fsspec URL, with label and split.

The listing is the job's ledger: each listed file comes out as exactly one row (``ok`` or
``error``), so it is computed once, on the driver, before any work starts.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.errors import ConfigError
from vitflow.storage import open_fs, protocol_of

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


def file_extension(relpath: str) -> str:
    """The lower-cased extension of a path's file name, dot included (``.jpg``); ``""`` if none."""
    return posixpath.splitext(relpath)[1].lower()


def format_counts(counts: Mapping[str, int]) -> str:
    """``.txt 2, .psd 1``: counts per extension for a summary line (``""`` reads as no extension)."""
    return ", ".join(f"{ext or 'no extension'} {n}" for ext, n in counts.items())


def _by_count(counter: Counter[str]) -> dict[str, int]:
    # Most common first, then by name, no extension last: the order a summary line shows.
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0] == "", kv[0])))


@dataclass(frozen=True)
class SkippedFiles:
    """Files under a source that the listing leaves out, counted by why.

    A file is never dropped silently: it is either listed (and becomes a row) or counted here.
    """

    # Not listed because their extension is not in source.extensions; per lower-cased
    # extension ("" for a file name without one), most common first.
    by_extension: dict[str, int] = field(default_factory=dict)
    # Hidden: the file or a folder on its path (below the root) starts with ".".
    hidden: int = 0

    @property
    def total(self) -> int:
        """Every file left out, hidden ones included."""
        return sum(self.by_extension.values()) + self.hidden

    def describe(self) -> str:
        """For a summary line after ``skipped:``, e.g. ``3 (.txt 2, .psd 1), hidden: 1``."""
        n = sum(self.by_extension.values())
        detail = f" ({format_counts(self.by_extension)})" if n else ""
        return f"{n}{detail}, hidden: {self.hidden}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest: ``{"by_extension": {".txt": 2}, "hidden": 1}``."""
        return {"by_extension": dict(self.by_extension), "hidden": self.hidden}


@dataclass(frozen=True)
class Listing:
    """The files of a source: an arrow table with one row per image (see :func:`list_images`)."""

    root: str
    protocol: str
    table: pa.Table
    # Listed files per lower-cased extension, most common first (sums to len(self)).
    by_extension: dict[str, int] = field(default_factory=dict)
    # Files under the root that are not listed, and why.
    skipped: SkippedFiles = field(default_factory=SkippedFiles)

    def __len__(self) -> int:
        return self.table.num_rows


def list_images(cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> Listing:
    """List the images under ``cfg.uri`` (recursively), sorted by path.

    Hidden files and folders (``.name``) are skipped, and so are files whose name does not
    end in one of ``cfg.extensions``; both are counted in ``Listing.skipped``, so no file
    under the root goes unaccounted for. Columns: ``id``, ``path`` (full path or URL),
    ``relpath``, ``label``, ``split``, ``size``, ``mtime``.

    Example:
        >>> listing = list_images(SourceConfig(uri="./images"))  # doctest: +SKIP
        >>> listing.by_extension, listing.skipped.describe()  # doctest: +SKIP
        ({'.jpg': 40, '.heic': 13}, '3 (.txt 2, .psd 1), hidden: 1')
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
    protocol = protocol_of(fs)
    rows = []
    listed: Counter[str] = Counter()
    unlisted: Counter[str] = Counter()
    hidden = 0
    for path, info in sorted(fs.find(root, withdirs=False, detail=True).items()):
        rel = posixpath.relpath(path, root) if protocol == "file" else path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            hidden += 1
            continue
        if not rel.lower().endswith(cfg.extensions):
            unlisted[file_extension(rel)] += 1
            continue
        listed[file_extension(rel)] += 1
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
    skipped = SkippedFiles(by_extension=_by_count(unlisted), hidden=hidden)
    if not rows:
        raise ConfigError(_nothing_listed(cfg, skipped))
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
    return Listing(
        root=root,
        protocol=protocol,
        table=pa.Table.from_pylist(rows, schema=schema),
        by_extension=_by_count(listed),
        skipped=skipped,
    )


def _nothing_listed(cfg: SourceConfig, skipped: SkippedFiles, shown: int = 5) -> str:
    """The "no images found" message, saying what was there instead."""
    parts = [f"no images found under {cfg.uri!r} (looked for {', '.join(cfg.extensions)})"]
    if skipped.by_extension:
        items = list(skipped.by_extension.items())
        found = ", ".join(
            f"{n} {ext or 'extension-less'} file{'' if n == 1 else 's'}" for ext, n in items[:shown]
        )
        if len(items) > shown:
            found += f" and {sum(n for _, n in items[shown:])} more files"
        parts.append(
            f"found {found}; add their extension to source.extensions if Pillow can read them"
        )
    if skipped.hidden:
        parts.append(
            f"skipped {skipped.hidden} hidden file{'' if skipped.hidden == 1 else 's'} "
            "(a name or folder starting with '.')"
        )
    parts.append("check source.uri and source.extensions")
    return "; ".join(parts)


def _mtime(info: dict[str, Any]) -> str | None:
    # Local: float seconds; S3: LastModified datetime or an ETag. Kept as text, for change checks.
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None
