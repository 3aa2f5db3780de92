"""Retrying storage operations, and telling a passing fault from a lasting one.

Three kinds of failure, three answers:

- the store is *unreachable* (connection refused, dropped or reset, timeouts): wait and retry with exponential backoff for up to ``storage.retry_seconds``; past that the
  run stops in one sentence (:class:`~vitflow.errors.StorageUnavailable`) with its finished
  work kept, so ``--resume`` continues once the store is back;
- the disk is *full*: retrying cannot help; stop at once, naming the path
  (:class:`~vitflow.errors.DiskFull`);
- the request is *wrong* (missing file, no permission, bad arguments): fail at once.

Torch-free and Ray-free: the part writer, decode actors and the driver all use it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from vitflow.errors import DiskFull, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 120.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 15.0

_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
)
_OUTAGE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
}
_OUTAGE_NAMES = (
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    return any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in _chain(e))


def is_outage(e: BaseException) -> bool:
    """Whether ``e`` says the store could not be reached (as opposed to a bad request)."""
    for x in _chain(e):
        if isinstance(x, ConnectionError | TimeoutError):
            return True
        if isinstance(x, OSError) and x.errno in _OUTAGE_ERRNOS:
            return True
        if type(x).__name__ in _OUTAGE_NAMES:
            return True
    return False


def is_permanent(e: BaseException) -> bool:
    return isinstance(e, _PERMANENT) and not is_outage(e)


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    budget_s: float = DEFAULT_RETRY_SECONDS,
    first_backoff_s: float = FIRST_BACKOFF_S,
) -> T:
    """``fn()``, retried with exponential backoff while it fails for a reason another try can
    fix, for at most ``budget_s`` seconds.

    Args:
        fn: the operation (a write, a listing, a delete).
        what: what it does, for the message, e.g. ``"write s3://b/out/part-00001.parquet"``.
        budget_s: how long to keep trying in all.

    Raises:
        DiskFull: the device is full (not retried).
        StorageUnavailable: still failing when the budget ran out.
        Exception: ``fn``'s own error when it is permanent (missing file, no permission).
    """
    started = time.monotonic()
    delay = first_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:
            if is_disk_full(e):
                raise DiskFull(
                    f"disk full: no space left to {what}; free space there, then rerun with "
                    "--resume to finish the job (what was written so far is kept)"
                ) from e
            if is_permanent(e):
                raise
            elapsed = time.monotonic() - started
            if elapsed + delay > budget_s:
                raise StorageUnavailable(
                    f"could not {what}: {type(e).__name__}: {_first_line(e)} (still failing "
                    f"after {attempt} attempts over {elapsed:.0f} s, storage.retry_seconds="
                    f"{budget_s:g}); the job stopped with its finished work kept, rerun with "
                    "--resume once the store is reachable"
                ) from e
            log.warning("%s failed (%s), retrying in %.1f s", what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
