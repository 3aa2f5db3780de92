"""Object storage through a real S3-compatible server (moto in server mode on 127.0.0.1):
s3 -> s3 embedding equals the local run, credentials stay out of output and logs, and
transient failures injected by a proxy are retried."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import S3_SECRET, TINY, free_port, serving
from vitflow.config import load_config
from vitflow.embed import run_embed
from vitflow.loading import load_embeddings
from vitflow.synthetic import make_image_folder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
NAME, KW = TINY["vit"]


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3corpus")
    make_image_folder(root / "images", per_class=3, with_bad_files=True)
    torch.manual_seed(1)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), root / "w.safetensors")
    return root


def job(src: str, out: str, ckpt: str, endpoint: str | None = None, **storage):
    base = {
        "source": {"uri": src},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": ckpt},
        "features": [{"name": "emb", "layers": 2, "pool": "cls_mean"}],
        "output": {"uri": out, "rows_per_file": 8},
        "compute": {"batch_size": 4},
    }
    if endpoint:
        base["storage"] = {"endpoint_url": endpoint, **storage}
    return load_config(base=base)


def test_s3_to_s3_equals_local_run(local_corpus, s3_bucket, ray_local, tmp_path):
    fs, bucket, endpoint = s3_bucket
    fs.put(str(local_corpus / "images"), f"{bucket}/corpus/images", recursive=True)
    fs.put(str(local_corpus / "w.safetensors"), f"{bucket}/models/w.safetensors")
    remote = run_embed(
        job(
            f"s3://{bucket}/corpus/images",
            f"s3://{bucket}/emb",
            f"s3://{bucket}/models/w.safetensors",
            endpoint,
        )
    )
    local = run_embed(
        job(
            str(local_corpus / "images"), str(tmp_path / "emb"), str(local_corpus / "w.safetensors")
        )
    )
    assert (remote.ok, remote.error) == (local.ok, local.error) and remote.error == 5
    r = (
        load_embeddings(
            f"s3://{bucket}/emb", include_errors=True, storage_options={"endpoint_url": endpoint}
        )
        .set_index("id")
        .sort_index()
    )
    loc = load_embeddings(str(tmp_path / "emb"), include_errors=True).set_index("id").sort_index()
    assert list(r.index) == list(loc.index)  # ids hash the path relative to the source root
    assert (r["status"] == loc["status"]).all() and r["path"].str.startswith(
        f"s3://{bucket}/"
    ).all()
    ok = r["status"] == "ok"
    np.testing.assert_allclose(
        np.stack(r["emb"][ok]), np.stack(loc["emb"][ok]), rtol=1e-5, atol=1e-6
    )
    for f in fs.find(f"{bucket}/emb"):
        assert S3_SECRET.encode() not in fs.cat_file(f)
    assert (
        remote.manifest["model"]["checkpoint_sha256"]
        == local.manifest["model"]["checkpoint_sha256"]
    )


def test_cli_with_env_endpoint_never_prints_credentials(
    local_corpus, s3_bucket, tmp_path, ray_address
):
    fs, bucket, endpoint = s3_bucket
    fs.put(str(local_corpus / "images"), f"{bucket}/images", recursive=True)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": ray_address,
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitflow.cli",
            "embed",
            "--input",
            f"s3://{bucket}/images",
            "--output",
            f"s3://{bucket}/out",
            "--model",
            "resnet18",
            "--random-weights",
            "--verbose",
            "--set",
            "compute.batch_size=8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accounted for : 23 of 23" in r.stdout
    assert S3_SECRET not in r.stdout + r.stderr
    assert "vitflow-test-key" not in r.stdout + r.stderr
    manifest = fs.cat_file(f"{bucket}/out/_manifest.json").decode()
    assert S3_SECRET not in manifest and "AWS_SECRET" not in manifest


@pytest.fixture()
def fault_proxy(s3_endpoint):
    port = free_port()
    upstream = s3_endpoint.rsplit(":", 1)[1]
    script = os.path.join(os.path.dirname(__file__), "faultproxy.py")
    with serving([sys.executable, script, upstream, str(port), "2"], port) as url:
        yield url


def test_transient_errors_are_retried_and_permanent_ones_become_error_rows(
    local_corpus, s3_bucket, fault_proxy, ray_local, tmp_path
):
    fs, bucket, _ = s3_bucket
    src = local_corpus / "images" / "val" / "dog"
    for i, p in enumerate(sorted(src.glob("*.jpg"))):
        name = ["flaky-a.jpg", "flaky-b.jpg", "broken.jpg"][i] if i < 3 else p.name
        fs.put(str(p), f"{bucket}/imgs/dog/{name}")
    # One attempt inside the S3 client, so vitflow's own retry loop is what recovers.
    res = run_embed(
        job(
            f"s3://{bucket}/imgs",
            str(tmp_path / "out"),
            str(local_corpus / "w.safetensors"),
            fault_proxy,
            client_retries=1,
        )
    )
    df = load_embeddings(str(tmp_path / "out"), include_errors=True).set_index("path")
    assert res.listed == 3
    assert df.loc[f"s3://{bucket}/imgs/dog/flaky-a.jpg", "status"] == "ok"
    assert df.loc[f"s3://{bucket}/imgs/dog/flaky-b.jpg", "status"] == "ok"
    err = df.loc[f"s3://{bucket}/imgs/dog/broken.jpg", "error"]
    assert "read failed" in err and "attempts" in err


def test_reindex_on_s3_adds_updates_and_deletes(local_corpus, s3_bucket, ray_local):
    """The Delta index in object storage: one incremental run equals a fresh build."""
    from vitflow.reindex import run_reindex

    fs, bucket, endpoint = s3_bucket
    fs.put(str(local_corpus / "images" / "train"), f"{bucket}/src", recursive=True)

    def cfg(out: str):
        return job(
            f"s3://{bucket}/src",
            f"s3://{bucket}/{out}",
            str(local_corpus / "w.safetensors"),
            endpoint,
        )

    first = run_reindex(cfg("index"))
    assert first.added == first.embedded == 14  # 9 images + 5 bad files, all rows
    dog = sorted(fs.ls(f"{bucket}/src/dog"))
    fs.rm(dog[0])  # deleted
    fs.put(str(local_corpus / "images" / "val" / "cat" / "000.jpg"), dog[1])  # changed content
    fs.put(
        str(local_corpus / "images" / "val" / "fox" / "001.jpg"), f"{bucket}/src/fox/new.jpg"
    )  # added
    second = run_reindex(cfg("index"))
    assert (second.added, second.updated, second.deleted, second.embedded) == (1, 1, 1, 2)
    fresh = run_reindex(cfg("fresh"))
    opts = {"endpoint_url": endpoint}
    a = (
        load_embeddings(f"s3://{bucket}/index", include_errors=True, storage_options=opts)
        .set_index("id")
        .sort_index()
    )
    b = (
        load_embeddings(f"s3://{bucket}/fresh", include_errors=True, storage_options=opts)
        .set_index("id")
        .sort_index()
    )
    assert fresh.added == len(b) == len(a) == 14
    assert list(a.index) == list(b.index) and (a["status"] == b["status"]).all()
    ok = a["status"] == "ok"
    np.testing.assert_allclose(np.stack(a["emb"][ok]), np.stack(b["emb"][ok]), rtol=1e-5, atol=1e-6)
    assert run_reindex(cfg("index")).embedded == 0


def test_missing_output_bucket_is_refused_not_created(local_corpus, s3_bucket):
    from vitflow.embed import prepare_embed
    from vitflow.errors import ConfigError

    fs, bucket, endpoint = s3_bucket
    cfg = job(
        str(local_corpus / "images"),
        "s3://no-such-bucket-vitflow/out",
        str(local_corpus / "w.safetensors"),
        endpoint,
    )
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-vitflow'.*does not exist"):
        prepare_embed(cfg)
    assert not fs.exists("no-such-bucket-vitflow")
