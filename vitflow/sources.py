"""Listing a source: every image file under a folder or fsspec URL, with label and split.

The listing is the job's ledger: each listed file comes out as exactly one row (``ok`` or
``error``), so it is computed once, on the driver, before any work starts. It is kept on local
disk (:class:`~vitflow.ledger.Ledger`), sorted, and read back in pieces: the driver's memory
does not grow with the number of files listed.

A local folder is walked with raw (bytes) names, so a name that is not UTF-8, a symlink
leading out of the folder or a broken one is a listed file like any other: it becomes an
error row with the reason, decided here and never read (``columns.LIST_ERROR``).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vitflow import columns
from vitflow.config import SourceConfig
from vitflow.errors import ConfigError
from vitflow.ledger import Ledger, LedgerWriter, duckdb_session, have_duckdb, sql_path
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


def label_and_split(
    relpath: str, labels: str, split: str | None, within: str | None = None
) -> tuple[str | None, str | None]:
    """Derive ``(label, split)`` from a path relative to the source root.

    The split is the first folder named train/validation/val/test (when ``split='auto'``),
    or ``within`` when the source is read as that folder of a larger collection (then
    ``relpath`` starts with it); the label is the nearest parent folder that is not that split
    folder (when ``labels='folder'``). A file directly in the root has no label.
    """
    folders = relpath.split("/")[:-1]
    found_split = None
    if within is not None:
        found_split = within
    elif split == "auto":
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
    """The files of a source: a ledger with one row per image (see :func:`list_images`)."""

    root: str
    protocol: str
    ledger: Ledger
    # Listed files per lower-cased extension, most common first (sums to len(self)).
    by_extension: dict[str, int] = field(default_factory=dict)
    # Files under the root that are not listed, and why.
    skipped: SkippedFiles = field(default_factory=SkippedFiles)

    def __len__(self) -> int:
        return self.ledger.num_rows

    @property
    def table(self) -> pa.Table:
        """The whole listing in memory: for small listings (tests, training's file list)."""
        return self.ledger.read()

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


_RAW_NAME = "__raw_name"  # a local file's name as bytes: what a folder's ledger is sorted by
LIST_CHUNK = 65_536  # rows turned into Arrow at a time: no Python object outlives its chunk


class _Rows:
    """Listing rows gathered column by column and written to the ledger every
    :data:`LIST_CHUNK` rows, so the driver holds one chunk, not a Python dict per file.
    ``sort_by``: the rows do not arrive in order, and the ledger sorts them when it closes."""

    def __init__(self, sort_by: str | pa.Field | None = None):
        self.writer = LedgerWriter(LISTING_SCHEMA, sort_by=sort_by)
        self.schema = self.writer.written
        self.cols: dict[str, list] = {f.name: [] for f in self.schema}
        self.listed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def add(self, **row) -> None:
        for name, values in self.cols.items():
            values.append(row[name])
        if row[columns.LIST_ERROR]:
            self.refused[row[columns.LIST_ERROR].split(" (")[0]] += 1
        if len(self.cols[columns.ID]) >= LIST_CHUNK:
            self.flush()

    def add_batch(self, table: pa.Table) -> None:
        self.flush()
        if table.num_rows:
            self.writer.write(table)
            for reason in table.column(columns.LIST_ERROR).drop_null().to_pylist():
                self.refused[reason.split(" (")[0]] += 1

    def flush(self) -> None:
        if self.cols[columns.ID]:
            self.writer.write(pa.RecordBatch.from_pydict(self.cols, schema=self.schema))
            self.cols = {f.name: [] for f in self.schema}

    def ledger(self) -> Ledger:
        self.flush()
        return self.writer.close()


def _list(fs, root: str, cfg: SourceConfig) -> Listing:
    if fs.isfile(root) and root.lower().endswith(MANIFEST_SUFFIXES):
        return _list_manifest(fs, root, cfg)
    if not fs.exists(root):
        raise ConfigError(f"source {cfg.uri!r} does not exist; fix source.uri")
    if not fs.isdir(root):
        raise ConfigError(
            f"source {cfg.uri!r} is a file; source.uri must be a folder or prefix, or a list of "
            f"files ({', '.join(MANIFEST_SUFFIXES)})"
        )
    root = root.rstrip("/")
    protocol = protocol_of(fs)
    folders: Counter[str] = Counter()
    # Files stream into the ledger as they are found, and the ledger sorts them.
    local = is_local(fs)
    if local:
        walk = LocalWalk(root, cfg.follow_symlinks)
        found, folders = walk.run(), walk.folders
        # by the raw bytes of the name: names that are not UTF-8 sort too
        rows = _Rows(sort_by=pa.field(_RAW_NAME, pa.binary()))
    else:  # object stores: no symlinks, and keys are UTF-8 text
        found = _list_object_store(fs, root, protocol)
        rows = _Rows(sort_by="relpath")  # byte order = code point order of UTF-8
    unlisted: Counter[str] = Counter()
    hidden = 0
    for f in found:
        rel, name_error = relpath_text(f.rel)
        if any(part.startswith(".") for part in rel.split("/")):
            hidden += 1
            continue
        if not rel.lower().endswith(cfg.extensions):
            unlisted[file_extension(rel)] += 1
            continue
        rows.listed[file_extension(rel)] += 1
        # Read as the folder `within` of a larger collection: ids, labels and the split are
        # those a listing of that collection gives (the file is still read where it is).
        key, raw = (
            (f"{cfg.within}/{rel}", _within(cfg.within, f.rel)) if cfg.within else (rel, f.rel)
        )
        label, split = label_and_split(key, cfg.labels, cfg.split, cfg.within)
        rows.add(
            **{
                columns.ID: image_id(raw),
                columns.PATH: f.path or f"{root}/{rel}",
                "relpath": key,
                columns.LABEL: label,
                columns.SPLIT: split,
                "size": f.size,
                "mtime": f.mtime,
                # A link leaving the source outranks its name: renaming would not make it
                # readable.
                columns.LIST_ERROR: f.error or name_error or _too_big(f.size, cfg),
                **({_RAW_NAME: f.rel} if local else {}),
            }
        )
    del found
    skipped = SkippedFiles(by_extension=_by_count(unlisted), hidden=hidden, **folders)
    return _finish(rows, root, protocol, skipped, cfg)


def _within(prefix: str, rel: str | bytes) -> str | bytes:
    """``prefix/rel`` in ``rel``'s own type (a local name that is not UTF-8 stays bytes)."""
    return prefix.encode() + b"/" + rel if isinstance(rel, bytes) else f"{prefix}/{rel}"


def _finish(rows: _Rows, root: str, protocol: str, skipped, cfg: SourceConfig) -> Listing:
    ledger = rows.ledger()
    if not ledger.num_rows:
        raise ConfigError(_nothing_listed(cfg, skipped))
    if rows.refused:
        log.warning(
            "%d listed file(s) become error rows without being read: %s",
            sum(rows.refused.values()),
            ", ".join(f"{reason} {n}" for reason, n in rows.refused.most_common()),
        )
    return Listing(
        root=root,
        protocol=protocol,
        ledger=ledger,
        by_extension=_by_count(rows.listed),
        skipped=skipped,
    )


LIST_IN_FLIGHT = 16  # prefixes of an object store listed at once


def _list_object_store(fs, root: str, protocol: str) -> Iterator[FoundFile]:
    """Every object under ``root``, listed prefix by prefix with up to
    :data:`LIST_IN_FLIGHT` prefixes in flight (a flat listing of a big bucket is one request
    after another, 1,000 keys each). Yields each prefix's objects as soon as it is listed
    (the ledger sorts them), and drops them from the filesystem's listings cache: only the
    prefixes in flight are held, never the whole bucket's keys."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    fs.invalidate_cache(root)
    top = fs.ls(root, detail=True)
    fs.invalidate_cache(root)
    yield from (_found(root, protocol, e) for e in top if e.get("type") != "directory")
    prefixes = [e["name"] for e in top if e.get("type") == "directory"]
    del top

    def under(prefix: str) -> list[FoundFile]:
        try:
            infos = fs.find(prefix, withdirs=False, detail=True).values()
            return [_found(root, protocol, info) for info in infos]
        finally:
            fs.invalidate_cache(prefix)  # s3fs keeps every key it found otherwise

    pool = ThreadPoolExecutor(max_workers=LIST_IN_FLIGHT)
    try:
        pending: set = set()
        for prefix in prefixes:
            pending.add(pool.submit(under, prefix))
            if len(pending) >= LIST_IN_FLIGHT:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from future.result()
        for future in pending:
            yield from future.result()
    finally:  # an error or Ctrl-C: do not wait for the prefixes not started
        pool.shutdown(wait=False, cancel_futures=True)


def _found(root: str, protocol: str, info: dict[str, Any]) -> FoundFile:
    path = info["name"]
    rel = path[len(root) :].lstrip("/")
    return FoundFile(
        rel.encode("utf-8"), int(info.get("size") or 0), _mtime(info), None, f"{protocol}://{path}"
    )


# --- a list of files: parquet, CSV or text ---------------------------------------------------

MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt", ".lst")
_PATH_COLUMNS = ("path", "uri", "url", "key", "filename", "file")


def _list_manifest(fs, path: str, cfg: SourceConfig) -> Listing:
    """The files named in a list (an S3 Inventory export, a team's own parquet/CSV, or a text
    file of one path or URL per line), read in pieces.

    A parquet or CSV list needs a path column (one of ``path``, ``uri``, ``url``, ``key``,
    ``filename``, ``file``); ``label``, ``split``, ``size`` and ``mtime`` columns are used
    when present, else the label and split come from the path's folders as for a folder
    source. Relative paths are relative to the list's own folder. Ids are hashes of the
    path as written, so a list keeps its ids wherever it is read from. Nothing is checked
    for existence here: a file that is not there becomes an error row when it is read.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    base = posixpath.dirname(path)
    protocol = protocol_of(fs)
    # A list is read in its own order, but the ledger is sorted like a folder's.
    rows = _Rows(sort_by="relpath")
    unlisted: Counter[str] = Counter()
    with fs.open(path, "rb") as f:
        if path.lower().endswith(".parquet"):
            batches = pq.ParquetFile(f).iter_batches(batch_size=LIST_CHUNK)
        elif path.lower().endswith(".csv"):
            batches = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 22))
        else:
            batches = _text_lines(f)
        for batch in batches:
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            col = next((c for c in _PATH_COLUMNS if c in table.column_names), None)
            if col is None:
                raise ConfigError(
                    f"the list {cfg.uri!r} has no path column (columns: "
                    f"{', '.join(table.column_names[:10])}); name it one of "
                    f"{', '.join(_PATH_COLUMNS)}"
                )
            rows.add_batch(_manifest_batch(table, col, base, protocol, cfg, rows, unlisted))
    skipped = SkippedFiles(by_extension=_by_count(unlisted))
    listing = _finish(rows, base, protocol, skipped, cfg)
    where = _named_twice(listing.ledger)
    if where is not None:
        raise ConfigError(
            f"the list {cfg.uri!r} names {where!r} more than once; list each file once"
        )
    return listing


