"""The CLI through a subprocess, as a user runs it: one-liner embed, and errors that fail
fast with exit code 1 and one clear sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY
from vitflow.synthetic import make_image_folder

VITFLOW = [sys.executable, "-m", "vitflow.cli"]


def cli_env() -> dict[str, str]:
    """The environment at call time, not import time: the shared test Ray sets
    RAY_AUTH_MODE=token in this process when it starts, and a subprocess attaching to it
    needs that too (on a fresh machine nothing else says the cluster wants the token)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def vitflow(
    *args: str, timeout: int = 60, address: str | None = None
) -> subprocess.CompletedProcess:
    env = cli_env()
    if address:
        env["RAY_ADDRESS"] = address  # attach to the shared test Ray
    return subprocess.run(
        [*VITFLOW, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "images"
    make_image_folder(root, per_class=2, splits=("train",), with_bad_files=True)
    # Phone formats are embedded; a file of an unknown kind is counted, never silently dropped.
    from PIL import Image

    photo = Image.new("RGB", (40, 30), (200, 40, 90))
    photo.save(root / "train" / "cat" / "phone.avif", quality=90)
    import pillow_heif

    pillow_heif.register_heif_opener()
    photo.save(root / "train" / "dog" / "phone.heic", quality=90)
    (root / "train" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_one_liner_embeds_a_folder(images, tmp_path, ray_address):
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
        address=ray_address,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accounted for : 13 of 13 (every file has a row)" in r.stdout
    assert "errors        : 5" in r.stdout and str(out) in r.stdout
    assert "skipped       : 1 (.txt 1), hidden: 0" in r.stdout
    assert "weights       : random (seeded random init" in r.stdout
    df = pd.read_parquet(out)
    assert len(df) == 13 and len(df.loc[df.status == "ok", "emb"].iloc[0]) == 512
    phones = df[df.path.str.endswith(("phone.avif", "phone.heic"))]
    assert list(phones.status) == ["ok", "ok"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["listing"]["skipped"] == {"by_extension": {".txt": 1}, "hidden": 0}
    assert manifest["listing"]["by_extension"][".heic"] == 1
    assert manifest["model"]["weights"] == "random"
    (actor,) = manifest["execution"]["model_actors"]
    assert actor["device"] == "cpu" and actor["torch_threads"] >= 1
    # Existing output: refused, and nothing is touched.
    again = vitflow(
        "embed",
        "--input",
        str(images),
        "--output",
        str(out),
        "--model",
        "resnet18",
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
        (["--model", "resnet18"], "no weights given for 'resnet18'"),
        (["--model", "resnet18", "--pretrained", "--random-weights"], "contradict"),
        (["--model", "resnet18", "--set", "compute.batch_size=[1"], "is not valid YAML"),
    ],
)
def test_job_errors_exit_1_with_one_sentence(images, tmp_path, args, message):
    if "--checkpoint" not in args and "weights" not in message:
        args = [*args, "--random-weights"]
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
        "--random-weights",
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


def test_dry_run_checks_and_describes_the_job_and_starts_nothing(images, tmp_path):
    out = tmp_path / "never"
    r = vitflow(
        "embed",
        "--input",
        str(images),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--random-weights",
        "--dry-run",
        "--set",
        "output.rows_per_file=5",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "nothing started" in text
    assert "listed    : 13 files (" in text and ".heic 1" in text and ".avif 1" in text
    assert "skipped   : 1 (.txt 1), hidden: 0" in text
    assert "labels    : 3 (cat 8, dog 3, fox 2)" in text and "splits    : train 13" in text
    assert "weights   : random" in text and "emb [512]" in text
    assert "actors    : 1 x cpu" in text
    assert "3 part(s) of up to 5 rows" in text
    assert not out.exists()  # nothing written


def test_dry_run_still_refuses_a_bad_job(images, tmp_path):
    r = vitflow(
        "embed",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "o"),
        "--model",
        "resnet18",
        "--dry-run",
    )
    assert r.returncode == 1 and "no weights given" in r.stderr


def test_schema_prints_the_job_files_json_schema():
    r = vitflow("schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert {"source", "model", "output"} <= set(schema["required"])
    model = schema["$defs"]["ModelConfig"]
    assert model["additionalProperties"] is False
    assert model["properties"]["weights"]["anyOf"][0]["enum"] == ["hub", "random"]
    train = json.loads(vitflow("schema", "train").stdout)
    assert "method" in train["properties"]
    bad = vitflow("schema", "nope")
    assert bad.returncode == 1 and "unknown job kind" in bad.stderr


def test_reindex_dry_run_shows_the_diff_and_commits_nothing(images, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"kind: reindex\nsource:\n  uri: {images}\nmodel:\n  name: resnet18\n  weights: random\n"
        f"output:\n  uri: {tmp_path / 'index'}\n"
    )
    r = vitflow("reindex", str(job), "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vitflow reindex --dry-run" in r.stdout
    assert "index     : version None -> 13 added, 0 updated, 0 deleted, 0 unchanged" in r.stdout
    assert not (tmp_path / "index" / "_delta_log").exists()
