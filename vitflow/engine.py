"""One streaming run for every job that embeds: Ray session, actor pool, stats, accounting,
error budget. ``vitflow embed`` and ``vitflow reindex`` differ only in their sink
(:mod:`vitflow.sinks`).

The stream: listing rows, cut into small blocks -> read + decode actors (CPU) -> model actors
(one backbone each; all feature sets from one forward pass; each actor writes what it
embedded through the sink's writer and returns a receipt) -> the driver, which counts the
receipts, judges the error budget and hands them to the sink. Rows never pass through one
process, and the driver holds counters, not rows.

Keeping the accelerator busy from the first seconds (issue 10):

- blocks are small (``compute.decode_batch_size``, default min(batch, 64) rows), so the
  first decoded images reach the model within seconds instead of after whole 1,000-row
  blocks;
- decode runs in a pool of long-lived actors, not a task per block: a task waits for a
  worker lease from the raylet (0.25 s per block on average, measured on a busy 2-core
  node, a quarter of a 64-image block's decode), an actor call goes straight to its
  process, and each decode actor keeps a few blocks queued so it never idles between
  them. Decode actors import no torch (:mod:`vitflow.decode_task`): ~0.2 GB each, started
  in a fraction of a second;
- decode actors are capped so that the model actors' reservations always fit beside
  them: the model actors are built and warmed (weights, CUDA) while decode starts, never
  pending behind it;
- on CPU-only nodes a decode actor takes a fraction of a CPU so that one per core runs
  beside the model actor (a whole CPU each left room for one on a 2-core node).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from vitflow import columns
from vitflow.config import EmbedConfig
from vitflow.errors import VitflowError, job_error_in
from vitflow.runtime import ActorPlan, plan_pool, ray_session, take_start_timing

log = logging.getLogger(__name__)

ERROR_BUDGET_MIN_ROWS = 100  # the error budget is judged after a fair sample
MAX_DECODE_BLOCK = 64


class Rows(Protocol):
    """Listing rows read in pieces (a :class:`~vitflow.ledger.Ledger`, an embed run's
    :class:`~vitflow.embed.PartRows`): the stream never needs them all in the driver."""

    num_rows: int
    schema: pa.Schema

    def batches(self, batch_rows: int) -> Iterator[pa.Table]: ...


class ErrorBudgetExceeded(VitflowError):
    """Too many files failed (``compute.max_error_fraction``); the job stops, resumably."""


@dataclass
class StreamResult:
    """What a stream did: row counts, the actors' counters and the stage timings."""

    processed: int
    ok: int
    error: int
    actors: ActorPlan | None
    stats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    sink: dict[str, Any] = field(default_factory=dict)


class ErrorBudget:
    """``compute.max_error_fraction``, judged the same way for every sink: after
    min(total, 100) rows, so three bad files among the first ten do not abort a big job,
    and a small job in which every file fails does."""

    def __init__(self, fraction: float | None, total: int):
        self.fraction, self.total = fraction, total
        self.processed = self.errors = 0

    def add(self, processed: int, errors: int) -> None:
        self.processed += processed
        self.errors += errors
        if self.fraction is None:
            return
        if self.processed >= min(self.total, ERROR_BUDGET_MIN_ROWS) and (
            self.errors > self.fraction * self.processed
        ):
            raise ErrorBudgetExceeded(
                f"error budget exceeded: {self.errors} of {self.processed} files failed so far, "
                f"more than compute.max_error_fraction={self.fraction}; the job stopped with its "
                "finished work kept. Fix the inputs (see the error column) or raise the budget, "
                "then rerun (with --resume for embed)"
            )


def decode_block_rows(cfg: EmbedConfig, batch_size: int) -> int:
    return cfg.compute.decode_batch_size or max(1, min(batch_size, MAX_DECODE_BLOCK))


@dataclass
class StreamOutput:
    """One output a stream writes: its job (model, features), the model's checked weights,
    its sink and its run lock."""

    cfg: EmbedConfig
    weights: bytes
    sink: Any
    lock: Any = None
    model_params: int | None = None


