"""Fault tolerance of the embed job: a model actor killed mid-run, the driver killed at random
points and resumed, and the error budget — each ending with every listed file exactly once
and vectors equal to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import TINY, output_progress, wait_until
from vitflow.config import load_config
from vitflow.embed import run_embed
from vitflow.errors import VitflowError
from vitflow.loading import load_embeddings
from vitflow.sinks import STAGING
from vitflow.synthetic import make_image_folder

pytestmark = pytest.mark.ray
NAME, KW = TINY["vit"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_image_folder(root / "images", per_class=8, size=(64, 48), with_bad_files=True)
    torch.manual_seed(2)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), root / "w.safetensors")
    return root


def job_dict(root: Path, out: Path, **compute) -> dict:
    return {
        "kind": "embed",
        "source": {"uri": str(root / "images")},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "w.safetensors")},
        "features": [{"name": "emb", "layers": 2, "pool": "mean"}, {"name": "cls", "pool": "cls"}],
        "output": {"uri": str(out), "rows_per_file": 6},
        "compute": {"batch_size": 4, **compute},
    }


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory, ray_local):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("clean") / "out"
    run_embed(load_config(base=job_dict(corpus, out)))
    return load_embeddings(str(out), include_errors=True).set_index("id").sort_index()


def assert_same_output(out, clean, storage_options=None) -> None:
    df = load_embeddings(str(out), include_errors=True, storage_options=storage_options)
    assert df["id"].is_unique
    df = df.set_index("id").sort_index()
    assert list(df.index) == list(clean.index)
    assert (df["status"] == clean["status"]).all()
    ok = df["status"] == "ok"
    for col in ("emb", "cls"):
        np.testing.assert_allclose(
            np.stack(df[col][ok]), np.stack(clean[col][ok]), rtol=1e-5, atol=1e-6
        )
    if storage_options is None:
        out = Path(out)
        assert not (out / STAGING).exists() and not list(out.glob("_tmp-*"))


@pytest.mark.timeout(300)
def test_model_actor_killed_mid_run(corpus, clean, ray_local, tmp_path):
    from ray.util.state import list_actors

    out = tmp_path / "out"
    killed: list[int] = []
    gcs = ray_local.get_runtime_context().gcs_address  # this test's cluster, not any other

    def kill_one_model_actor():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if out.exists() and any(out.rglob("*.parquet")):  # some batches are written: mid-stream
                for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")]):
                    if "EmbedWorker" in (a.class_name or "") and a.pid:
                        os.kill(a.pid, signal.SIGKILL)
                        killed.append(a.pid)
                        return
            time.sleep(0.05)

    t = threading.Thread(target=kill_one_model_actor, daemon=True)
    t.start()
    # Batches of 1 stretch the stream so the kill lands while work remains.
    run_embed(load_config(base=job_dict(corpus, out), overrides=["compute.batch_size=1"]))
    t.join(timeout=5)
    assert killed, "the model actor was never killed; the test did not exercise a failure"
    assert_same_output(out, clean)


@pytest.mark.timeout(600)
# Two strikes (seeded: after 4 and after 2 finished parts of ~9), one per store: each costs a full
# run and a resume, and the S3 one also covers the conditional-put lock.
@pytest.mark.parametrize("where, seed", [("local", 0), ("s3", 1)])
def test_driver_killed_mid_run_then_resume_equals_clean_run(
    corpus, clean, tmp_path, where, seed, request, ray_address
):
    """SIGKILL the driver's whole process group once the run has made a seeded amount of
    observable progress (parts finished, pieces staged), then --resume: the output equals an
    uninterrupted run. On local disk and on the S3 server alike."""
    import fsspec

    job = job_dict(corpus, tmp_path / "out", batch_size=1)
    if where == "s3":
        s3, bucket, endpoint = request.getfixturevalue("s3_bucket")
        job["output"]["uri"] = f"s3://{bucket}/out"
        job["storage"] = {"endpoint_url": endpoint}
        fs, out_path, opts = s3, f"{bucket}/out", {"endpoint_url": endpoint}
    else:
        fs, out_path, opts = fsspec.filesystem("file"), str(tmp_path / "out"), None
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address}
    cmd = [sys.executable, "-m", "vitflow.cli", "embed", str(cfg)]
    # Strike after 1..4 finished parts (of ~9), with pieces of the next one staged or not.
    want_parts = random.Random(seed).randint(1, 4)
    first = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: output_progress(fs, out_path)[1] >= want_parts or first.poll() is not None,
            timeout=240,
            what=f"{want_parts} finished parts",
        )
    finally:  # the driver's whole process group; its job's actors and tasks go with it
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    staged, parts, finished = output_progress(fs, out_path)
    assert not finished, "the run ended before the kill; the test did not interrupt it"
    job["compute"]["batch_size"] = 4  # batch size is not part of what a resume must match
    cfg.write_text(yaml.safe_dump(job))
    resumed = subprocess.run(
        [*cmd, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "every file has a row" in resumed.stdout
    assert_same_output(job["output"]["uri"], clean, storage_options=opts)
    assert output_progress(fs, out_path)[0] == 0  # no staging left behind


@pytest.mark.timeout(300)
def test_error_budget_aborts_resumably(corpus, ray_local, tmp_path):
    src = tmp_path / "mostly_bad"
    make_image_folder(src, classes=("a",), per_class=20, splits=None)
    for i in range(110):
        (src / "a" / f"empty{i:03d}.jpg").write_bytes(b"")
    base = job_dict(corpus, tmp_path / "out", max_error_fraction=0.2)
    base["source"]["uri"] = str(src)
    with pytest.raises(
        VitflowError, match=r"error budget exceeded: .*max_error_fraction=0.2.*--resume"
    ):
        run_embed(load_config(base=base))
    assert not (tmp_path / "out" / "_manifest.json").exists()
    # Raising the budget and resuming finishes the job; nothing is duplicated.
    res = run_embed(
        load_config(base=base, overrides=["compute.max_error_fraction=1.0"]), resume=True
    )
    assert (res.ok, res.error) == (20, 110)


@pytest.mark.timeout(300)
def test_resume_reuses_staged_batches_and_computes_only_the_rest(
    corpus, clean, ray_local, tmp_path
):
    """An interrupted run left part 1 wholly staged and part 2 half staged: --resume embeds
    exactly the unstaged half of part 2 and ends equal to the clean run."""

    import pyarrow.parquet as pq

    from vitflow.embed import RUN_STATE, prepare_embed, run_state
    from vitflow.sinks import part_file

    out = tmp_path / "out"
    cfg = load_config(base=job_dict(corpus, out))
    run_embed(cfg)
    (out / "_manifest.json").unlink()
    staging = out / STAGING
    staging.mkdir()
    whole = pq.read_table(out / part_file(1))
    pq.write_table(whole, staging / "part-00001-aaaa.parquet")
    half = pq.read_table(out / part_file(2))
    pq.write_table(half.slice(0, 3), staging / "part-00002-bbbb.parquet")
    (out / part_file(1)).unlink()
    (out / part_file(2)).unlink()
    plan = prepare_embed(cfg, check_output=False)
    (out / RUN_STATE).write_bytes(run_state(plan))
    res = run_embed(cfg, resume=True)
    assert res.manifest["execution"]["images"] <= half.num_rows - 3  # not part 1, not staged rows
    assert res.manifest["execution"]["batches"] >= 1
    assert res.resumed_parts == res.listed // 6 + (res.listed % 6 > 0) - 2
    assert_same_output(out, clean)
