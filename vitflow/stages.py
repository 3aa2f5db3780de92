"""The embed stage of the embed job (model actors), and the output table it writes.

Plain Python, importable and testable without Ray. The decode stage before it is
:func:`vitflow.decode_task.decode_batch` (no torch there). Rows that stage marked
``status='error'`` pass through here with null vectors.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

from vitflow import columns
from vitflow.decode_task import _strings
from vitflow.errors import ConfigError
from vitflow.preprocess import Preprocessor
from vitflow.sinks import PART_COLUMN

_PASSTHROUGH = (columns.ID, columns.PATH, columns.LABEL, columns.SPLIT)


def output_schema(
    dims: dict[str, int], mae_loss: bool = False, dense: tuple[str, ...] = ()
) -> pa.Schema:
    """Arrow schema of the embeddings table: meta columns, then one column per feature (a
    ``float32`` vector, or for the ``dense`` ones a ``float16`` map, cells row by row), then
    the per-image ``mae_loss`` where the job asks for it (``model.mae_loss``)."""
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
    fields += [
        pa.field(name, pa.list_(pa.float16() if name in dense else pa.float32(), d))
        for name, d in dims.items()
    ]
    if mae_loss:
        fields.append(pa.field(columns.MAE_LOSS, pa.float32()))
    return pa.schema(fields)


def vectors_to_arrow(
    vectors: np.ndarray, valid: np.ndarray, dim: int, dtype=np.float32
) -> pa.FixedSizeListArray:
    """``(N, dim)`` with a validity mask -> ``fixed_size_list<float32>[dim]`` (``float16``
    for ``dtype=np.float16``; nulls where invalid)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def rows_table(
    batch: dict[str, np.ndarray],
    vectors: dict[str, np.ndarray],
    dims: dict[str, int],
    mae_loss: np.ndarray | None = None,
    dense: tuple[str, ...] = (),
) -> pa.Table:
    """Assemble the output table of one batch; ``vectors`` hold rows for the ok images only,
    as does ``mae_loss`` (given: the table has that column, null on error rows); the
    ``dense`` features are stored as ``float16``."""
    ok = batch[columns.STATUS] == columns.STATUS_OK
    n = len(ok)
    schema = output_schema(dims, mae_loss=mae_loss is not None, dense=dense)
    cols = {
        c: pa.array(_strings(batch[c]), type=pa.string())
        for c in (*_PASSTHROUGH, columns.STATUS, columns.ERROR)
    }
    for c in (columns.WIDTH, columns.HEIGHT):
        cols[c] = pa.array(np.asarray(batch[c], dtype=np.int32), mask=~ok, type=pa.int32())
    for name, d in dims.items():
        dtype = np.float16 if name in dense else np.float32
        full = np.zeros((n, d), dtype=dtype)
        if ok.any():
            full[ok] = vectors[name]
        cols[name] = vectors_to_arrow(full, ok, d, dtype)
    if mae_loss is not None:
        full = np.zeros(n, dtype=np.float32)
        full[ok] = mae_loss
        cols[columns.MAE_LOSS] = pa.array(full, mask=~ok, type=pa.float32())
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
        init_started = time.time()
        lap = time.perf_counter()
        # Where this replica's start-up went, for the manifest: a model actor that is slow to
        # come up holds the whole stream back (decode runs ahead into the object store).
        startup: dict[str, float] = {}

        def phase(name: str) -> None:
            nonlocal lap
            now = time.perf_counter()
            startup[name] = round(now - lap, 3)
            lap = now

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
        phase("imports_s")
        raw = ray.get(weights[0])
        phase("weights_fetch_s")
        bb = backbone_from_bytes(raw, cfg.model)
        del raw
        self.pre = Preprocessor(bb.data_config)
        self.extractor = FeatureExtractor(
            bb.model,
            cfg.features,
            self.pre.input_size,
            cfg.model.extractor,
            head=bb.head,
            pca=bb.dense_pca,
        )
        phase("build_s")
        self.extractor.to(self.device)
        self.channels_last = cfg.compute.channels_last
        if self.channels_last:
            self.extractor.to(memory_format=torch.channels_last)
        phase("to_device_s")  # with CUDA: the context and the copy of the weights
        self.forward = torch.compile(self.extractor) if cfg.compute.compile else self.extractor
        self.dims = self.extractor.dims
        # model.mae_loss: the encoder (the backbone itself) and the checkpoint's decoder.
        self.mae, self.encoder = cfg.model.mae_loss, bb.model
        self.mae_decoder = bb.mae_decoder.to(self.device) if bb.mae_decoder is not None else None
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.compute.precision)
        if self.device.type == "cuda" and not cfg.compute.compile:
            # The first CUDA forward creates the cuBLAS/cuDNN handles and loads kernels (about
            # a second): paid here, so the first batch's time is a batch's time. Not with
            # torch.compile, which would compile for this shape and again for the batch's.
            with torch.inference_mode():
                self._forward(torch.zeros((2, *self.pre.input_size), device=self.device))
            torch.cuda.synchronize(self.device)
            phase("warmup_s")
        self.decode, self.max_pixels = decode, cfg.source.max_pixels
        self._model_lock, self._write_lock = threading.Lock(), threading.Lock()
        self._streams = threading.local()  # a CUDA stream per calling thread (see __call__)
        # Ray Data's arrays are read-only views; the pixel tensor made from one is only read
        # (copied to pinned memory, or indexed into a new tensor), never written. Set once
        # here: catch_warnings around each use is not thread-safe.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        self.writer = writer[0](**writer[1]) if writer is not None else None
        self.stats_name = stats_actor
        self.stats = ray.get_actor(stats_actor) if stats_actor else None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.startup = {
            "process_to_init_s": _process_age(init_started),  # worker start, class import
            **startup,
            "init_s": round(time.time() - init_started, 3),
            "ready_at": time.time(),
        }
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

        out = {
            "node": self.node_id,
            "pid": os.getpid(),
            "device": str(self.device),
            "startup": self.startup,
        }
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["torch_cuda"] = torch.version.cuda
        else:
            out["torch_threads"] = torch.get_num_threads()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One batch: its pixels onto the device (copied, or decoded there), the forward pass,
        the rows written. Ray Data may run two calls of one actor at once (plan's
        ``batches_in_flight``): then one batch's pixels are prepared while the other's
        forward runs. The forward and the write each take a lock, so the device runs one
        forward at a time and the writer sees one table at a time."""
        started = time.time()
        t_prep = time.perf_counter()
        # On a GPU this batch's copy (or decode) runs on a stream of its own, so it overlaps
        # the forward of the batch before it, which runs on the default stream.
        side = self._side_stream()
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            pixels = self._pixels(batch)  # on the device
        return self.embed(batch, pixels, side, started, t_prep)

    def embed(
        self,
        batch: dict[str, np.ndarray],
        pixels: torch.Tensor,
        side,
        started: float,
        t_prep: float,
    ) -> pa.Table:
        """The batch's rows from its ``pixels`` (uint8 on the device, prepared on the CUDA
        stream ``side``): normalised as this model wants, the forward, the rows written.
        :class:`SharedInputWorker` calls it for each of its models on one batch's pixels."""
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            ok = batch[columns.STATUS] == columns.STATUS_OK
            x = None
            if ok.any():
                x = self.pre.to_tensor(pixels[torch.from_numpy(ok).to(pixels.device)], self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
        if side is not None:
            side.synchronize()  # this thread waits; the other one's forward goes on
        prepare_seconds = time.perf_counter() - t_prep
        vectors: dict[str, np.ndarray] = {}
        forwards = 0
        with self._model_lock:
            t0 = time.perf_counter()
            if x is not None:
                if side is not None:
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    x.record_stream(torch.cuda.current_stream(self.device))
                calls_before = self.stem_calls
                out = self._forward(x)
                # Dense maps leave the device as float16, as they are stored (half the copy).
                vectors = {
                    k: (v.half() if k in self.extractor.dense else v.float()).cpu().numpy()
                    for k, v in out.items()
                }
                forwards = self.stem_calls - calls_before
                if self.mae_decoder is not None:
                    losses = self._mae_loss(x, batch[columns.ID][ok])
            seconds = time.perf_counter() - t0
        del x
        if self.mae_decoder is not None and not ok.any():
            losses = np.zeros(0, np.float32)
        table = rows_table(
            batch,
            vectors,
            self.dims,
            losses if self.mae_decoder is not None else None,
            dense=self.extractor.dense,
        )
        with self._write_lock:
            t1 = time.perf_counter()
            result = self.writer.write(table) if self.writer is not None else table
            write_seconds = time.perf_counter() - t1
        if self.stats is not None:
            self.stats.add.remote(
                node=self.node_id,
                batches=1,
                batches_with_images=int(ok.any()),
                forwards=forwards,
                images=int(ok.sum()),
                model_seconds=seconds,
                prepare_seconds=prepare_seconds,
                write_seconds=write_seconds,
                model_start=started,
            )
        return result

    def _mae_loss(self, x: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        """Each image's MAE reconstruction loss (vitflow.mae), its mask seeded by its id."""
        from vitflow.mae import mae_loss, mask_noise

        noise = mask_noise(
            [str(i) for i in ids], self.encoder.patch_embed.num_patches, self.mae.seed
        )
        with torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        ):
            loss = mae_loss(
                self.encoder,
                self.mae_decoder,
                x,
                noise,
                mask_ratio=self.mae.mask_ratio,
                norm_pix_loss=self.mae.norm_pix_loss,
            )
        return loss.float().cpu().numpy()

    def _side_stream(self):
        """This thread's CUDA stream for preparing batches, or None off the GPU."""
        if self.device.type != "cuda":
            return None
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        ):
            return self.forward(x)

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

        # This batch's status, reason and size change row by row below. Ray Data hands over
        # read-only views of the block's Arrow buffers: the columns are copied first (reasons
        # as objects: a block without one comes as a float array of NaN).
        for col in (columns.STATUS, columns.ERROR):
            batch[col] = np.array(batch[col], dtype=object)
        for col in (columns.WIDTH, columns.HEIGHT):
            batch[col] = np.array(batch[col])
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