def stream(
    cfg: EmbedConfig,
    *,
    data_config: dict,
    weights: bytes,
    rows: Rows,
    sink,
    address: str | None = None,
    source_root: str | None = None,
    lock=None,
    model_params: int | None = None,
) -> StreamResult:
    """Embed ``rows`` (listing rows; any extra columns ride along to the sink's writer) on a
    Ray cluster and hand every batch to ``sink``.

    Args:
        cfg: the job.
        data_config: the backbone's eval preprocessing (``Backbone.data_config``).
        weights: the driver's checked backbone as safetensors bytes (every actor loads them).
        rows: what to embed.
        sink: the sink (see :mod:`vitflow.sinks`).
        address: Ray cluster to attach to; default: this process's Ray, else a local one.
        source_root: a local source's folder (reads check links against it).
        lock: the output's :class:`~vitflow.locking.RunLock`, checked as receipts arrive.
        model_params: the backbone's parameter count (sizes the default GPU batch).
    """
    out = StreamOutput(cfg, weights, sink, lock, model_params)
    return stream_shared(
        [out], data_config=data_config, rows=rows, address=address, source_root=source_root
    )[0]


def stream_shared(
    outputs: list[StreamOutput],
    *,
    data_config: dict,
    rows: Rows,
    address: str | None = None,
    source_root: str | None = None,
) -> list[StreamResult]:
    """One stream for several models that take the same input: ``rows`` are read and
    decoded once, each batch's pixels go onto the device once, and every model embeds them
    in the same model actor and writes its own output through its own sink (issue 13's
    "decode once per distinct preprocessing").

    The outputs must share everything that decides what is read and how: the source and
    storage settings, ``compute`` (batch, pool, decode) and the resize and crop
    (``data_config``, the first model's). Each output gets its own result: its receipts,
    error budget, counters and timings; the decode counters are the stream's, shared.
    """
    cfg = outputs[0].cfg
    for o in outputs[1:]:
        if input_settings(o.cfg) != input_settings(cfg):
            raise ValueError(
                "outputs that share a stream need the same source, storage and compute"
            )
    budgets = [ErrorBudget(cfg.compute.max_error_fraction, rows.num_rows) for _ in outputs]
    params = [o.model_params for o in outputs]
    with ray_session(address, cfg.compute.local_num_cpus) as ray:
        t0, t0_wall = time.perf_counter(), time.time()
        ray_start = take_start_timing()
        # One actor holds every model of the stream: the pool is sized for all of them.
        actors = plan_pool(ray, cfg.compute, sum(params) if None not in params else None)
        run_id = uuid.uuid4().hex[:12]
        stats_names = [f"vitflow-stats-{run_id}-{i}" for i in range(len(outputs))]
        # The counters live on the head node: a worker node that goes away must not take
        # them with it (a driver may be attached through any node's raylet). Hard affinity:
        # Ray 2.60 places a soft-affine actor on another node even when the head is free
        # (seen in the two-node test), and a 0-CPU actor always fits the head.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(_head_node_id(ray), soft=False)
        stats = [
            ray.remote(num_cpus=0)(StreamStats)
            .options(name=name, scheduling_strategy=here)
            .remote()
            for name in stats_names
        ]
        try:
            for o in outputs:
                o.sink.start(ray)
            models = [
                {
                    "job": o.cfg.model_dump(mode="json"),
                    "weights": [ray.put(o.weights)],
                    "stats_actor": name,
                    "writer": o.sink.writer(),
                }
                for o, name in zip(outputs, stats_names, strict=True)
            ]
            ds = build_dataset(
                ray,
                cfg,
                data_config=data_config,
                models=models,
                actors=actors,
                rows=rows,
                source_root=source_root,
            )
            marks = [_progress_marks(rows.num_rows) for _ in outputs]
            first: list[float | None] = [None] * len(outputs)
            try:
                for receipt in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    now = time.perf_counter() - t0
                    for i, part in _by_output(receipt, len(outputs)):
                        first[i] = now if first[i] is None else first[i]
                        errors = pc.sum(pc.not_equal(part[columns.STATUS], columns.STATUS_OK))
                        budgets[i].add(part.num_rows, errors.as_py() or 0)
                        outputs[i].sink.receive(part)
                        for frac, at in marks[i].items():
                            if at is None and budgets[i].processed >= frac * rows.num_rows:
                                marks[i][frac] = now
                    for o in outputs:
                        if o.lock is not None:
                            o.lock.check()
            except Exception as e:
                for o in outputs:
                    o.sink.abort()  # nothing of this run still writes when the next one starts
                # A job error raised in a task or actor (storage out past its retry budget,
                # disk full) arrives wrapped by Ray: give the user its sentence.
                job_error = job_error_in(e)
                if job_error is not None and job_error is not e:
                    raise job_error from None
                raise
            sink_summaries = [o.sink.finish() for o in outputs]
            run_stats = []
            for s in stats:
                try:
                    run_stats.append(ray.get(s.get.remote(), timeout=60))
                except Exception as e:  # counters are reporting, not results: output is whole
                    log.warning("the run's counters are lost (%s); the output is complete", e)
                    run_stats.append({})
        finally:
            for s in stats:
                ray.kill(s)
        # The decode actors report to the first output's counters: the decode is everyone's.
        decode = {k: run_stats[0][k] for k in _DECODE_STATS if k in run_stats[0]}
        results = []
        for i in range(len(outputs)):
            st = {**run_stats[i], **decode}
            if len(outputs) > 1:
                st["shared_stream"] = {
                    "outputs": [x.cfg.output.uri for x in outputs],
                    "run": run_id,
                }
            results.append(
                StreamResult(
                    processed=budgets[i].processed,
                    ok=budgets[i].processed - budgets[i].errors,
                    error=budgets[i].errors,
                    actors=actors,
                    stats=st,
                    timings={
                        **ray_start,
                        **_timings(t0, first[i], marks[i], rows.num_rows, st, actors, t0_wall),
                    },
                    sink=sink_summaries[i],
                )
            )
    return results


