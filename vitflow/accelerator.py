"""Is the GPU Ray handed us one that torch can use? Checked by each GPU model actor as it
starts, before it embeds anything.

Ray schedules GPU actors from the GPUs a node *advertises*; torch may still be unable to use
them (a driver older than the CUDA build needs, a container without the driver mounted). A
model actor that quietly fell back to the CPU would hold the GPU and run 50x slower while
the manifest said ``cuda``. So an actor whose device is not usable refuses to start, with
:func:`cuda_problem`'s sentence, and the job ends with it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

# Oldest Linux driver each CUDA major release runs on (minor-version compatibility), from
# NVIDIA's CUDA release notes (table "CUDA Toolkit and Minimum Required Driver Version").
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version on this machine, or None where there is none."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        m = re.search(
            r"Kernel Module\s+(?:for \S+\s+)?([0-9]+\.[0-9]+(?:\.[0-9]+)?)", proc.read_text()
        )
        if m:
            return m.group(1)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def cuda_report() -> dict[str, Any]:
    """What torch on this process's node can do with CUDA (runs where it is called)."""
    import os

    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": driver_version(),
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "available": False,
        "devices": [],
        "reason": None,
    }
    try:
        torch.cuda.init()
        report["available"] = torch.cuda.is_available()
        report["devices"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    except Exception as e:  # torch says why: no driver, driver too old, no device
        report["reason"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not report["available"] and not report["reason"]:
        report["reason"] = "torch.cuda.is_available() is False"
    return report


def cuda_problem(report: dict[str, Any], where: str = "this node") -> str | None:
    """One sentence saying why CUDA is unusable and what fixes it; None when it is usable."""
    if report.get("available"):
        return None
    cuda = report.get("torch_cuda")
    if not cuda:
        return (
            f"compute.device is cuda, but the torch on {where} ({report.get('torch')}) is a "
            "CPU-only build; install a CUDA build of torch there, or set compute.device: cpu"
        )
    major = int(str(cuda).split(".")[0])
    need = MIN_DRIVER.get(major)
    need_s = f"an NVIDIA driver >= {need}" if need else "a newer NVIDIA driver"
    has = report.get("driver")
    return (
        f"compute.device is cuda, but torch {report.get('torch')} (built for CUDA {cuda}) cannot "
        f"use the GPU on {where}: {report.get('reason')}. CUDA {major}.x needs {need_s}; "
        f"{where} has {'driver ' + has if has else 'no NVIDIA driver'}. Update the driver, "
        "install a torch build for the CUDA version the driver supports, or set "
        "compute.device: cpu"
    )
