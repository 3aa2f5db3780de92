"""`vitflow submit` against a real single-node cluster started with `ray start --head` on
127.0.0.1 with token authentication; the test stops only the cluster it started."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import TINY, free_port, kill_processes_under
from vitflow.synthetic import make_image_folder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    base = tmp_path_factory.mktemp("head")
    home = base / "home"
    home.mkdir()
    temp_dir = Path("/tmp") / f"vitflow-head-{os.getpid()}"
    token = secrets.token_hex(32)
    port, dash = free_port(), free_port()
    # The cluster's `python` is this venv's, as on a node whose image has vitflow's deps.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": path,
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
            # Own agent ports: the session's other local Ray holds the default ones, and a
            # head whose job agent cannot bind never accepts a submission.
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without a token): it is up
                break
            except OSError:
                time.sleep(1)
        yield url, token, home, env
    finally:
        kill_processes_under(temp_dir)


def _vitflow(args, env, timeout=360):
    return subprocess.run(
        [sys.executable, "-m", "vitflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_runs_a_real_embed_job(head, tmp_path):
    url, token, home, env = head
    make_image_folder(tmp_path / "images", per_class=2, splits=("train",), with_bad_files=True)
    name, kw = TINY["vit"]
    job = {
        "source": {"uri": str(tmp_path / "images")},
        "model": {"name": name, "kwargs": kw, "weights": "random"},
        "output": {"uri": str(tmp_path / "out")},
        "compute": {"batch_size": 4},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    r = _vitflow(
        [
            "submit",
            str(tmp_path / "job.yaml"),
            "--address",
            url,
            "--wait",
            "--set",
            "features.0.pool=cls",
        ],
        env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "SUCCEEDED" in r.stdout and "every file has a row" in r.stdout
    assert token not in r.stdout + r.stderr
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 11 and (df.status == "ok").sum() == 6
    listed = _vitflow(["jobs", "list", "--address", url], env)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout


def test_submission_without_the_token_is_refused(head, tmp_path):
    url, token, home, env = head
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "source": {"uri": str(tmp_path)},
                "model": {"name": "resnet18"},
                "output": {"uri": str(tmp_path / "o")},
            }
        )
    )
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    r = _vitflow(["submit", str(tmp_path / "job.yaml"), "--address", url], no_token)
    assert r.returncode == 1
    assert "requires a token" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 64}
    r = _vitflow(["submit", str(tmp_path / "job.yaml"), "--address", url], wrong)
    assert r.returncode == 1 and "rejected the token" in r.stderr
    assert "0" * 64 not in r.stderr
