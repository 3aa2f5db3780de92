"""The decode stage of the embed job: read, decode and resize/crop a block of listed files.

Run by a pool of Ray Data decode actors (:class:`DecodeWorker`), in plain Python and testable
without Ray. It imports no
torch: a decode worker process starts in a fraction of a second and holds tens of MB, where
importing the model side (torch, timm, torchvision) would cost each one about 5 s of CPU and
0.9 GB. The model's resize/crop comes as a :class:`~vitflow.resize.ResizeCrop` built by the
driver (:meth:`vitflow.preprocess.Preprocessor.resize_spec`). A file that cannot be read,
decoded or preprocessed leaves this stage as a row with ``status='error'`` and the reason.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vitflow import columns
from vitflow.decode import DecodeError, decode_image, decoded_size
from vitflow.errors import StorageUnavailable
from vitflow.resize import ResizeCrop
from vitflow.storage import read_many


@functools.lru_cache(maxsize=4)
def resizer(spec: str) -> tuple[Callable[[Any], np.ndarray], tuple[int, int], Any]:
    """``(resize_crop, (height, width), draft_size)`` from a resize spec (JSON): a
    :class:`ResizeCrop`, or ``{"data_config": ...}`` for a transform without one, which runs
    timm's own objects (and so imports torch in this process)."""
    d = json.loads(spec)
    if "data_config" in d:
        from vitflow.preprocess import Preprocessor

        pre = Preprocessor(d["data_config"])
        return pre.resize_crop, tuple(pre.input_size[1:]), pre.draft_size
    rc = ResizeCrop.from_json(spec)
    return rc, rc.output, rc.draft_size


class DecodeTimeout(BaseException):
    """Raised by :func:`time_limit` when a file's decode runs past its budget. A
    BaseException, so the decoder's own ``except Exception`` handlers cannot swallow it."""


