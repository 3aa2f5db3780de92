"""Walking a local source folder: every file once, with the rules for what must not be read.

Local folders are walked on raw byte names (``os.scandir`` on bytes), so a name that is not
valid UTF-8 is found like any other and becomes an error row instead of failing the listing.
Symlinks that leave the source root, broken links, link loops and special files (pipes,
devices) are found but marked with the reason they must not be read; symlinked folders are
walked only when ``source.follow_symlinks`` says so, with loops cut.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from vitflow.errors import ConfigError


@dataclass(frozen=True)
class FoundFile:
    """A file under the source as the walk found it, before the listing's rules apply."""

    rel: bytes  # path relative to the root, raw bytes ("/"-separated)
    size: int
    mtime: str | None
    error: str | None = None  # why it must not be read (set by the local walk)
    path: str | None = None  # full URL of a remote file; local paths are root + rel


OUTSIDE_LINK = (
    "symlink outside the source (target not shown); not read: copy the file into the "
    "source, or set source.follow_symlinks: true to follow links that leave it"
)
BROKEN_LINK = "broken symlink (its target does not exist; target not shown)"
_SPECIAL = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def relpath_text(rel: bytes) -> tuple[str, str | None]:
    """``(text, error)``: the relative path as text; a name that is not UTF-8 is shown with
    its undecodable bytes backslash-escaped (``caf\\xe9.jpg``), and ``error`` says why and
    how to fix it."""
    try:
        return rel.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    parts = rel.split(b"/")
    i = next(i for i, p in enumerate(parts) if not _is_utf8(p))
    what = "file name" if i == len(parts) - 1 else "folder name"
    return rel.decode("utf-8", errors="backslashreplace"), (
        f"{what} is not valid UTF-8 (raw bytes {parts[i]!r}); rename it to UTF-8, "
        "e.g. with convmv -f latin1 -t utf8, to embed it"
    )


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LocalWalk:
    """Every non-folder entry under a local ``root``, walked with bytes names (no decoding).

    Folder symlinks are entered only when ``follow``; a folder whose (device, inode) is
    already on the walk's path is a loop and is not entered again. ``folders`` counts the
    folders not entered, by :class:`SkippedFiles` field name.
    """

    def __init__(self, root: str, follow: bool):
        self.top = os.fsencode(root or "/")
        if not _is_utf8(self.top):
            raise ConfigError(
                f"source {root!r} is not a valid UTF-8 path; rename the folder or point "
                "source.uri at one with a UTF-8 name"
            )
        self.real_top = os.path.realpath(self.top).rstrip(b"/") + b"/"
        self.follow = follow
        self.found: list[FoundFile] = []
        self.folders: Counter[str] = Counter()
        st = os.stat(self.top)
        # (relative folder, (device, inode) of each folder from the root down to it)
        self.stack: list[tuple[bytes, tuple[tuple[int, int], ...]]] = [
            (b"", ((st.st_dev, st.st_ino),))
        ]

    def run(self) -> Iterator[FoundFile]:
        """The files, a folder at a time (in no particular order): only one folder's entries
        are held at once."""
        while self.stack:
            rel_dir, chain = self.stack.pop()
            try:
                with os.scandir(self.top + b"/" + rel_dir if rel_dir else self.top) as it:
                    entries = list(it)
            except OSError:
                if not rel_dir:
                    raise  # the root itself: list_images reports it
                self.folders["unreadable_folders"] += 1
                continue
            for entry in entries:
                rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
                try:
                    own = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since its folder was read: no longer under the source
                if stat.S_ISDIR(own.st_mode):
                    self._enter(rel, chain, own)
                elif stat.S_ISLNK(own.st_mode):
                    self._link(entry, rel, own, chain)
                else:
                    self.found.append(_file(rel, own))
            yield from self.found
            self.found.clear()

    def _link(self, entry: os.DirEntry, rel: bytes, own: os.stat_result, chain) -> None:
        """A symlink: stat its target (never open it), then list, enter or count it."""
        try:
            target = os.stat(entry.path)  # follows the link
        except FileNotFoundError:
            self.found.append(FoundFile(rel, 0, str(own.st_mtime), BROKEN_LINK))
            return
        except OSError as e:  # a loop of links, a target we may not see
            reason = f"symlink cannot be followed ({e.strerror}; target not shown)"
            self.found.append(FoundFile(rel, 0, str(own.st_mtime), reason))
            return
        if stat.S_ISDIR(target.st_mode):
            if self.follow:
                self._enter(rel, chain, target)
            else:
                self.folders["symlinked_folders"] += 1
        elif self.follow or os.path.realpath(entry.path).startswith(self.real_top):
            self.found.append(_file(rel, target))
        else:
            # Size and time of the link itself: nothing about the target reaches the output.
            self.found.append(FoundFile(rel, 0, str(own.st_mtime), OUTSIDE_LINK))

    def _enter(self, rel: bytes, chain, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in chain:
            self.folders["symlink_loops"] += 1
        else:
            self.stack.append((rel, (*chain, key)))


def _file(rel: bytes, st: os.stat_result) -> FoundFile:
    if stat.S_ISREG(st.st_mode):
        return FoundFile(rel, int(st.st_size), str(st.st_mtime))
    kind = _SPECIAL.get(stat.S_IFMT(st.st_mode), "an entry of another kind")
    reason = f"not a regular file ({kind}); only regular files are read"
    return FoundFile(rel, 0, str(st.st_mtime), reason)
