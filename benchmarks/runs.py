"""The paths the benchmark cases share: the decode-bound ceiling, the bare model forward, and
``vitflow embed`` run end to end in a process of its own.

- :func:`decode_ceiling`: every core decoding with PIL and applying the model's exact timm
  eval transform (resize + crop; the tensor conversion and normalisation are the model's
  side in vitflow too) in a plain process pool, nothing else. The pool is started and
  warmed before the clock starts; the files are in the page cache for every path.
- :func:`forward_rate`: the model's forward on ready tensors (vitflow's FeatureExtractor
  with the default feature set, as in every path), on the CPU's cores or the GPU.
- :func:`run_vitflow`: ``python -m vitflow.cli embed JOB.yaml`` through
  ``benchmarks/driver.py``, timed from the parent: Python start-up and imports, model
  check, listing, Ray start-up and shutdown, the stream, the output check and manifest,
  all inside the timing, as a user waits for it. The manifest's ``timing`` says where the
  time went; the driver's peak RSS and Ray Data's logs are kept beside it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine import load
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("driver.py")

_PIL_STEPS: list = []

# The steady-state rate is reported only when the 10%..90% window spans this many batches.
MIN_STEADY_BATCHES = 8


def pil_steps(data_config: dict) -> list:
    """The PIL part of timm's eval transform (resize + crop), without ToTensor / Normalize."""
    from timm.data import create_transform

    tf = create_transform(**data_config, is_training=False)
    steps = []
    for t in tf.transforms:
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    return steps


def _init_decoder(data_config_json: str) -> None:
    _PIL_STEPS[:] = pil_steps(json.loads(data_config_json))


def _decode(path: str) -> int:
    img = Image.open(path).convert("RGB")
    for t in _PIL_STEPS:
        img = t(img)
    return np.asarray(img).shape[0]


def decode_ceiling(paths: list[Path], data_config: dict, procs: int) -> float:
    """Seconds for ``procs`` processes to decode + resize/crop every file (a warm pool)."""
    files = [str(p) for p in paths]
    with ProcessPoolExecutor(
        max_workers=procs, initializer=_init_decoder, initargs=(json.dumps(data_config),)
    ) as ex:
        list(ex.map(_decode, files[:procs] * 2))  # start and warm every worker, untimed
        t0 = time.perf_counter()
        list(ex.map(_decode, files, chunksize=4))
        return time.perf_counter() - t0


