"""Listing a source: every image file under a folder or fsspec URL, with label and split.

The listing is the job's ledger: each listed file comes out as exactly one row (``ok`` or
``error``), so it is computed once, on the driver, before any work starts.

A local folder is walked with raw (bytes) names, so a name that is not UTF-8, a symlink
leading out of the folder or a broken one is a listed file like any other: it becomes an
error row with the reason, decided here and never read (``columns.LIST_ERROR``).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.errors import ConfigError
from vitflow.localwalk import (  # noqa: F401 - the messages are part of this module's API
    BROKEN_LINK,
    OUTSIDE_LINK,
    FoundFile,
    LocalWalk,
    relpath_text,
)
from vitflow.storage import is_local, open_fs, protocol_of

log = logging.getLogger(__name__)

SPLIT_NAMES = frozenset({"train", "validation", "val", "test"})


def image_id(relpath: str | bytes) -> str:
    """Stable id of an image: 16 hex chars of BLAKE2b over its path relative to the source root.

    Relative, so the same corpus copied to another bucket or machine keeps its ids. A text
    path is hashed as UTF-8; a name that is not UTF-8 is passed as its raw bytes, which no
    UTF-8 name encodes to, so its id is stable and distinct.
    """
    raw = relpath if isinstance(relpath, bytes) else relpath.encode("utf-8")
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


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
    Folders the walk did not enter are counted too, since their files cannot be.
    """

    # Not listed because their extension is not in source.extensions; per lower-cased
    # extension ("" for a file name without one), most common first.
    by_extension: dict[str, int] = field(default_factory=dict)
    # Hidden: the file or a folder on its path (below the root) starts with ".".
    hidden: int = 0
    # Folder symlinks not walked because source.follow_symlinks is false.
    symlinked_folders: int = 0
    # Folder symlinks (followed) that lead back into a folder already on the walk's path.
    symlink_loops: int = 0
    # Folders that could not be read (permission denied, removed during the walk).
    unreadable_folders: int = 0

    @property
    def total(self) -> int:
        """Every file left out, hidden ones included (the uncounted folders are not files)."""
        return sum(self.by_extension.values()) + self.hidden

    def describe(self) -> str:
        """For a summary line after ``skipped:``, e.g. ``3 (.txt 2, .psd 1), hidden: 1``, then
        any folders not walked: ``, symlinked folders: 1 (set source.follow_symlinks: ...)``."""
        n = sum(self.by_extension.values())
        detail = f" ({format_counts(self.by_extension)})" if n else ""
        text = f"{n}{detail}, hidden: {self.hidden}"
        if self.symlinked_folders:
            text += (
                f", symlinked folders: {self.symlinked_folders} "
                "(set source.follow_symlinks: true to walk them)"
            )
        if self.symlink_loops:
            text += (
                f", symlink loops: {self.symlink_loops} "
                "(not entered: each leads back to a folder above it)"
            )
        if self.unreadable_folders:
            text += f", unreadable folders: {self.unreadable_folders} (check their permissions)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest: ``{"by_extension": {".txt": 2}, "hidden": 1}``,
        plus ``symlinked_folders``, ``symlink_loops``, ``unreadable_folders`` when not 0."""
        out: dict[str, Any] = {"by_extension": dict(self.by_extension), "hidden": self.hidden}
        for key in ("symlinked_folders", "symlink_loops", "unreadable_folders"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


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

    @property
    def local_root(self) -> str | None:
        """The source folder when it is on local disk (reads check links against it)."""
        return self.root if self.protocol in ("file", "local") else None


def list_images(cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> Listing:
    """List the images under ``cfg.uri`` (recursively), sorted by path.

    Hidden files and folders (``.name``) are skipped, and so are files whose name does not
    end in one of ``cfg.extensions``; both are counted in ``Listing.skipped``, so no file
    under the root goes unaccounted for. Columns: ``id``, ``path`` (full path or URL),
    ``relpath``, ``label``, ``split``, ``size``, ``mtime`` and the internal
    ``columns.LIST_ERROR``.

    In a local folder, a file that must not or cannot be read is listed with its reason in
    ``LIST_ERROR`` (it becomes an error row): a name that is not UTF-8 (shown with
    backslash escapes, id from the raw bytes), a symlink leading outside the folder (unless
    ``cfg.follow_symlinks``), a broken symlink, a pipe or device. Folder symlinks are walked
    only with ``cfg.follow_symlinks``, otherwise counted in ``Listing.skipped``.

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