# What the decode actors count (the first output's counters hold them for a shared stream).
_DECODE_STATS = ("decode_seconds", "decode_blocks", "first_decode_start", "last_decode_end")


def input_settings(cfg: EmbedConfig) -> str:
    """What a stream reads and how (see :func:`stream_shared`), to compare outputs by."""
    return cfg.model_dump_json(include={"source", "storage", "compute"})


def _by_output(receipt: pa.Table, n: int):
    """A receipt's rows per output: ``(i, rows)``; a one-model stream's receipt is all one's."""
    from vitflow.stages import MEMBER_COLUMN

    if n == 1 or MEMBER_COLUMN not in receipt.column_names:
        yield 0, receipt
        return
    member = receipt.column(MEMBER_COLUMN)
    rest = receipt.drop_columns([MEMBER_COLUMN])
    for i in range(n):
        part = rest.filter(pc.equal(member, i))
        if part.num_rows:
            yield i, part


INPUT_CHUNK_ROWS = 16_384  # listing rows per object the driver puts (then cut into blocks)


def input_dataset(ray, rows: Rows, block_rows: int):
    """The rows as a Ray Dataset of blocks of exactly ``block_rows`` rows: each block is one
    call of a decode actor, so decode is cut fine however long the listing is.

    The driver puts the rows into the object store in chunks of about
    :data:`INPUT_CHUNK_ROWS` (a ledger is read a chunk at a time), so it keeps one object
    ref per 16K rows, not per block; the object store holds the chunks and spills them to
    disk when full. Ray Data's streaming repartition then cuts the chunks into blocks as the
    decode actors need them."""
    chunk = block_rows * max(1, INPUT_CHUNK_ROWS // block_rows)  # whole blocks per chunk
    refs = [ray.put(piece) for piece in rows.batches(batch_rows=chunk)]
    refs = refs or [ray.put(rows.schema.empty_table())]
    ds = ray.data.from_arrow_refs(refs).repartition(
        target_num_rows_per_block=block_rows, strict=True
    )
    # Cutting rows is bookkeeping, but Ray gives each repartition task a whole CPU and has
    # no argument to change it: the decode and model actors hold every CPU for the run, so
    # such a task would never be scheduled (and before them, it held the cores the decode
    # workers were starting on). Set the logical operator's remote args (Ray 2.60-2.63).
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if type(op).__name__ != "StreamingRepartition" or not hasattr(op, "ray_remote_args"):
        raise RuntimeError(
            f"this Ray ({ray.__version__}) plans a streaming repartition differently from the "
            "Ray versions vitflow supports (2.60 to 2.63); install one of those"
        )
    object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": 0})
    return ds


def build_dataset(
    ray,
    cfg: EmbedConfig,
    *,
    data_config: dict,
    models: list[dict],
    actors: ActorPlan,
    rows: Rows,
    source_root: str | None = None,
):
    """Listing rows -> read+decode actors -> model actor pool (-> the sink's writer). Returns
    the Ray Dataset of receipts (or of output rows, with no writer).

    ``models``: per model the model actor hosts, its ``job`` (dict), ``weights``
    (``[ObjectRef]``), ``stats_actor`` (name or None) and ``writer`` (or None). One model
    runs in an :class:`~vitflow.stages.EmbedWorker`; several share each decoded batch in a
    :class:`~vitflow.stages.SharedInputWorker`. The first one's counters get the decode's."""
    from vitflow.decode_task import DecodeWorker
    from vitflow.preprocess import Preprocessor
    from vitflow.stages import EmbedWorker, SharedInputWorker

    shared = {"device": actors.device, "torch_threads": actors.torch_threads}
    if len(models) == 1:
        worker, kwargs = EmbedWorker, {**models[0], **shared, "decode": actors.decode}
    else:
        worker, kwargs = SharedInputWorker, {"models": models, **shared, "decode": actors.decode}

    ds = input_dataset(ray, rows, decode_block_rows(cfg, actors.batch_size))
    ds = ds.map_batches(
        DecodeWorker,
        batch_size=None,
        batch_format="numpy",
        num_cpus=actors.decode_num_cpus,
        # Never more decode actors than the CPUs beside the model actors' reservations: those
        # start (and warm up) at once instead of waiting behind decode.
        compute=ray.data.ActorPoolStrategy(size=actors.decode_tasks),
        fn_constructor_kwargs={
            # The resize/crop as plain data: decode workers never import torch.
            "resize": Preprocessor(data_config).resize_spec(),
            **decode_settings(cfg, source_root),
            "mode": actors.decode,
            "stats_actor": models[0]["stats_actor"],
        },
    )
    return ds.map_batches(
        worker,
        batch_size=actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors.num_actors,
            # Two batches at once on a GPU actor: the next one's pixels go to the device
            # (decoded there with decode: gpu) while this one's forward runs; the actor's own
            # locks keep forwards and writes one at a time.
            **(
                {
                    "max_concurrent_calls_per_actor": actors.batches_in_flight,
                    "enable_true_multi_threading": True,
                }
                if actors.batches_in_flight > 1
                else {}
            ),
        ),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        # Model replicas go to different nodes where they can (each brings its own
        # accelerator / cores): Ray Data places its actors with SPREAD (DataContext's
        # default), so no argument is passed (ray_remote_args are deprecated from Ray 2.64).
        fn_constructor_kwargs=kwargs,
    )


