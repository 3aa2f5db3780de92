"""The two Ray Data stages of the embed job: read+decode (CPU tasks) and embed (model actors).

Both are plain Python, importable and testable without Ray. A file that cannot be read,
decoded or preprocessed leaves the decode stage as a row with ``status='error'`` and the
reason; the embed stage passes such rows through with null vectors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vitflow import columns
from vitflow.decode import DecodeError, decode_image, decoded_size
from vitflow.errors import ConfigError, StorageUnavailable
from vitflow.preprocess import Preprocessor
from vitflow.sinks import PART_COLUMN
from vitflow.storage import read_many

_PASSTHROUGH = (columns.ID, columns.PATH, columns.LABEL, columns.SPLIT)


@functools.lru_cache(maxsize=4)
def _preprocessor(data_config_json: str) -> Preprocessor:
    return Preprocessor(json.loads(data_config_json))


class DecodeTimeout(BaseException):
    """Raised by :func:`time_limit` when a file's decode runs past its budget. A
    BaseException, so the decoder's own ``except Exception`` handlers cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Interrupt the block after ``seconds`` of wall time (SIGALRM; main thread only).

    PIL decodes in C but returns to Python between chunks, where the alarm's exception is
    raised; where no timer can be set (a non-main thread) the block runs unbounded.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise DecodeTimeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    data_config_json: str,
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
    (``mode="gpu"``). The block's files are read with up to ``read_in_flight`` requests at
    once. A file whose decode and resize take longer than ``decode_timeout_s`` is cut off
    and becomes an error row. A row the listing already refused (a reason in
    ``columns.LIST_ERROR``) is an error row with that reason, and its file is never opened.
    """
    started = time.perf_counter()
    pre = _preprocessor(data_config_json)
    _, h, w = pre.input_size
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
        draft = pre.draft_size if jpeg_draft else None
        for i, data in contents.items():
            reason = _decode_into(
                data, pre, pixels, width, height, i, max_pixels, draft, decode_timeout_s
            )
            if reason is not None:
                status[i], error[i] = columns.STATUS_ERROR, reason
        out[columns.PIXELS] = pixels
    out.update(
        {columns.STATUS: status, columns.ERROR: error, columns.WIDTH: width, columns.HEIGHT: height}
    )
    _report(
        stats_actor,
        decode_seconds=time.perf_counter() - started,
        decode_blocks=1,
        decode_end=time.time(),
    )
    return out


def _decode_into(data, pre, pixels, width, height, i, max_pixels, draft, timeout) -> str | None:
    """Decode one file into row ``i`` of the block; the error row's reason, or None."""
    try:
        with time_limit(timeout):
            img = decode_image(data, max_pixels=max_pixels, draft_size=draft)
            width[i], height[i] = decoded_size(img)
            pixels[i] = pre.resize_crop(img)
        return None
    except DecodeTimeout:
        return f"decode took longer than source.decode_timeout_s={timeout} s; cut off"
    except DecodeError as e:
        return str(e)
    except Exception as e:
        return f"preprocessing failed: {type(e).__name__}: {e}"


