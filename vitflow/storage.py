"""Where data lives: opening a URI, and telling whether two locations are the same place.

Torch-free and Ray-free on purpose: readers of vitflow's output import this module, and it
must stay as light as pyarrow and fsspec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec

from vitflow.errors import ConfigError


def open_fs(uri: str, storage_options: dict[str, Any] | None = None):
    """``(filesystem, path)`` for a local path or fsspec URL."""
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"cannot open {uri!r}: {e}; check the URL's protocol (e.g. s3://bucket/prefix) and "
            "that its fsspec package is installed"
        ) from e


def protocol_of(fs) -> str:
    """The filesystem's main protocol name (``file``, ``s3``, ...)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs) -> bool:
    return protocol_of(fs) in ("file", "local")


def arrow_fs(fs):
    """A pyarrow filesystem for an fsspec one (local stays native)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if is_local(fs):
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


@dataclass(frozen=True)
class Location:
    """A place resolved for comparison: local paths through ``realpath`` (``..``, relative
    paths and symlinked folders all become one spelling), object-store keys with their
    bucket and without empty or trailing ``/`` parts (``..`` is a literal key part there)."""

    store: str  # "local" or the object store's protocol family
    path: str

    def contains(self, other: Location) -> bool:
        """Whether ``other`` is this place or lies under it."""
        if self.store != other.store:
            return False
        if self.path in ("", "/"):
            return True
        return other.path == self.path or other.path.startswith(self.path.rstrip("/") + "/")


_FAMILIES = {"s3a": "s3", "gcs": "gs", "abfss": "abfs"}


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> Location:
    """The :class:`Location` ``uri`` points at (it need not exist yet)."""
    fs, path = open_fs(uri, storage_options)
    if is_local(fs):
        return Location("local", os.path.realpath(os.path.abspath(path)))
    family = _FAMILIES.get(protocol_of(fs), protocol_of(fs))
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return Location(family, "/".join(parts))


def overlap(a: str, b: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether one of two URIs is the same place as the other or lies inside it."""
    la, lb = resolve(a, storage_options), resolve(b, storage_options)
    return la.contains(lb) or lb.contains(la)
