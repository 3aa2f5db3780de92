"""Starting or attaching to Ray, and sizing the model actor pool from the cluster.

Sizing rules (each overridable in ``compute:``):

- GPUs in the cluster: one actor per GPU, ``num_gpus=1`` each, 1 CPU each; decode runs as
  CPU actors on the remaining cores.
- CPU only: one actor per 8 cores of the cluster (at least one). On a small node (<= 4
  cores) an actor reserves only half a CPU, so Ray always has whole CPUs left for the
  read+decode actors: an actor that reserves a whole core on a 2-core machine can starve
  decode and stall the pipeline. torch inside the actor still uses the node's cores
  (``torch_threads``), since Ray would otherwise pin it to its reservation.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

from vitflow.config import ComputeConfig
from vitflow.errors import ConfigError

log = logging.getLogger(__name__)

CPUS_PER_CPU_ACTOR = 8
SMALL_NODE_CPUS = 4


@dataclass(frozen=True)
class ActorPlan:
    """How the model actor pool and the decode actors beside it are laid out."""

    num_actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str  # "cuda" | "cpu"
    batch_size: int = 32  # images per forward pass
    decode_tasks: int = 1  # decode actors (blocks decoded at once), cluster-wide
    decode_num_cpus: float = 1.0  # CPUs each decode actor reserves
    decode: str = "cpu"  # where images are decoded: "cpu" tasks | "gpu" in the actors
    batches_in_flight: int = 1  # batches a model actor works on at once (see stages)


# Images per forward pass when compute.batch_size is not set: what fits a 24 GB card with
# room to spare, by model size (activations grow with width and tokens, roughly with params).
_GPU_BATCH = ((100e6, 256), (400e6, 128), (float("inf"), 64))
CPU_BATCH = 32


def default_batch_size(device: str, model_params: int | None) -> int:
    if device != "cuda":
        return CPU_BATCH
    params = model_params or 0
    return next(b for limit, b in _GPU_BATCH if params < limit)


def plan_actors(
    cluster: dict[str, float],
    node_cpus: float,
    compute: ComputeConfig,
    model_params: int | None = None,
) -> ActorPlan:
    """Size the actor pool and the decode actors from ``ray.cluster_resources()`` and the
    largest node's CPU count."""
    plan = _plan_pool(cluster, node_cpus, compute)
    return _with_decode(plan, float(cluster.get("CPU", 0)), compute, model_params)