MEMBER_COLUMN = "__model"  # which of a shared stream's models a receipt row is for


class SharedInputWorker:
    """Model actor for several models that take the same input (one resize and crop; their
    normalisations may differ, as those run on the device): each batch is decoded once, its
    pixels go onto the device once, and every model embeds them and writes its own output.
    The receipt is the models' receipts stacked, each row tagged with its model's position
    (:data:`MEMBER_COLUMN`), so the driver hands each output its own.

    Args:
        models: per model, the keyword arguments of :class:`EmbedWorker` that differ between
            outputs: ``job``, ``weights``, ``stats_actor``, ``writer`` (required here).
        device, torch_threads, decode: as for :class:`EmbedWorker`, shared.
    """

    def __init__(self, models: list[dict], device: str, torch_threads: int, decode: str = "cpu"):
        self.workers = [
            EmbedWorker(**m, device=device, torch_threads=torch_threads, decode=decode)
            for m in models
        ]
        specs = {w.pre.resize_spec() for w in self.workers}
        if len(specs) > 1 or any(w.writer is None for w in self.workers):
            raise ValueError(
                "models that share a stream take the same resize and crop and write through "
                f"a sink; got resize specs {sorted(specs)}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        t_prep = time.perf_counter()
        first = self.workers[0]
        side = first._side_stream()
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            pixels = first._pixels(batch)  # decoded (decode: gpu) and copied once
        receipts = []
        for i, w in enumerate(self.workers):
            receipt = w.embed(
                batch, pixels, side, started, t_prep if i == 0 else time.perf_counter()
            )
            receipts.append(
                receipt.append_column(MEMBER_COLUMN, pa.array(np.full(len(receipt), i, np.int32)))
            )
        return pa.concat_tables(receipts)


def _process_age(at: float) -> float | None:
    """Seconds from this process's start to ``at`` (epoch seconds), from ``/proc`` (Linux, to
    a clock tick); None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - started - (time.time() - at), 3)
    except (OSError, ValueError, IndexError):
        return None
