"""Shared fixtures: tiny timm models (pretrained=False) and one local Ray for the session."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tiny configurations of each supported family: (timm name, create_model kwargs).
TINY = {
    "vit": ("vit_small_patch16_224", dict(img_size=32, embed_dim=32, depth=4, num_heads=2)),
    "dinov2_reg": (
        "vit_small_patch14_reg4_dinov2.lvd142m",
        dict(img_size=28, embed_dim=32, depth=4, num_heads=2),
    ),
    "clip": (
        "vit_base_patch32_clip_224.openai",
        dict(img_size=64, embed_dim=32, depth=3, num_heads=2),
    ),
    "siglip": (
        "vit_base_patch16_siglip_224.v2_webli",
        dict(img_size=32, embed_dim=32, depth=3, num_heads=2),
    ),
    "mae": ("vit_base_patch16_224.mae", dict(img_size=32, embed_dim=32, depth=3, num_heads=2)),
    "resnet": ("resnet18", {}),
}


@pytest.fixture(scope="module")
def one_openmp_thread():
    """OpenMP (scikit-learn's t-SNE) on one thread for a module's tests. On a busy 2-core
    machine (tests running beside others) libgomp's spin-waiting made a 60-row t-SNE take
    ~27 s on two threads and ~1 s on one. The limit reaches only the OpenMP runtimes loaded
    when it is set, so t-SNE's own module is imported first."""
    from threadpoolctl import threadpool_limits

    with contextlib.suppress(ImportError):
        import sklearn.manifold  # noqa: F401  (loads scikit-learn's OpenMP runtime)
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The shared local Ray's address, for CLI runs in subprocesses: attaching takes a
    fraction of a second where starting a Ray of their own takes ~10 s on 2 cores. A driver
    killed by a test takes its job's actors and tasks with it."""
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, small object store) shared by the tests that need it."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


# Dummy credentials for the local S3 server, set before any Ray starts so workers inherit
# them. The secret is distinctive so tests can prove it never reaches output or logs.
S3_KEY = "vitflow-test-key"
S3_SECRET = "vitflow-test-secret-9f3b7c"
os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def serving(cmd: list[str], port: int):
    """Run a local server process until the block ends; yields its http://127.0.0.1 URL."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto's server mode) in a child process."""
    import sys

    port = free_port()
    with serving(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port
    ) as url:
        yield url


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (s3fs filesystem, bucket name, endpoint)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    name = f"vitflow-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return fs, name, s3_endpoint


def kill_processes_under(marker) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (a Ray temp dir a test
    gave its own cluster), so a test stops exactly what it started — never `ray stop`."""
    import signal
    from pathlib import Path

    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if str(marker) in (pid_dir / "cmdline").read_bytes().decode(errors="ignore"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def kill_run(proc, ray_tmp) -> None:
    """Kill a driver started with ``start_new_session=True`` and the Ray it started."""
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kill_processes_under(ray_tmp)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout} s for {what}")


def output_progress(fs, out: str) -> tuple[int, int, bool]:
    """``(staged pieces, finished parts, manifest written)`` of an embed output on any fsspec
    filesystem: what a fault test watches to strike mid-run, not after a fixed time."""
    import posixpath
    import re

    fs.invalidate_cache(out)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(out, detail=False)]
    except FileNotFoundError:
        return 0, 0, False
    try:
        fs.invalidate_cache(posixpath.join(out, "_staging"))
        staged = len(fs.ls(posixpath.join(out, "_staging"), detail=False))
    except FileNotFoundError:
        staged = 0
    parts = sum(bool(re.match(r"^part-\d{5,}\.parquet$", n)) for n in names)
    return staged, parts, "_manifest.json" in names