def _with_decode(
    plan: ActorPlan, cpus: float, compute: ComputeConfig, model_params: int | None
) -> ActorPlan:
    """Decode beside the model actors. Decode actors never take the CPUs the model actors
    reserve (they would keep them pending, as measured on an H200 node). On CPU-only clusters
    every core runs a decode actor, with fractional reservations beside the model actors (one
    whole CPU each left room for a single one on a 2-core node); with GPUs one takes a CPU."""
    free = max(0.0, cpus - plan.num_actors * plan.num_cpus)
    if compute.decode_num_cpus is not None:
        per_task = compute.decode_num_cpus
        tasks = max(1, int(free // per_task))
    elif plan.device == "cpu":
        tasks = max(1, int(cpus))
        per_task = max(0.05, round(free / tasks, 3)) if free > 0 else 0.05
    else:
        tasks = max(1, int(free))
        per_task = 1.0
    decode = compute.decode
    if decode == "auto":
        decode = "gpu" if plan.device == "cuda" else "cpu"
    elif decode == "gpu" and plan.device != "cuda":
        log.warning(
            "compute.decode is gpu but the model actors run on the CPU: decoding in CPU tasks"
        )
        decode = "cpu"
    batch = compute.batch_size or default_batch_size(plan.device, model_params)
    # On a GPU the host's work for a batch (copy or decode) can run beside the device's
    # forward of the one before; on the CPU the forward already uses every thread.
    in_flight = compute.batches_in_flight or (2 if plan.device == "cuda" else 1)
    return replace(
        plan,
        batch_size=batch,
        decode_tasks=tasks,
        decode_num_cpus=per_task,
        decode=decode,
        batches_in_flight=in_flight,
    )


def _plan_pool(cluster: dict[str, float], node_cpus: float, compute: ComputeConfig) -> ActorPlan:
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    # An autoscaling cluster may start with no workers: with device cuda and an explicit
    # num_actors the pool is planned as asked, and Ray's autoscaler adds the GPU (and
    # decode CPU) nodes the pending actors and tasks request.
    autoscale = compute.device == "cuda" and compute.num_actors is not None
    if cpus <= 0 and not autoscale:
        raise ConfigError(
            "the Ray cluster reports no CPUs, so decode actors cannot run; on an autoscaling "
            "cluster that is still at zero workers set compute.device: cuda and "
            "compute.num_actors so vitflow requests the nodes instead of measuring them"
        )
    # An explicit num_gpus_per_actor: 0 asks for CPU actors even on a GPU cluster.
    use_gpu = compute.device == "cuda" or (
        compute.device == "auto" and gpus > 0 and compute.num_gpus_per_actor != 0
    )
    if compute.device == "cuda" and gpus == 0 and not autoscale:
        raise ConfigError(
            "compute.device is cuda, but the Ray cluster has no GPUs; use auto or cpu, or set "
            "compute.num_actors to have an autoscaling cluster add GPU nodes"
        )
    if compute.device == "cuda" and compute.num_gpus_per_actor == 0:
        raise ConfigError(
            "compute.device is cuda but compute.num_gpus_per_actor is 0, so the actors would "
            "get no GPU; leave num_gpus_per_actor unset or use a fraction such as 0.5"
        )
    if compute.precision == "fp16" and not use_gpu:
        raise ConfigError("compute.precision fp16 needs CUDA; on CPU use bf16 or fp32")
    if use_gpu:
        per_gpu = 1.0 if compute.num_gpus_per_actor is None else compute.num_gpus_per_actor
        n = compute.num_actors or max(1, int(gpus // per_gpu) if per_gpu > 0 else 1)
        num_cpus = compute.actor_num_cpus or 1.0
        threads = compute.torch_threads or max(1, int(max(node_cpus, 1) // max(1, n)))
        if gpus < n * per_gpu:
            log.warning(
                "planning %d GPU actors on %s GPUs now: waiting for the autoscaler", n, gpus
            )
        return ActorPlan(n, num_cpus, per_gpu, threads, "cuda")
    if compute.num_gpus_per_actor:
        raise ConfigError(
            f"compute.num_gpus_per_actor is {compute.num_gpus_per_actor}, but the Ray cluster "
            "has no GPUs (the actors would never start); leave it unset on CPU clusters"
        )
    n = compute.num_actors or max(1, int(cpus // CPUS_PER_CPU_ACTOR))
    per_node = max(1, math.ceil(n * node_cpus / cpus))
    if compute.actor_num_cpus is not None:
        num_cpus = compute.actor_num_cpus
    else:
        # Small node: half a CPU; larger: half the node's cores go to its actors'
        # reservations, half stay for decode.
        num_cpus = 0.5 if node_cpus <= SMALL_NODE_CPUS else max(0.5, node_cpus / per_node / 2)
        # Whatever the size, one decode actor must still fit beside the node's actors, or the
        # pipeline stalls with nothing to feed them. An actor may reserve 0 CPUs in Ray.
        room = max(0.0, (node_cpus - (compute.decode_num_cpus or 0.5)) / per_node)
        num_cpus = min(num_cpus, room)
    threads = compute.torch_threads or max(1, int(node_cpus // per_node))
    return ActorPlan(n, num_cpus, 0.0, threads, "cpu")


def plan_pool(ray, compute: ComputeConfig, model_params: int | None = None) -> ActorPlan:
    """Size the model actor pool on the connected cluster.

    Whether torch can use the GPU Ray hands out is checked by each GPU model actor as it
    starts (:mod:`vitflow.accelerator`), not by a probe task first: a probe holds the GPU
    the model actor then waits for, and on a GPU node it put its own worker start-up, torch
    import and CUDA initialisation (several seconds) in front of the model actor's."""
    actors = plan_actors(ray.cluster_resources(), largest_node_cpus(), compute, model_params)
    log.info("actor plan: %s", actors)
    return actors


def _object_store_bytes() -> int:
    # Ray's default is 30% of RAM; embedding batches are small, so cap it for laptops.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 2 << 30
    return int(min(0.3 * total, 8 << 30))


@contextmanager
def ray_session(address: str | None = None, num_cpus: float | None = None):
    """Use the Ray already initialised in this process, attach to ``address``, or start one.

    A Ray started here is sized by Ray's own (container-aware) detection unless ``num_cpus``
    says otherwise, and is shut down on exit; one that was running already is left alone.
    A start begun by :func:`ray_starting` is taken over: waited for, and shut down on exit.
    """
    global _starting, _start_timing
    import ray

    start, _starting = _starting, None
    if start is None and ray.is_initialized():
        yield ray
        return
    t = time.perf_counter()
    try:
        if start is not None:
            start.wait()  # an interrupt here still shuts the started Ray down (finally)
            took = start.ended - start.began
        else:
            _init(ray, address, num_cpus)
            took = time.perf_counter() - t
        # ray_wait_seconds < ray_start_seconds: the start overlapped the driver's checks.
        _start_timing = {
            "ray_start_seconds": round(took, 3),
            "ray_wait_seconds": round(time.perf_counter() - t, 3),
        }
        yield ray
    finally:
        if start is not None:
            start.close()
        elif ray.is_initialized():
            ray.shutdown()


def _init(ray, address: str | None, num_cpus: float | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers of Ray Jobs
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # No num_cpus: Ray's own detection reads the container's CPU quota, where
        # os.cpu_count() would report every core of the host.
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=_object_store_bytes(),
            logging_level=logging.WARNING,
        )


class _RayStart:
    """``ray.init`` on a thread of its own (see :func:`ray_starting`).

    What Ray logs while it starts is held back: shown when a stream takes the started Ray
    over, dropped when the job is refused before it (its one-sentence error is then all
    the user sees)."""

    def __init__(self, address: str | None, num_cpus: float | None):
        import ray  # here, not on the thread: see ray_starting

        self.ray, self.error = ray, None
        self.ready, self.released = threading.Event(), threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(address, num_cpus), name="vitflow-ray-start", daemon=True
        )
        self.held = _HoldRecords()
        self.handlers = list(logging.getLogger("ray").handlers)
        for h in self.handlers:
            h.addFilter(self.held)
        self.thread.start()

    def _run(self, address, num_cpus) -> None:
        self.held.thread_id = threading.get_ident()
        self.began = time.perf_counter()
        try:
            _init(self.ray, address, num_cpus)
        except BaseException as e:  # handed to the main thread by wait()
            self.error = e
        finally:
            self.ended = time.perf_counter()
            self.ready.set()
        # Ray starts its node's processes with PR_SET_PDEATHSIG, which fires when the
        # *thread* that started them ends: this thread lives as long as the Ray it started.
        self.released.wait()

    def _stop_holding(self, show: bool) -> None:
        for h in self.handlers:
            h.removeFilter(self.held)
        held, self.held.records = self.held.records, []
        for record in held if show else ():
            for h in self.handlers:
                if record.levelno >= h.level:
                    h.handle(record)

    def wait(self) -> None:
        """Wait until Ray is up (raising its start's error) and take it over."""
        self.ready.wait()
        self._stop_holding(show=True)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Shut the started Ray down (the job stopped before its stream, or its session
        ended), then let the thread go."""
        self.ready.wait()
        self._stop_holding(show=False)
        try:
            if self.error is None:
                self.ray.shutdown()
        finally:
            self.released.set()
            self.thread.join()


class _HoldRecords(logging.Filter):
    """Keeps the start thread's records back from Ray's handlers (see :class:`_RayStart`);
    the warning that no SIGTERM handler is set is dropped (ray_starting sets one)."""

    def __init__(self):
        super().__init__()
        self.thread_id: int | None = None
        self.records: list[logging.LogRecord] = []
        # ray_starting sets a SIGTERM handler itself where it runs on the main thread
        self.drop_sigterm_note = threading.current_thread() is threading.main_thread()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread_id:
            return True
        dropped = self.drop_sigterm_note and "SIGTERM handler is not set" in record.getMessage()
        if not dropped and record not in self.records:
            self.records.append(record)
        return False


_starting: _RayStart | None = None
_start_timing: dict[str, float] = {}


def take_start_timing() -> dict[str, float]:
    """How long the latest Ray start took and how long the driver then waited for it, once
    (the stream that follows the start reports it; later streams of the session do not)."""
    global _start_timing
    timing, _start_timing = _start_timing, {}
    return timing


@contextmanager
def ray_starting(address: str | None = None, num_cpus: float | None = None):
    """Start Ray on a thread while the driver checks the job, so that the two overlap.

    Before its stream the driver imports torch and timm, builds the model and lists the
    source (about 8 s on a 2-core machine), and a local Ray takes about 6 s to start: one
    after the other they were the largest fixed cost of a short run. Inside this block Ray
    starts beside that work; the first :func:`ray_session` takes the started Ray over
    (and shuts it down at its end). If the block ends without one (the job was refused
    before its stream), the start is waited for and Ray shut down again.

    Nothing is started where Ray is initialised already (a notebook's, the test suite's)
    or where ``VITFLOW_EARLY_RAY=0``. ``ray`` itself is imported on the calling thread:
    imports on two threads at once can deadlock on a package both of them import.
    """
    global _starting
    if (
        os.environ.get("VITFLOW_EARLY_RAY", "1") == "0"
        or _starting is not None
        or ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    ):
        yield
        return
    if threading.current_thread() is threading.main_thread():
        # What ray.init does on the main thread, which it cannot do from another one: a
        # SIGTERM ends the driver through sys.exit, so Ray's atexit shutdown runs.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    start = _starting = _RayStart(address, num_cpus)
    try:
        yield
    finally:
        if _starting is start:  # no stream claimed it
            _starting = None
            start.close()


def local_resources(num_cpus: float | None = None) -> dict[str, float]:
    """What a local Ray started here would report, found without starting it (for
    ``--dry-run``): Ray's container-aware CPU count and the GPUs torch can see."""
    from ray._private.utils import get_num_cpus

    cpus = float(num_cpus) if num_cpus else float(get_num_cpus())
    gpus = 0.0
    try:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    except Exception:  # a broken CUDA setup: Ray would not see a usable GPU either
        gpus = 0.0
    return {"CPU": cpus, "GPU": gpus}


def largest_node_cpus() -> float:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return max((float(n["Resources"].get("CPU", 0)) for n in alive), default=1.0)
