"""One run at a time per output: a lock file that names its owner.

A second ``vitflow embed`` (or ``--resume``) on an output that another run is still writing
would interleave staged pieces and delete the first run's temporary files; two reindex
runs would race for one commit. So a run takes ``OUT/_vitflow.lock`` before it writes
anything, and the lock says who holds it: user, host, pid, command, start time and, on
object stores, a heartbeat.

- **Local disk** (and NFS with working ``flock``): the kernel's ``flock`` on the lock file is
  the lock, so a run that is killed — even with SIGKILL — releases it at once and a stale
  lock cannot exist. The JSON inside is only for the message.
- **S3-compatible stores**: the lock object is created with a conditional put
  (``If-None-Match: *``), so exactly one of two runs gets it. Its holder rewrites it every
  ``heartbeat_s`` seconds (``If-Match`` its own ETag). A lock whose heartbeat is older than
  ``stale_s`` belonged to a run that died; it is taken over with a conditional overwrite on
  the ETag that was judged stale, so two runs cannot both take it over.
- Other fsspec stores have no conditional write: the lock is written after an existence
  check, which stops a careless second run but not a simultaneous one (logged).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from vitflow.errors import OutputLocked
from vitflow.storage import is_local, protocol_of

log = logging.getLogger(__name__)

LOCK_NAME = "_vitflow.lock"
_HELD: dict[tuple[str, str], RunLock] = {}  # locks this process holds: re-entrant
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: the holder is gone


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """Exclusive hold of an output folder for one run; use as a context manager.

    Args:
        fs: fsspec filesystem of the folder.
        folder: the output folder (or index) path on ``fs``.
        command: what the run does, for the message another run prints (``embed``, ...).
        uri: the folder as the user wrote it, for messages.
    """

    def __init__(
        self,
        fs,
        folder: str,
        *,
        command: str,
        uri: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
    ):
        self.fs, self.folder = fs, folder.rstrip("/")
        self.path = posixpath.join(self.folder, LOCK_NAME)
        self.uri = uri or folder
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.started = _now()
        self.info: dict[str, Any] = {
            "run_id": uuid.uuid4().hex,
            "command": command,
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()),
            "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(),
            "heartbeat_s": heartbeat_s,
            "started": _iso(self.started),
        }
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outer: RunLock | None = None
        self._depth = 0
        self._made_folder = False
        self.lost: str | None = None

    # -- public ---------------------------------------------------------------------------

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = (protocol_of(self.fs), self.path)
        holder = _HELD.get(key)
        if holder is not None:  # this process holds it already (the CLI around run_embed)
            holder._depth += 1
            self._outer = holder
            return
        self._outer = None
        self._depth = 1
        _HELD[key] = self
        try:
            self._acquire()
        except BaseException:
            _HELD.pop(key, None)
            raise

    def _acquire(self) -> None:
        if is_local(self.fs):
            self._acquire_local()
        elif protocol_of(self.fs) in ("s3", "s3a"):
            self._acquire_conditional()
            self._thread = threading.Thread(target=self._beat, daemon=True, name="vitflow-lock")
            self._thread.start()
        else:
            self._acquire_best_effort()

    def release(self) -> None:
        if self._outer is not None:
            self._outer._depth -= 1
            return
        self._depth -= 1
        if self._depth > 0:
            return
        _HELD.pop((protocol_of(self.fs), self.path), None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self._fd is not None:
                import fcntl

                os.unlink(self.path)  # while still held: nobody can lock the old inode after
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
                if self._made_folder and not os.listdir(self.folder):
                    os.rmdir(self.folder)  # a run that stopped before writing leaves nothing
            elif self._etag is not None:
                self.fs.invalidate_cache(self.path)
                current = _read_json(lambda: self.fs.cat_file(self.path))
                # Never delete a lock another run took over while this one stalled.
                if current.get("run_id") == self.info["run_id"]:
                    self.fs.rm_file(self.path)
                else:
                    log.warning("the lock of %s was taken over by another run", self.uri)
        except FileNotFoundError:
            pass
        except Exception as e:  # a lock left behind is taken over later; never fail a run here
            log.warning("could not remove the lock %s: %s", self.path, e)

    # -- local: flock ---------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        self._made_folder = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
            except PermissionError as e:
                raise OutputLocked(
                    f"cannot open the lock file {self.path} ({e.strerror}): a run by another "
                    "user left it in a folder you share; remove it if no run is writing there"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if not isinstance(e, BlockingIOError):
                    os.close(fd)
                    raise OutputLocked(
                        f"cannot lock {self.path} ({e.strerror}): this filesystem has no working "
                        "file locks (an NFS mount without lockd?); write the output elsewhere"
                    ) from None
                holder = _read_json(lambda fd=fd: os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise OutputLocked(self._held_message(holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder unlinked while we waited for it
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.info).encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise OutputLocked(f"could not take the lock {self.path}: it changed hands repeatedly")

    # -- object stores: conditional puts ----------------------------------------------------

    def _payload(self) -> bytes:
        return json.dumps({**self.info, "heartbeat": _iso(_now())}).encode()

    def _acquire_conditional(self) -> None:
        try:
            self._create()
        except FileExistsError:
            self._take_over_if_stale()
        self._etag = self._current_etag()

    def _create(self) -> None:
        """Create the lock object only if there is none (``If-None-Match: *``)."""
        try:
            self.fs.pipe_file(self.path, self._payload(), mode="create")
        except FileExistsError:
            raise
        except OSError as e:
            # Some stores answer a lost race with 412 without the condition header, or 409.
            if self.fs.exists(self.path):
                raise FileExistsError(str(e)) from e
            raise

    def _take_over_if_stale(self) -> None:
        """Take over a lock whose holder stopped beating, judged without trusting clocks:
        its heartbeat looks old here (or its holder ran on this host and is gone), *and* the
        lock object does not change for two heartbeat periods while we watch it."""
        info, holder = self._peek()
        if info is None:  # released meanwhile: try once more from the start
            self._create()
            return
        beat = holder.get("heartbeat") or holder.get("started")
        age = _now() - _parse_iso(beat) if beat else float("inf")
        if age <= self.stale_s and not _died_here(holder):
            raise OutputLocked(self._held_message(holder, age))
        watch = 2 * float(holder.get("heartbeat_s") or self.heartbeat_s) + 5
        log.warning(
            "%s has a lock that looks stale (%s); watching it %.0f s before taking it over",
            self.uri,
            _describe(holder),
            watch,
        )
        time.sleep(watch)
        again, holder = self._peek()
        if again is None:
            self._create()
            return
        if again.get("ETag") != info.get("ETag"):
            raise OutputLocked(self._held_message(holder))  # it is alive after all
        try:
            self.fs.pipe_file(self.path, self._payload(), IfMatch=again["ETag"])
        except OSError as e:
            raise OutputLocked(
                f"{self.uri!r}: a stale lock was being taken over by another run at the same "
                f"time ({e}); rerun in a moment"
            ) from e
        log.warning("took over the lock of %s from %s", self.uri, _describe(holder))

    def _peek(self) -> tuple[dict | None, dict[str, Any]]:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path), _read_json(lambda: self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None, {}

    def _current_etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        return self.fs.info(self.path).get("ETag")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.fs.pipe_file(self.path, self._payload(), IfMatch=self._etag)
                self._etag = self._current_etag()
            except Exception as e:
                try:
                    info, holder = self._peek()
                except Exception:  # the store is away: nothing to learn about the holder now
                    info, holder = None, {}
                if holder.get("run_id") not in (None, self.info["run_id"]):
                    self.lost = f"taken over by {_describe(holder)}"
                    log.error("the lock of %s was %s", self.uri, self.lost)
                    return
                if info is not None and holder.get("run_id") == self.info["run_id"]:
                    # Still ours: a write that landed before its answer was lost, or an ETag
                    # read that failed after it, left a stale ETag; take the current one so
                    # the next beat's conditional write matches again.
                    self._etag = info.get("ETag")
                # A passing outage: the run goes on, and beats again when the store is back.
                log.warning("lock heartbeat for %s failed: %s", self.uri, e)

    def check(self) -> None:
        """Raise :class:`OutputLocked` when this run no longer holds its lock; callers check
        before every step that deletes or finalises (another run may be writing now)."""
        if self._outer is not None:
            self._outer.check()
            return
        if self.lost:
            raise OutputLocked(
                f"the lock on {self.uri!r} was {self.lost} (this run's heartbeat had stopped); "
                "this run stopped without changing the output further"
            )

    # -- anything else ----------------------------------------------------------------------

    def _acquire_best_effort(self) -> None:
        if self.fs.exists(self.path):
            raise OutputLocked(self._held_message(_read_json(lambda: self.fs.cat_file(self.path))))
        log.warning(
            "%s has no conditional writes: the lock on %s stops a second run, not a simultaneous one",
            protocol_of(self.fs),
            self.uri,
        )
        self.fs.pipe_file(self.path, self._payload())
        self._etag = "written"

    def _held_message(self, holder: dict[str, Any], age: float | None = None) -> str:
        seen = f", last heartbeat {age:.0f} s ago" if age is not None else ""
        return (
            f"{self.uri!r} is being written by another vitflow run ({_describe(holder)}{seen}); "
            "wait for it to finish, or stop it first. A run that was killed releases the lock "
            + (
                "at once"
                if is_local(self.fs)
                else f"once its heartbeat is {self.stale_s:.0f} s old"
            )
        )


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "owner unknown"
    return (
        f"{holder.get('command', '?')} by {holder.get('user', '?')} on {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    )


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a live holder
    from a new process that was given the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _died_here(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder ran on this machine, in this pid namespace, since this boot,
    and is no longer running (a run that died in an outage could not remove its lock).
    Containers that share a host name but not a pid namespace never match."""
    same_place = (
        holder.get("host") == socket.gethostname()
        and holder.get("boot_id") is not None
        and holder.get("boot_id") == _boot_id()
        and holder.get("pid_namespace") is not None
        and holder.get("pid_namespace") == _pid_namespace()
    )
    if not same_place or not isinstance(holder.get("pid"), int):
        return False
    started = _process_start(holder["pid"])
    if started is None:
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return holder.get("pid_started") not in (None, started)


def _read_json(read) -> dict[str, Any]:
    try:
        data = json.loads(read() or b"{}")
        return data if isinstance(data, dict) else {}
    except Exception:
        return {}


def _parse_iso(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