def forward_rate(
    model_name: str,
    *,
    batch_size: int,
    batches: int,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
) -> float:
    """Images/s of the bare forward on random tensors already on ``device`` (warmed up)."""
    import timm
    import torch

    from vitflow.backbone import data_config
    from vitflow.config import FeatureConfig
    from vitflow.features import FeatureExtractor

    if threads:
        torch.set_num_threads(threads)
    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    size = data_config(model)["input_size"]
    ext = FeatureExtractor(model, [FeatureConfig()], size).to(device)
    x = torch.randn(batch_size, *size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        for _ in range(2):
            ext(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            ext(x)["emb"].float().cpu()
        sync()
        seconds = time.perf_counter() - t0
    return batches * batch_size / seconds


@dataclass
class VitflowRun:
    """One ``vitflow embed`` run: its wall time from the parent, manifest and driver memory."""

    name: str
    seconds: float
    manifest: dict
    driver_peak_rss_mb: float | None
    folder: Path
    extra: dict = field(default_factory=dict)

    @property
    def timing(self) -> dict:
        return self.manifest.get("timing", {})

    @property
    def listed(self) -> int:
        return self.manifest["counts"]["listed"]

    @property
    def steady(self) -> float | None:
        """The manifest's steady-state rate (rows 10%..90% of the run), or None when the run
        had too few batches for it to mean anything: the two marks then fall on one or two
        batches' arrival and the "rate" is the gap between two receipts."""
        if self.batches_in_window < MIN_STEADY_BATCHES:
            return None
        return self.timing.get("steady_images_per_second")

    @property
    def batches_in_window(self) -> float:
        batch = self.actors.get("batch_size") or 1
        return 0.8 * self.listed / batch

    @property
    def decode_rate(self) -> float | None:
        """The decode stage's own rate (listed rows over its first-to-last block span)."""
        return self.timing.get("decode_images_per_second")

    @property
    def startup(self) -> dict:
        """The first model actor's start-up phases (seconds), from the manifest."""
        replicas = self.manifest.get("execution", {}).get("model_actors") or []
        ups = [r["startup"] for r in replicas if "startup" in r]
        return min(ups, key=lambda u: u.get("ready_at", 0)) if ups else {}

    @property
    def actors(self) -> dict:
        return self.manifest.get("execution", {}).get("actors") or {}

    def breakdown(self) -> str:
        """Where the time went, in one line (from the manifest's ``timing``)."""
        t, a = self.timing, self.actors

        def s(key):
            v = t.get(key)
            return "?" if v is None else f"{v:.1f}"

        busy = t.get("model_busy_share")
        overlap = t.get("model_started_before_decode_ended_s")
        parts = [
            f"listing {s('listing_seconds')} s",
            f"Ray start {s('ray_start_seconds')} s, of it waited for {s('ray_wait_seconds')} s",
            f"first result {s('first_result_seconds')} s",
            f"stream {s('stream_seconds')} s",
            f"decode {s('decode_seconds')} s (summed over actors)",
            f"decode stage {s('decode_images_per_second')} img/s over {s('decode_span_seconds')} s",
            f"model {s('model_seconds')} s",
            f"write {s('write_seconds')} s",
            f"verify {s('verify_seconds')} s",
            f"vitflow wall {s('wall_seconds')} s",
            f"model busy {'?' if busy is None else f'{100 * busy:.0f}%'}",
        ]
        if overlap is not None:
            parts.append(f"model started {overlap:.1f} s before decode ended")
        if a:
            parts.append(
                f"model ready {s('model_ready_seconds')} s after the stream began ("
                + ", ".join(
                    f"{k} {v:.1f}"
                    for k, v in self.startup.items()
                    if k.endswith("_s") and isinstance(v, (int, float))
                )
                + ")"
            )
            parts.append(
                f"{a.get('num_actors')} actor(s) x {a.get('num_cpus')} CPU / "
                f"{a.get('num_gpus')} GPU on {a.get('device')}, batch {a.get('batch_size')}, "
                f"{a.get('batches_in_flight', 1)} batch(es) in flight per actor, "
                f"{a.get('decode_tasks')} decode actor(s) x {a.get('decode_num_cpus')} CPU, "
                f"decode on {a.get('decode')}"
            )
        if self.driver_peak_rss_mb is not None:
            parts.append(f"driver peak RSS {self.driver_peak_rss_mb:.0f} MB")
        if self.steady is None and t.get("steady_images_per_second") is not None:
            parts.append(
                f"steady state not shown: {self.batches_in_window:.1f} batches between the "
                f"10% and 90% marks (fewer than {MIN_STEADY_BATCHES})"
            )
        if "load_before" in self.extra:
            parts.append(
                f"load avg {self.extra['load_before']} before, {self.extra['load_after']} after"
            )
        return "; ".join(parts)

    def details(self) -> dict:
        return {
            "seconds": round(self.seconds, 2),
            "timing": self.timing,
            "actors": self.actors,
            "counts": self.manifest.get("counts"),
            "driver_peak_rss_mb": self.driver_peak_rss_mb,
            "folder": str(self.folder),
            **self.extra,
        }


def run_vitflow(
    job: dict, *, work: Path, name: str, timeout_s: float = 3600, keep_output: bool = True
) -> VitflowRun:
    """Run ``vitflow embed`` on ``job`` (a config dict; ``output.uri`` is set here) in a process
    of its own, with its own Ray temp folder; keep its log, job file and Ray Data logs in
    ``work/name/``, and the embeddings too unless ``keep_output`` is false (then only their
    manifest stays)."""
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = {**job, "output": {**job.get("output", {}), "uri": str(folder / "embeddings")}}
    job_file = folder / "job.yaml"
    job_file.write_text(json.dumps(job, indent=2) + "\n")  # JSON is YAML
    peak_file = folder / "driver_peak.json"
    # A short path of its own: Ray's sockets live under it (unix socket paths are short), and
    # the processes of this run can be told from anyone else's Ray on the machine.
    ray_tmp = Path(tempfile.mkdtemp(prefix="vfb-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    # --verbose: a failure's log then holds its traceback (a borrowed GPU machine is seldom
    # there for a second try).
    cmd = [
        sys.executable,
        str(DRIVER),
        str(peak_file),
        "embed",
        str(job_file),
        "--overwrite",
        "--verbose",
    ]
    log = folder / "vitflow.log"
    print(f"  vitflow embed ({name}) ...", flush=True)
    load_before = load()
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException:
            _stop(proc, ray_tmp)
            raise
        seconds = time.perf_counter() - t0
    try:
        _stop(proc, ray_tmp)  # Ray shuts down with its driver; this only catches leftovers
        # Ray Data's logs are kept whatever happened: a failed run's are the ones wanted most.
        for logs in glob.glob(str(ray_tmp / "ray" / "session_*" / "logs" / "ray-data")):
            shutil.copytree(logs, folder / "ray-data", dirs_exist_ok=True)
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"vitflow embed ({name}) failed with exit code {rc}:\n{tail}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    manifest = json.loads((folder / "embeddings" / "_manifest.json").read_text())
    if not keep_output:
        for part in (folder / "embeddings").glob("*.parquet"):
            part.unlink()
    peak = json.loads(peak_file.read_text())["peak_rss_mb"] if peak_file.exists() else None
    extra = {"load_before": load_before, "load_after": load()}
    return VitflowRun(name, seconds, manifest, peak, folder, extra)


def _stop(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """Kill a driver that failed or ran out of time, and the Ray processes it started (the
    ones whose command line names this run's own Ray temp folder), by their ids."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if str(ray_tmp) in (pid_dir / "cmdline").read_bytes().decode(errors="ignore"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def wait_for_quiet(max_load: float, max_wait_s: float) -> None:
    """Wait (up to ``max_wait_s``) until the 1-minute load average is at most ``max_load``:
    other people's work skews every figure."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        print(f"  load average {os.getloadavg()[0]:.1f} > {max_load}: waiting ...", flush=True)
        time.sleep(30)
