"""What the benchmarks print about the machine they ran on (shared by every script here)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on: a container's or taskset's share, not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name(gpu_used: bool) -> str:
    if not torch.cuda.is_available():
        return "none"
    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return gpu + ("" if gpu_used else " (not used)")


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def version(package: str) -> str:
    """An installed package's version, without importing it (Ray's import is slow)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def commit() -> str:
    """The vitflow checkout's commit, with "+changes" when the work tree differs from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def describe(gpu_used: bool) -> str:
    """Cores, CPU model, memory, torch and Ray versions, torch threads, the GPU (or none)."""
    mem = memory_gib()
    return (
        f"{usable_cores()} cores ({cpu_model()}), "
        f"{'?' if mem is None else f'{mem:.0f}'} GiB, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads in this process, ray {version('ray')}, "
        f"GPU: {gpu_name(gpu_used)}"
    )


def snapshot(gpu_used: bool) -> dict:
    """The same facts as :func:`describe`, for the JSON results."""
    mem = memory_gib()
    return {
        "cores": usable_cores(),
        "cpu": cpu_model(),
        "memory_gib": None if mem is None else round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": version("ray"),
        "timm": version("timm"),
        "pillow": version("pillow"),
        "gpu": gpu_name(gpu_used),
        "vitflow_commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def load() -> str:
    # Other processes on the machine skew every number; the load average shows whether any ran
    # (on a machine with C cores, a 1-minute load well above C means others were running).
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
