"""What the benchmarks print about the machine they ran on (shared by every script here)."""

from __future__ import annotations

import os
import platform
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


def describe(gpu_used: bool) -> str:
    """Cores, CPU model, torch version and threads, and the GPU (or none)."""
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        gpu += "" if gpu_used else " (not used)"
    else:
        gpu = "none"
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads in this process, GPU: {gpu}"
    )


def load() -> str:
    # Other processes on the machine skew every number; the load average shows whether any ran.
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