def _named_twice(ledger: Ledger) -> str | None:
    """A path the ledger lists more than once (found out of core: no set of every path)."""
    if not have_duckdb():  # a --no-deps install: in memory, as the sort was
        t = ledger.read([columns.ID, "relpath"])
        counts = t.group_by(columns.ID).aggregate([("relpath", "min"), (columns.ID, "count")])
        twice = counts.filter(pc.greater(counts[f"{columns.ID}_count"], 1))
        return twice["relpath_min"][0].as_py() if twice.num_rows else None
    con = duckdb_session(ledger.folder or ".")
    try:
        found = con.execute(
            f"SELECT min(relpath) FROM read_parquet({sql_path(ledger.path)}) "
            f'GROUP BY "{columns.ID}" HAVING count(*) > 1 LIMIT 1'
        ).fetchall()
    finally:
        con.close()
    return found[0][0] if found else None


def _extensions(paths) -> pa.ChunkedArray:
    """Each path's lower-cased extension (``.jpg``), null where it has none."""
    found = pc.extract_regex(pc.utf8_lower(paths), r"(?P<ext>\.[^./]*)$")
    return pc.struct_field(found, [0])


def _manifest_batch(
    table: pa.Table, col: str, base: str, protocol: str, cfg: SourceConfig, rows, unlisted
) -> pa.Table:
    """One piece of a list as listing rows: filtered and counted with Arrow kernels; only the
    id hash and the folder rules run per row, in tight loops over one piece."""
    written = pc.utf8_trim_whitespace(table.column(col).cast(pa.string()))
    keep = pc.and_(pc.is_valid(written), pc.greater(pc.utf8_length(written), 0))
    table, written = table.filter(keep), written.filter(keep)
    ext = _extensions(written)
    wanted = pc.fill_null(pc.is_in(ext, pa.array(cfg.extensions)), False)
    for vc in pc.value_counts(pc.fill_null(ext.filter(pc.invert(wanted)), "")).to_pylist():
        unlisted[vc["values"]] += vc["counts"]
    for vc in pc.value_counts(ext.filter(wanted)).to_pylist():
        rows.listed[vc["values"]] += vc["counts"]
    table, written = table.filter(wanted), written.filter(wanted)
    paths = written.to_pylist()
    names = table.column_names
    folder_rules = [label_and_split(p, cfg.labels, cfg.split, cfg.within) for p in paths]
    labels = (
        table["label"].cast(pa.string())
        if "label" in names and cfg.labels == "folder"
        else pa.array([lbl for lbl, _ in folder_rules], pa.string())
    )
    splits = (
        table["split"].cast(pa.string())
        if "split" in names and cfg.split == "auto" and cfg.within is None
        else pa.array([spl for _, spl in folder_rules], pa.string())
    )
    sizes = (
        pc.fill_null(table["size"].cast(pa.int64()), 0)
        if "size" in names
        else pa.array([0] * len(paths), pa.int64())
    )
    too_big = (
        [_too_big(n, cfg) for n in sizes.to_pylist()] if "size" in names else [None] * len(paths)
    )
    return pa.table(
        {
            # Read as one split of a dataset (`within`): ids unique across its lists.
            columns.ID: [image_id(f"{cfg.within}/{p}" if cfg.within else p) for p in paths],
            columns.PATH: [_resolve(p, base, protocol) for p in paths],
            "relpath": written,
            columns.LABEL: labels,
            columns.SPLIT: splits,
            "size": sizes,
            "mtime": table["mtime"].cast(pa.string())
            if "mtime" in names
            else pa.nulls(len(paths), pa.string()),
            columns.LIST_ERROR: pa.array(too_big, pa.string()),
        },
        schema=LISTING_SCHEMA,
    )


def _text_lines(f):
    text = f.read().decode("utf-8", errors="strict")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    for i in range(0, len(lines), LIST_CHUNK):
        yield pa.table({"path": lines[i : i + LIST_CHUNK]})


def _resolve(written: str, base: str, protocol: str) -> str:
    if "://" in written or written.startswith("/"):
        return written
    joined = posixpath.normpath(posixpath.join(base, written))
    return joined if protocol in ("file", "local") else f"{protocol}://{joined}"


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