def decode_settings(cfg: EmbedConfig, source_root: str | None) -> dict[str, Any]:
    """How the job reads and decodes its files (the keyword arguments of
    :func:`vitflow.decode_task.decode_batch` that come from the job): the decode actors get
    these, and so does anything that must decode exactly as they do (a dense PCA's sample)."""
    return {
        "max_pixels": cfg.source.max_pixels,
        "decode_timeout_s": cfg.source.decode_timeout_s,
        "storage_options": cfg.storage.options_for(cfg.source.uri),
        "retry_s": cfg.storage.retry_seconds,
        "max_file_bytes": cfg.source.max_file_bytes,
        "source_root": source_root,
        "follow_symlinks": cfg.source.follow_symlinks,
        "jpeg_draft": cfg.compute.jpeg_draft,
        "read_in_flight": cfg.storage.read_in_flight,
    }


def _head_node_id(ray) -> str:
    """The head node's id (the node whose loss ends the cluster anyway); the driver's own
    node where Ray marks none."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def _progress_marks(total: int) -> dict[float, float | None]:
    return {0.1: None, 0.9: None} if total else {}


def _timings(t0, first, marks, total, stats, actors, t0_wall=None) -> dict[str, Any]:
    """Where the time went: the stream's wall time, when the first model actor was ready and
    the first batch came back, the steady-state rate (between 10% and 90% of the rows), and
    the stages' summed seconds."""
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "stream_seconds": round(wall, 3),
        "first_result_seconds": None if first is None else round(first, 3),
        "decode_seconds": round(stats.get("decode_seconds", 0.0), 3),
        "model_seconds": round(stats.get("model_seconds", 0.0), 3),
        # Pixels onto the device before each forward: the host-to-device copy, or the
        # decode itself with decode: gpu (overlapped with the other batch's forward when a
        # model actor has two batches in flight).
        "prepare_seconds": round(stats.get("prepare_seconds", 0.0), 3),
        "write_seconds": round(stats.get("write_seconds", 0.0), 3),
    }
    ready = [a["startup"]["ready_at"] for a in stats.get("model_actors", []) if "startup" in a]
    if ready and t0_wall is not None:
        # From the stream's start (Ray up, before the pool is planned) to the first replica
        # ready to take a batch: its start-up phases are in execution.model_actors.
        out["model_ready_seconds"] = round(min(ready) - t0_wall, 3)
    lo, hi = marks.get(0.1), marks.get(0.9)
    if lo is not None and hi is not None and hi > lo:
        out["steady_images_per_second"] = round(0.8 * total / (hi - lo), 2)
    if actors is not None and wall > 0:
        # The share of the stream's time the model actors spent in forward passes.
        out["model_busy_share"] = round(
            stats.get("model_seconds", 0.0) / (actors.num_actors * wall), 3
        )
    decode_from = stats.get("first_decode_start")
    if decode_from is not None and stats.get("last_decode_end", 0) > decode_from:
        # The decode stage's own rate, from its first block's start to its last block's end:
        # what to set against the decode-bound ceiling. The steady-state rate above is the
        # rate results came back; where decode ran ahead of a model actor still starting,
        # that drains decoded blocks from the object store and overstates a long run's pace.
        span = stats["last_decode_end"] - decode_from
        out["decode_span_seconds"] = round(span, 3)
        out["decode_images_per_second"] = round(total / span, 2)
    started, ended = stats.get("first_model_start"), stats.get("last_decode_end")
    if started is not None and ended is not None:
        # Positive: the model was already working while decode still had blocks to do.
        out["model_started_before_decode_ended_s"] = round(ended - started, 3)
    return out