def output_schema(dims: dict[str, int]) -> pa.Schema:
    """Arrow schema of the embeddings table: meta columns, then one vector column per feature."""
    fields = [
        pa.field(columns.ID, pa.string(), nullable=False),
        pa.field(columns.PATH, pa.string(), nullable=False),
        pa.field(columns.LABEL, pa.string()),
        pa.field(columns.SPLIT, pa.string()),
        pa.field(columns.STATUS, pa.string(), nullable=False),
        pa.field(columns.ERROR, pa.string()),
        pa.field(columns.WIDTH, pa.int32()),
        pa.field(columns.HEIGHT, pa.int32()),
    ]
    fields += [pa.field(name, pa.list_(pa.float32(), d)) for name, d in dims.items()]
    return pa.schema(fields)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """``(N, dim)`` float32 with a validity mask -> ``fixed_size_list<float32>[dim]`` (nulls where invalid)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def _strings(values) -> list[str | None]:
    # Ray hands an all-null string column back as float NaNs or bytes; normalise to str/None.
    out = []
    for v in values:
        if v is None or (isinstance(v, float | np.floating) and v != v):
            out.append(None)
        else:
            out.append(v.decode() if isinstance(v, bytes) else str(v))
    return out


def rows_table(
    batch: dict[str, np.ndarray], vectors: dict[str, np.ndarray], dims: dict[str, int]
) -> pa.Table:
    """Assemble the output table of one batch; ``vectors`` hold rows for the ok images only."""
    ok = batch[columns.STATUS] == columns.STATUS_OK
    n = len(ok)
    schema = output_schema(dims)
    cols = {
        c: pa.array(_strings(batch[c]), type=pa.string())
        for c in (*_PASSTHROUGH, columns.STATUS, columns.ERROR)
    }
    for c in (columns.WIDTH, columns.HEIGHT):
        cols[c] = pa.array(np.asarray(batch[c], dtype=np.int32), mask=~ok, type=pa.int32())
    for name, d in dims.items():
        full = np.zeros((n, d), dtype=np.float32)
        if ok.any():
            full[ok] = vectors[name]
        cols[name] = vectors_to_arrow(full, ok, d)
    table = pa.table(cols, schema=schema)
    # The listing's bookkeeping rides along for the sink's writer (which part a row belongs
    # to; size and mtime for the index's next diff); it is written only where a sink wants it.
    if PART_COLUMN in batch:
        table = table.append_column(
            PART_COLUMN, pa.array(np.asarray(batch[PART_COLUMN], dtype=np.int64))
        )
    if "size" in batch:
        table = table.append_column("size", pa.array(np.asarray(batch["size"], dtype=np.int64)))
    if "mtime" in batch:
        table = table.append_column("mtime", pa.array(_strings(batch["mtime"]), pa.string()))
    return table


class EmbedWorker:
    """Model actor: one backbone per process, all feature sets from one forward pass per batch,
    and the sink's writer, so what it embeds is written where it was embedded.

    Args:
        job: the validated job config as a plain dict (re-validated here).
        weights: ``[ObjectRef]`` to the driver's state dict as safetensors bytes, so every
            replica runs the exact weights the driver checked (and random-init runs agree).
        device: ``cuda`` or ``cpu``.
        torch_threads: intra-op threads for CPU inference.
        stats_actor: name of the run's stats actor, or None.
        writer: ``(class, kwargs)`` of the sink's writer (see :mod:`vitflow.sinks`); None
            returns the rows themselves.
        decode: ``gpu``: the batch holds file bytes, decoded here (JPEGs on the device).
    """

    def __init__(
        self,
        job: dict,
        weights: list,
        device: str,
        torch_threads: int,
        stats_actor: str | None,
        writer: tuple[type, dict] | None = None,
        decode: str = "cpu",
    ):
        import ray

        from vitflow.backbone import backbone_from_bytes
        from vitflow.config import EmbedConfig
        from vitflow.features import FeatureExtractor

        torch.set_num_threads(torch_threads)
        cfg = EmbedConfig.model_validate(job)
        if device == "cuda" and not torch.cuda.is_available():
            # Never fall back to the CPU while holding a GPU: the run would crawl, and the
            # manifest would say cuda. The driver's probe normally stops the job earlier.
            from vitflow.accelerator import cuda_problem, cuda_report

            raise ConfigError(cuda_problem(cuda_report(), "this model actor's node"))
        self.device = torch.device(device)
        bb = backbone_from_bytes(ray.get(weights[0]), cfg.model)
        self.pre = Preprocessor(bb.data_config)
        self.extractor = FeatureExtractor(
            bb.model, cfg.features, self.pre.input_size, cfg.model.extractor, head=bb.head
        )
        self.extractor.to(self.device)
        self.channels_last = cfg.compute.channels_last
        if self.channels_last:
            self.extractor.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.extractor) if cfg.compute.compile else self.extractor
        self.dims = self.extractor.dims
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.compute.precision)
        self.decode, self.max_pixels = decode, cfg.source.max_pixels
        self.writer = writer[0](**writer[1]) if writer is not None else None
        self.stats_name = stats_actor
        self.stats = ray.get_actor(stats_actor) if stats_actor else None
        self.node_id = ray.get_runtime_context().get_node_id()
        if self.stats is not None:  # where each replica was placed, even if it gets no batch
            self.stats.add.remote(node=self.node_id, actor=self._describe())
        # Count real backbone passes at its stem (first child module), so the run's stats
        # show one pass per batch however many feature sets are requested.
        self.stem_calls = 0
        stem = next(bb.model.children())
        stem.register_forward_pre_hook(lambda *_: setattr(self, "stem_calls", self.stem_calls + 1))

    def _describe(self) -> dict:
        """What this replica really runs on, for the manifest."""
        import os

        out = {"node": self.node_id, "pid": os.getpid(), "device": str(self.device)}
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["torch_cuda"] = torch.version.cuda
        else:
            out["torch_threads"] = torch.get_num_threads()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        t0 = time.perf_counter()
        pixels = self._pixels(batch)  # on the device; None when no row is ok
        ok = batch[columns.STATUS] == columns.STATUS_OK
        vectors: dict[str, np.ndarray] = {}
        seconds = 0.0
        calls_before = self.stem_calls
        if ok.any():
            x = self.pre.to_tensor(pixels[torch.from_numpy(ok).to(pixels.device)], self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                self.device.type, dtype=self.autocast, enabled=self.autocast is not None
            ):
                out = self.forward(x)
            vectors = {k: v.float().cpu().numpy() for k, v in out.items()}
        seconds = time.perf_counter() - t0
        table = rows_table(batch, vectors, self.dims)
        t1 = time.perf_counter()
        result = self.writer.write(table) if self.writer is not None else table
        write_seconds = time.perf_counter() - t1
        if self.stats is not None:
            self.stats.add.remote(
                node=self.node_id,
                batches=1,
                batches_with_images=int(ok.any()),
                forwards=self.stem_calls - calls_before,
                images=int(ok.sum()),
                model_seconds=seconds,
                write_seconds=write_seconds,
                model_start=started,
            )
        return result

    def _pixels(self, batch: dict[str, np.ndarray]) -> torch.Tensor | None:
        """The batch's ``uint8`` (B, H, W, 3) pixels on the device: copied from pinned memory
        when CPU tasks decoded them, or decoded here from the files' bytes (``decode: gpu``;
        error rows get their reasons in ``batch``)."""
        if self.decode != "gpu":
            x = torch.from_numpy(np.ascontiguousarray(batch[columns.PIXELS]))
            if self.device.type == "cuda":
                return x.pin_memory().to(self.device, non_blocking=True)
            return x
        from vitflow.gpu_decode import decode_resize_batch

        ok = batch[columns.STATUS] == columns.STATUS_OK
        rows = np.flatnonzero(ok)
        _, h, w = self.pre.input_size
        full = torch.zeros((len(ok), h, w, 3), dtype=torch.uint8, device=self.device)
        if len(rows):
            # Always ask for the GPU: without CUDA the batch takes the exact CPU path (the
            # fallback is decode_resize_batch's own, so it is the same everywhere).
            got = decode_resize_batch(
                [batch[columns.RAW_BYTES][i] for i in rows],
                self.pre,
                "cuda",
                max_pixels=self.max_pixels,
            )
            full[torch.from_numpy(rows).to(self.device)] = got.pixels.to(self.device)
            for i, err, (wd, ht) in zip(rows, got.errors, got.sizes, strict=True):
                if err is not None:
                    batch[columns.STATUS][i], batch[columns.ERROR][i] = columns.STATUS_ERROR, err
                else:
                    batch[columns.WIDTH][i], batch[columns.HEIGHT][i] = wd, ht
        return full