class TimeLimit:
    """Interrupt a ``with`` block after ``seconds`` of wall time, in whatever thread runs it.

    A timer raises :class:`DecodeTimeout` in this thread (``PyThreadState_SetAsyncExc``):
    Ray Data runs an actor's batches outside the main thread, where no ``SIGALRM`` can be
    set. Like a signal, the exception lands when the thread next runs Python bytecode; PIL
    decodes in C but returns to Python between chunks. An exception the timer sent but that
    has not landed when the block ends is cleared and raised by ``__exit__``, never later
    (a class, not a generator context manager, so there is no suspended generator for a
    late exception to strand). One short-lived timer thread per block: ~0.5 ms, against
    tens of ms of decode.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._done = self._fired = False
        self._timer: threading.Timer | None = None

    def __enter__(self) -> TimeLimit:
        if self.seconds:
            self._ident = threading.get_ident()
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self._fired = True
                _set_async_exc(ctypes.c_ulong(self._ident), ctypes.py_object(DecodeTimeout))

    def __exit__(self, *exc) -> bool:
        if self._timer is None:
            return False
        with self._lock:
            self._done = True
        self._timer.cancel()
        if self._fired:
            _set_async_exc(ctypes.c_ulong(self._ident), None)  # drop it if it has not landed
            raise DecodeTimeout()
        return False


time_limit = TimeLimit


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


class ReadBreaker:
    """Tells a bad file from a failing store by what the *next* files do.

    One file that cannot be read is an error row. :data:`BREAKER_READS` files in a row that
    fail the same way (expired credentials, an endpoint answering 5xx to everything) are the
    store failing, not the files: the job stops resumably instead of writing error rows for
    every file read while it lasts. A missing file is always that file's own problem, and
    so, on a local disk, is one this user may not read (a root-owned folder of photos is
    error rows, not a failing store; on S3 the same error means expired credentials).
    """

    BREAKER_READS = 8

    def __init__(self, local: bool = False):
        self.local = local
        self.kind: str | None = None
        self.count = 0

    def ok(self) -> None:
        self.kind, self.count = None, 0

    def failed(self, e: Exception) -> None:
        own = FileNotFoundError | IsADirectoryError | NotADirectoryError
        if isinstance(e, own) or (self.local and isinstance(e, PermissionError)):
            self.ok()
            return
        kind = type(e).__name__
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind = kind
        if self.count >= self.BREAKER_READS:
            raise StorageUnavailable(
                f"{self.count} files in a row could not be read ({kind}: {str(e)[:200]}): the "
                "store itself is failing (expired credentials, an endpoint answering errors), "
                "not the files; the job stopped with its finished work kept, fix it and rerun "
                "with --resume"
            ) from e


@functools.lru_cache(maxsize=4)
def _stats_actor(name: str):
    import ray

    return ray.get_actor(name)


def _report(stats_actor: str | None, **kw) -> None:
    if stats_actor:
        try:
            _stats_actor(stats_actor).add.remote(**kw)
        except Exception:  # counters are best effort; they never fail a batch
            pass


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    resize: str,
    max_pixels: int,
    storage_options: dict[str, Any] | None = None,
    decode_timeout_s: float | None = None,
    retry_s: float | None = None,
    max_file_bytes: int | None = None,
    source_root: str | None = None,
    follow_symlinks: bool = True,
    mode: str = "cpu",
    jpeg_draft: bool = False,
    read_in_flight: int = 16,
    stats_actor: str | None = None,
) -> dict[str, np.ndarray]:
    """Read, decode and resize/crop a block of listed files (a Ray Data ``map_batches`` UDF).

    Returns every input column (extra ones ride along to the sink's writer) plus
    ``status``, ``error``, ``width``, ``height`` and either ``uint8`` pixels ``(B, H, W, 3)``
    (zeros on error rows; ``mode="cpu"``) or the files' bytes for the model actor to decode
    (``mode="gpu"``). ``resize`` is the model's resize/crop as JSON
    (:meth:`vitflow.preprocess.Preprocessor.resize_spec`). The block's files are read with up
    to ``read_in_flight`` requests at once. A file whose decode and resize take longer than ``decode_timeout_s`` is cut off
    and becomes an error row. A row the listing already refused (a reason in
    ``columns.LIST_ERROR``) is an error row with that reason, and its file is never opened.
    """
    started = time.perf_counter()
    resize_crop, (h, w), draft_size = resizer(resize)
    n = len(batch[columns.PATH])
    status = np.full(n, columns.STATUS_OK, dtype=object)
    error = np.full(n, None, dtype=object)
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    refused = _strings(batch[columns.LIST_ERROR]) if columns.LIST_ERROR in batch else [None] * n
    todo = [i for i in range(n) if refused[i] is None]
    for i in range(n):
        if refused[i] is not None:
            status[i], error[i] = columns.STATUS_ERROR, refused[i]
    datas = read_many(
        [str(batch[columns.PATH][i]) for i in todo],
        storage_options,
        max_in_flight=read_in_flight,
        retry_s=retry_s,
        max_bytes=max_file_bytes,
        root=source_root,
        follow_symlinks=follow_symlinks,
    )  # raises StorageUnavailable when the store is down: not these files' fault
    breaker = ReadBreaker(local=bool(todo) and "://" not in str(batch[columns.PATH][todo[0]]))
    contents: dict[int, bytes] = {}
    for i, data in zip(todo, datas, strict=True):
        if isinstance(data, BaseException):
            breaker.failed(data)  # file after file failing the same way: the store
            status[i], error[i] = (
                columns.STATUS_ERROR,
                f"read failed: {type(data).__name__}: {data}",
            )
        else:
            breaker.ok()
            contents[i] = data
    out = {c: batch[c] for c in batch if c != columns.LIST_ERROR}
    if mode == "gpu":  # the model actor decodes (JPEGs on its GPU, the rest on its CPU)
        raw = np.full(n, b"", dtype=object)
        for i, data in contents.items():
            raw[i] = data
        out[columns.RAW_BYTES] = raw
    else:
        pixels = np.zeros((n, h, w, 3), dtype=np.uint8)
        draft = draft_size if jpeg_draft else None
        for i, data in contents.items():
            reason = _decode_into(
                data, resize_crop, pixels, width, height, i, max_pixels, draft, decode_timeout_s
            )
            if reason is not None:
                status[i], error[i] = columns.STATUS_ERROR, reason
        out[columns.PIXELS] = pixels
    out.update(
        {columns.STATUS: status, columns.ERROR: error, columns.WIDTH: width, columns.HEIGHT: height}
    )
    seconds = time.perf_counter() - started
    now = time.time()
    _report(
        stats_actor,
        decode_seconds=seconds,
        decode_blocks=1,
        decode_start=now - seconds,
        decode_end=now,
    )
    return out


def _decode_into(
    data, resize_crop, pixels, width, height, i, max_pixels, draft, timeout
) -> str | None:
    """Decode one file into row ``i`` of the block; the error row's reason, or None."""
    try:
        with time_limit(timeout):
            img = decode_image(data, max_pixels=max_pixels, draft_size=draft)
            width[i], height[i] = decoded_size(img)
            pixels[i] = resize_crop(img)
        return None
    except DecodeTimeout:
        return f"decode took longer than source.decode_timeout_s={timeout} s; cut off"
    except DecodeError as e:
        return str(e)
    except Exception as e:
        return f"preprocessing failed: {type(e).__name__}: {e}"


def _strings(values) -> list[str | None]:
    # Ray hands an all-null string column back as float NaNs or bytes; normalise to str/None.
    out = []
    for v in values:
        if v is None or (isinstance(v, float | np.floating) and v != v):
            out.append(None)
        else:
            out.append(v.decode() if isinstance(v, bytes) else str(v))
    return out


# Decode actors run at this niceness. Decode is throughput work that fills every core; beside
# it on the node run processes whose delays hold everything up: a model actor starting
# (imports, weights, CUDA: measured at ~30 s amid busy decoders on a 16-core H200 node, the
# decoders meanwhile filling the object store) and each batch's host work, the raylet, the
# driver. Ray's CPU reservations do not pin cores, so only the kernel's scheduler can give
# those the core they need when they need it; decode still gets every idle cycle.
DECODE_NICE = 10


def _lower_priority(nice: int) -> None:
    """Raise this process's niceness to at least ``nice`` (Unix; a no-op where it cannot)."""
    try:
        now = os.nice(0)
        if now < nice:
            os.nice(nice - now)
    except (AttributeError, OSError):  # no os.nice (Windows), or not permitted
        pass


class DecodeWorker:
    """:func:`decode_batch` as a long-lived Ray Data actor: the same work, with no per-block
    task scheduling (a task waits for a worker lease from the raylet, a quarter of a second
    per block measured on a busy 2-core node, where an actor call is pushed straight to its
    process). ``kwargs`` are :func:`decode_batch`'s keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _lower_priority(DECODE_NICE)
        if kwargs.get("mode", "cpu") != "gpu":  # with GPU decode this stage only reads bytes
            resizer(kwargs["resize"])  # parse the spec once, before the first block

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_batch(batch, **self.kwargs)
