"""Where data lives: opening a URI, and telling whether two locations are the same place.

Torch-free and Ray-free on purpose: readers of vitflow's output import this module, and it
must stay as light as pyarrow and fsspec.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import uuid
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


def write_atomic(fs, path: str, data: bytes, *, retry_s: float | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never
    a part: locally through a temporary name in the same folder and a rename; on object
    stores with one PUT, which is atomic there. Retried as :func:`vitflow.retry.retrying`
    says, so a passing outage of the store does not fail the run."""
    from vitflow.retry import DEFAULT_RETRY_SECONDS, retrying

    budget = DEFAULT_RETRY_SECONDS if retry_s is None else retry_s
    if is_local(fs):
        folder, name = os.path.split(path)

        def put_local():
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f"_tmp-{uuid.uuid4().hex}-{name}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

        retrying(put_local, what=f"write {path}", budget_s=budget)
    else:
        retrying(lambda: fs.pipe_file(path, data), what=f"write {path}", budget_s=budget)
        fs.invalidate_cache(path)


def remove_file(fs, path: str, *, retry_s: float | None = None) -> None:
    """Delete one file; one that is already gone is fine (a retried or resumed step)."""
    from vitflow.retry import DEFAULT_RETRY_SECONDS, retrying

    def rm():
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retrying(
        rm, what=f"delete {path}", budget_s=DEFAULT_RETRY_SECONDS if retry_s is None else retry_s
    )
    if not is_local(fs):
        fs.invalidate_cache(path)


def list_names(fs, path: str) -> list[str]:
    """Paths directly under ``path``, fresh from the store (never a cached listing); [] when
    it does not exist (object stores have no empty folders)."""
    if not is_local(fs):
        fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


READ_ATTEMPTS = 4  # per file, for errors of that file (5xx on one key, throttling)
READ_BACKOFF_S = 0.5


@functools.lru_cache(maxsize=8)
def _filesystem(protocol: str, storage_options_json: str):
    return fsspec.filesystem(protocol, **json.loads(storage_options_json))


def read_bytes(
    path: str,
    storage_options: dict[str, Any] | None = None,
    *,
    attempts: int = READ_ATTEMPTS,
    backoff_s: float = READ_BACKOFF_S,
    retry_s: float | None = None,
) -> bytes:
    """Read a whole file from a local path or fsspec URL, retrying what another try can fix.

    - A missing or forbidden file fails at once.
    - A failure of this file (a 5xx or throttling answer for its key) is retried ``attempts``
      times with exponential backoff, then raised with the number of attempts: the caller
      makes it the file's error row.
    - A store that cannot be reached at all (connection refused or dropped, timeouts) is
      waited for up to ``retry_s`` seconds (``storage.retry_seconds``), then
      :class:`~vitflow.errors.StorageUnavailable` stops the job resumably: an outage must
      not turn every file read during it into an error row.
    """
    from vitflow.errors import StorageUnavailable
    from vitflow.retry import DEFAULT_RETRY_SECONDS, MAX_BACKOFF_S, is_outage, is_permanent

    budget = DEFAULT_RETRY_SECONDS if retry_s is None else retry_s
    started = time.monotonic()
    delay, failures = backoff_s, 0
    while True:
        try:
            if "://" not in path:
                with open(path, "rb") as f:
                    return f.read()
            protocol = path.split("://", 1)[0]
            fs = _filesystem(protocol, json.dumps(storage_options or {}, sort_keys=True))
            return fs.cat_file(path)
        except Exception as e:
            if is_permanent(e):
                raise
            elapsed = time.monotonic() - started
            if is_outage(e):
                if elapsed + delay > budget:
                    raise StorageUnavailable(
                        f"could not read {path}: {type(e).__name__}: {str(e)[:200]} (the store "
                        f"was unreachable for {elapsed:.0f} s, storage.retry_seconds={budget:g}); "
                        "the job stopped with its finished work kept, rerun with --resume once "
                        "the store is reachable"
                    ) from e
            else:
                failures += 1
                if failures >= attempts:
                    raise OSError(f"{type(e).__name__}: {e} (after {attempts} attempts)") from e
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