class StreamStats:
    """Counters the decode actors and model actors report to (a tiny Ray actor per run)."""

    _SUMS = (
        "batches",
        "batches_with_images",
        "forwards",
        "images",
        "model_seconds",
        "prepare_seconds",
        "decode_seconds",
        "decode_blocks",
        "write_seconds",
    )

    def __init__(self):
        self.totals: dict[str, float] = dict.fromkeys(self._SUMS, 0)
        self.nodes: set[str] = set()
        self.actors: list[dict] = []
        self.first_model_start: float | None = None
        self.first_decode_start: float | None = None
        self.last_decode_end: float | None = None

    def add(
        self,
        node: str | None = None,
        actor: dict | None = None,
        model_start: float | None = None,
        decode_start: float | None = None,
        decode_end: float | None = None,
        **kw,
    ) -> None:
        if node:
            self.nodes.add(node)
        if actor is not None:
            self.actors.append(actor)
        if model_start is not None:
            self.first_model_start = min(self.first_model_start or model_start, model_start)
        if decode_start is not None:
            self.first_decode_start = min(self.first_decode_start or decode_start, decode_start)
        if decode_end is not None:
            self.last_decode_end = max(self.last_decode_end or decode_end, decode_end)
        for k, v in kw.items():
            self.totals[k] = self.totals.get(k, 0) + v

    def get(self) -> dict:
        return {
            **self.totals,
            "model_nodes": sorted(self.nodes),
            "model_actors": self.actors,
            "first_model_start": self.first_model_start,
            "first_decode_start": self.first_decode_start,
            "last_decode_end": self.last_decode_end,
        }
