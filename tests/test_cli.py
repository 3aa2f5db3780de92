"""The CLI through a subprocess, as a user runs it: one-liner embed, and errors that fail
fast with exit code 1 and one clear sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY
from vitflow.synthetic import make_image_folder

VITFLOW = [sys.executable, "-m", "vitflow.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def vitflow(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VITFLOW, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "images"
    make_image_folder(root, per_class=2, splits=("train",), with_bad_files=True)
    return root


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_one_liner_embeds_a_folder(images, tmp_path):
    out = tmp_path / "emb"
    r = vitflow(
        "embed",
        "--input",
        str(images),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--random-weights",
        "--set",
        "compute.batch_size=8",
        "--set",
        "features.0.pool=gem",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accounted for : 11 of 11 (every file has a row)" in r.stdout
    assert "errors        : 5" in r.stdout and str(out) in r.stdout
    df = pd.read_parquet(out)
    assert len(df) == 11 and len(df.loc[df.status == "ok", "emb"].iloc[0]) == 512
    # Existing output: refused, and nothing is touched.
    again = vitflow(
        "embed", "--input", str(images), "--output", str(out), "--model", "resnet18",
        "--random-weights",
    )
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_config_file_with_overrides_and_unknown_key(images, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"source:\n  uri: {images}\nmodel:\n  name: resnet18\noutput:\n  uri: {tmp_path / 'o'}\n"
        "compute:\n  batch_sise: 8\n"
    )
    r = vitflow("embed", str(cfg))
    assert r.returncode == 1
    assert r.stderr.startswith("error: invalid job config: unknown key 'compute.batch_sise'")
    assert "batch_size" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet1B"], "unknown timm model 'resnet1B'"),
        (
            ["--model", "resnet18", "--set", "features.0.layers=[9]"],
            "layer index 9 is out of range",
        ),
        (["--model", "resnet18", "--checkpoint", "/nonexistent/w.safetensors"], "does not exist"),
        (["--model", TINY["siglip"][0], "--set", "features.0.pool=cls"], "needs a CLS token"),
        (["--model", "resnet18", "--set", "features.0.pool=clss"], "features.0.pool"),
    ],
)
def test_job_errors_exit_1_with_one_sentence(images, tmp_path, args, message):
    r = vitflow("embed", "--input", str(images), "--output", str(tmp_path / "never"), *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_missing_source_folder(tmp_path):
    r = vitflow(
        "embed",
        "--input",
        str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "o"),
        "--model",
        "resnet18",
    )
    assert r.returncode == 1 and "source" in r.stderr and "does not exist" in r.stderr


def test_help_lists_the_shortcut_flags():
    r = vitflow("embed", "--help")
    assert r.returncode == 0
    for flag in (
        "--input",
        "--output",
        "--model",
        "--checkpoint",
        "--pretrained",
        "--random-weights",
        "--set",
        "--overwrite",
        "--address",
    ):
        assert flag in r.stdout