LISTING_SCHEMA = pa.schema(
    [
        (columns.ID, pa.string()),
        (columns.PATH, pa.string()),
        ("relpath", pa.string()),
        (columns.LABEL, pa.string()),
        (columns.SPLIT, pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.string()),
        (columns.LIST_ERROR, pa.string()),
    ]
)


def _list(fs, root: str, cfg: SourceConfig) -> Listing:
    if not fs.exists(root):
        raise ConfigError(f"source {cfg.uri!r} does not exist; fix source.uri")
    if not fs.isdir(root):
        raise ConfigError(f"source {cfg.uri!r} is a file; source.uri must be a folder or prefix")
    root = root.rstrip("/")
    protocol = protocol_of(fs)
    folders: Counter[str] = Counter()
    if is_local(fs):
        walk = LocalWalk(root, cfg.follow_symlinks)
        found, folders = walk.run(), walk.folders
    else:  # object stores: no symlinks, and keys are UTF-8 text
        found = []
        for path, info in fs.find(root, withdirs=False, detail=True).items():
            rel = path[len(root) :].lstrip("/")
            size = int(info.get("size") or 0)
            found.append(
                FoundFile(rel.encode("utf-8"), size, _mtime(info), None, f"{protocol}://{path}")
            )
    rows = []
    listed: Counter[str] = Counter()
    unlisted: Counter[str] = Counter()
    hidden = 0
    for f in sorted(found, key=lambda f: f.rel):  # byte order = code point order of UTF-8
        rel, name_error = relpath_text(f.rel)
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
                columns.ID: image_id(f.rel),
                columns.PATH: f.path or f"{root}/{rel}",
                "relpath": rel,
                columns.LABEL: label,
                columns.SPLIT: split,
                "size": f.size,
                "mtime": f.mtime,
                # A link leaving the source outranks its name: renaming would not make it readable.
                columns.LIST_ERROR: f.error or name_error or _too_big(f.size, cfg),
            }
        )
    skipped = SkippedFiles(by_extension=_by_count(unlisted), hidden=hidden, **folders)
    if not rows:
        raise ConfigError(_nothing_listed(cfg, skipped))
    refused = Counter(r[columns.LIST_ERROR].split(" (")[0] for r in rows if r[columns.LIST_ERROR])
    if refused:
        log.warning(
            "%d listed file(s) become error rows without being read: %s",
            sum(refused.values()),
            ", ".join(f"{reason} {n}" for reason, n in refused.most_common()),
        )
    return Listing(
        root=root,
        protocol=protocol,
        table=pa.Table.from_pylist(rows, schema=LISTING_SCHEMA),
        by_extension=_by_count(listed),
        skipped=skipped,
    )


# --- local folders: raw names, symlinks, special files ------------------------------------


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
    if skipped.symlinked_folders:
        n = skipped.symlinked_folders
        parts.append(
            f"{n} folder symlink{' not' if n == 1 else 's not'} walked; set "
            "source.follow_symlinks: true to walk them"
        )
    if skipped.unreadable_folders:
        parts.append(f"{skipped.unreadable_folders} folder(s) could not be read (permissions?)")
    parts.append("check source.uri and source.extensions")
    return "; ".join(parts)


def _too_big(size: int, cfg: SourceConfig) -> str | None:
    if size <= cfg.max_file_bytes:
        return None
    return (
        f"file is {size} bytes, more than source.max_file_bytes={cfg.max_file_bytes}; not read "
        "(raise the limit to embed it)"
    )


def _mtime(info: dict[str, Any]) -> str | None:
    # Local: float seconds; S3: LastModified datetime or an ETag. Kept as text, for change checks.
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None
