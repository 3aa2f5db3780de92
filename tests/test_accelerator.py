"""GPU actors never fall back to the CPU in silence: when Ray hands out a GPU that torch cannot
use, the job stops before any work with the driver it needs. And the local Ray vitflow
starts is sized by Ray's own detection unless the job says otherwise.

This machine has no GPU, so the cluster *advertises* one (``ray.init(num_gpus=1)``): Ray
schedules GPU actors on it exactly as on a node whose driver is too old for torch's CUDA.
Each case runs in its own process, which starts (and stops) its own Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from vitflow.accelerator import MIN_DRIVER, cuda_problem, cuda_report
from vitflow.synthetic import make_image_folder

NAME, KW = TINY["vit"]


def run_script(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    torch.version.cuda is None or torch.cuda.is_available(),
    reason="needs a CUDA build of torch that cannot use a GPU (a CPU-only build, or a working "
    "GPU, tests something else)",
)
def test_cuda_planned_but_unusable_is_refused_before_any_work(tmp_path):
    make_image_folder(tmp_path / "images", per_class=1, splits=("train",))
    torch.manual_seed(0)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), tmp_path / "w.safetensors")
    job = {
        "source": {"uri": str(tmp_path / "images")},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(tmp_path / "w.safetensors")},
        "output": {"uri": str(tmp_path / "out")},
        "compute": {"device": "cuda", "batch_size": 2},
    }
    r = run_script(
        f"""
        import json, ray
        from vitflow.config import load_config
        from vitflow.embed import run_embed
        from vitflow.errors import ConfigError
        ray.init(num_cpus=2, num_gpus=1, object_store_memory=200 * 2**20, log_to_driver=False)
        try:
            run_embed(load_config(base=json.loads({json.dumps(json.dumps(job))})))
            print("RAN")
        except ConfigError as e:
            print("REFUSED:", e)
        finally:
            ray.shutdown()
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith(("REFUSED", "RAN")))
    assert line.startswith("REFUSED"), line
    assert "cannot use the GPU" in line and "compute.device: cpu" in line
    assert f"built for CUDA {torch.version.cuda}" in line
    assert MIN_DRIVER[int(torch.version.cuda.split(".")[0])] in line  # the driver it needs
    # Stopped before any work: no part, no staging, no manifest.
    out = tmp_path / "out"
    assert not out.exists() or not any(
        p.name.startswith(("part-", "_manifest")) for p in out.iterdir()
    )


def test_cuda_report_on_this_machine_says_why_not():
    report = cuda_report()
    assert report["available"] is torch.cuda.is_available()
    if not report["available"]:
        assert report["reason"]
        msg = cuda_problem(report)
        assert msg and "compute.device: cpu" in msg
        if torch.version.cuda:  # a CUDA build: the message gives torch's own reason
            assert report["reason"] in msg
        else:
            assert "CPU-only build" in msg
    else:
        assert cuda_problem(report) is None


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_local_ray_uses_rays_detection_unless_the_job_sets_it():
    r = run_script(
        """
        from ray._private.utils import get_num_cpus
        from vitflow.runtime import local_resources, ray_session
        with ray_session() as ray:
            auto = ray.cluster_resources()["CPU"]
        with ray_session(num_cpus=1) as ray:
            one = ray.cluster_resources()["CPU"]
        print(auto, get_num_cpus(), one, local_resources(3)["CPU"])
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    auto, detected, one, planned = map(float, r.stdout.split()[-4:])
    assert auto == detected and one == 1.0 and planned == 3.0
