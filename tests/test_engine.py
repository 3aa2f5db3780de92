"""The one streaming engine: the stream starts before the listing is decoded, every stage's
time is reported, the error budget is the same for every sink, decode runs beside the
actors, and the actor-side (GPU) decode path falls back to the exact CPU path without CUDA.
No timing assertions: speed lives in benchmarks/."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import TINY, free_port, serving
from vitflow import columns
from vitflow.config import ComputeConfig, load_config
from vitflow.embed import run_embed
from vitflow.engine import ErrorBudget, ErrorBudgetExceeded
from vitflow.loading import load_embeddings
from vitflow.runtime import plan_actors
from vitflow.synthetic import make_image_folder

NAME, KW = TINY["vit"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_image_folder(root / "images", per_class=20, size=(80, 60), with_bad_files=True)
    torch.manual_seed(5)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), root / "w.safetensors")
    return root


def job(root, out, **over):
    base = {
        "source": {"uri": str(root / "images")},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "w.safetensors")},
        "features": [{"name": "emb", "layers": 2, "pool": "mean"}],
        "output": {"uri": str(out), "rows_per_file": 16},
        "compute": {"batch_size": 8},
    }
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_stream_reports_every_stage(corpus, ray_local, tmp_path):
    res = run_embed(job(corpus, tmp_path / "out"))
    t = res.manifest["timing"]
    # How far the first forward pass came before decode ended is reported here; its sign is
    # asserted by the test below, where the order of events is forced rather than timed.
    assert isinstance(t["model_started_before_decode_ended_s"], float)
    for stage in ("listing_seconds", "decode_seconds", "model_seconds", "write_seconds"):
        assert t[stage] > 0, stage
    assert 0 < t["model_busy_share"] <= 1
    assert t["stream_seconds"] <= t["wall_seconds"]
    assert t["first_result_seconds"] <= t["stream_seconds"]
    assert t["steady_images_per_second"] > 0
    # The decode stage's own span holds every decode actor's busy time, and its rate is the
    # listed rows over it.
    ex = res.manifest["execution"]
    decode_actors = ex["actors"]["decode_tasks"]
    assert 0 < t["decode_span_seconds"] <= t["stream_seconds"]
    assert t["decode_seconds"] <= decode_actors * t["decode_span_seconds"] + 1e-3
    assert t["decode_images_per_second"] * t["decode_span_seconds"] == pytest.approx(
        res.listed, rel=1e-3
    )
    # The model actor was ready before its first result came back, and says where its
    # start-up went, phase by phase, summing to no more than its constructor's time.
    assert 0 < t["model_ready_seconds"] <= t["first_result_seconds"]
    (actor,) = res.manifest["execution"]["model_actors"]
    up = actor["startup"]
    phases = ("imports_s", "weights_fetch_s", "build_s", "to_device_s")
    assert all(up[k] >= 0 for k in phases) and up["build_s"] > 0
    assert sum(up[k] for k in phases) <= up["init_s"] + 1e-3
    assert up["process_to_init_s"] > 0
    ex = res.manifest["execution"]
    blocks = -(-res.listed // 8)  # decode blocks of min(batch, 64) rows
    assert ex["decode_blocks"] == blocks
    assert ex["images"] == res.ok and ex["batches"] >= blocks
    # No single writer: the model actor staged what it embedded; parts were compacted.
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == -(-res.listed // 16)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_first_batch_reaches_the_model_before_the_last_decode_ends(
    corpus, s3_bucket, ray_local, tmp_path
):
    """The proxy holds the read of the listing's last file until the model has staged a batch.
    A stream that decoded the whole listing before feeding the model would wait out the hold
    (90 s) first, and then its first forward pass would come after the last decode."""
    fs, bucket, endpoint = s3_bucket
    files = sorted((corpus / "images").rglob("*.jpg"))[:24]
    for i, p in enumerate(files):
        fs.put(str(p), f"{bucket}/imgs/{i:02d}.jpg")
    fs.put(str(files[0]), f"{bucket}/imgs/zz-held.jpg")  # last in the listing
    out = tmp_path / "out"
    port = free_port()
    script = os.path.join(os.path.dirname(__file__), "faultproxy.py")
    cmd = [sys.executable, script, endpoint.rsplit(":", 1)[1], str(port), "0"]
    with serving([*cmd, "--hold", str(out / "_staging" / "*")], port) as proxy:
        res = run_embed(
            job(corpus, out, **{"source.uri": f"s3://{bucket}/imgs", "storage.endpoint_url": proxy})
        )
    assert res.listed == res.ok + res.error == 25
    assert res.manifest["timing"]["model_started_before_decode_ended_s"] > 0


def test_error_budget_is_judged_the_same_for_every_sink():
    small = ErrorBudget(0.5, total=50)  # a 50-file run where every file fails: refused
    with pytest.raises(ErrorBudgetExceeded, match="50 of 50 files failed"):
        small.add(50, 50)
    big = ErrorBudget(0.2, total=10_000)
    big.add(10, 3)  # 3 of the first 10 fail: too early to judge
    big.add(90, 10)  # 13 of 100: within budget
    with pytest.raises(ErrorBudgetExceeded, match="31 of 110"):
        big.add(10, 18)
    ErrorBudget(None, total=10).add(10, 10)  # no budget: never refused


def test_decode_runs_beside_the_actors_on_a_small_node():
    """On 2 CPUs the model actor reserves half a CPU and two decode actors run at once
    (one whole CPU each left room for one); with GPUs decode takes the CPUs the actors
    do not reserve."""
    cpu = plan_actors({"CPU": 2.0}, 2.0, ComputeConfig())
    assert cpu.device == "cpu" and cpu.decode_tasks == 2
    assert cpu.num_actors * cpu.num_cpus + cpu.decode_tasks * cpu.decode_num_cpus <= 2.0
    gpu = plan_actors({"CPU": 16.0, "GPU": 2.0}, 16.0, ComputeConfig())
    assert (gpu.num_actors, gpu.decode_tasks, gpu.decode_num_cpus) == (2, 14, 1.0)
    assert gpu.batch_size == 256 and cpu.batch_size == 32  # defaults by device and size
    big = plan_actors({"CPU": 16.0, "GPU": 2.0}, 16.0, ComputeConfig(), model_params=600e6)
    assert big.batch_size == 64


def test_gpu_decode_without_cuda_actors_decodes_in_cpu_tasks(caplog):
    with caplog.at_level("WARNING", logger="vitflow.runtime"):
        plan = plan_actors({"CPU": 2.0}, 2.0, ComputeConfig(decode="gpu"))
    assert plan.decode == "cpu" and "decoding in CPU tasks" in caplog.text
    assert plan_actors({"CPU": 2.0}, 2.0, ComputeConfig(decode="auto")).decode == "cpu"
    assert plan_actors({"CPU": 8.0, "GPU": 1.0}, 8.0, ComputeConfig(decode="auto")).decode == "gpu"


def listing_rows(paths: list[str]) -> dict[str, np.ndarray]:
    """A batch of listing rows for ``paths``, as the decode stage gets one."""
    return {
        columns.ID: np.array([str(i) for i in range(len(paths))], dtype=object),
        columns.PATH: np.array(paths, dtype=object),
        columns.LABEL: np.array([None] * len(paths), dtype=object),
        columns.SPLIT: np.array([None] * len(paths), dtype=object),
    }


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_actor_side_decode_falls_back_to_the_exact_path_without_cuda(corpus, ray_local):
    """The model actor's GPU-decode path, run here without CUDA: every JPEG and every
    other file takes the exact CPU path, so the vectors equal the CPU decode actors' run."""
    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.decode_task import decode_batch
    from vitflow.preprocess import Preprocessor
    from vitflow.stages import EmbedWorker

    cfg = job(corpus, corpus / "unused")
    bb = create_backbone(cfg.model)
    ref = ray_local.put(backbone_bytes(bb))
    paths = sorted(str(p) for p in (corpus / "images" / "train" / "cat").iterdir())  # + bad files
    batch = listing_rows(paths)
    common = {
        "resize": Preprocessor(bb.data_config).resize_spec(),
        "max_pixels": cfg.source.max_pixels,
    }
    on_cpu = decode_batch(dict(batch), **common, mode="cpu")
    as_bytes = decode_batch(dict(batch), **common, mode="gpu")
    assert columns.PIXELS not in as_bytes and columns.RAW_BYTES in as_bytes
    job_dict = cfg.model_dump(mode="json")
    threads = torch.get_num_threads()  # the worker sets it for its process: keep ours
    exact = EmbedWorker(job_dict, [ref], "cpu", threads, None)(on_cpu).to_pylist()
    actor = EmbedWorker(job_dict, [ref], "cpu", threads, None, decode="gpu")(as_bytes).to_pylist()
    assert [r["status"] for r in actor] == [r["status"] for r in exact]
    assert [r["error"] for r in actor] == [r["error"] for r in exact]
    assert any(r["status"] == "error" for r in exact) and any(r["status"] == "ok" for r in exact)
    for a, e in zip(actor, exact, strict=True):
        assert (a["width"], a["height"]) == (e["width"], e["height"])
        if e["status"] == "ok":
            np.testing.assert_allclose(a["emb"], e["emb"], atol=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_actor_side_decode_through_ray_gives_the_cpu_decode_rows(corpus, ray_local, tmp_path):
    """The whole stream with ``decode: gpu`` actors, through Ray Data (whose batches hold
    read-only views of Arrow buffers, unlike a dict built by hand), forced here without CUDA
    and with two batches in flight per model actor, as on a GPU: the actors' exact fallback
    must give the CPU decode actors' rows (one batch at a time), error rows included, and
    one forward per batch."""
    import dataclasses

    from vitflow import engine

    real = engine.plan_pool

    def gpu_decode_plan(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), decode="gpu")

    def rows(out):
        df = load_embeddings(str(out), include_errors=True)
        return df.sort_values("path").reset_index(drop=True)

    run_embed(job(corpus, tmp_path / "cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "plan_pool", gpu_decode_plan)
        res = run_embed(job(corpus, tmp_path / "gpu", **{"compute.batches_in_flight": 2}))
    ex = res.manifest["execution"]
    assert ex["actors"]["decode"] == "gpu" and ex["actors"]["batches_in_flight"] == 2
    assert ex["forwards"] == ex["batches_with_images"] > 1
    assert 0 < res.manifest["timing"]["model_busy_share"] <= 1
    cpu, gpu = rows(tmp_path / "cpu"), rows(tmp_path / "gpu")
    same = ["path", "status", "error", "width", "height"]
    pd.testing.assert_frame_equal(gpu[same], cpu[same])
    assert (cpu["status"] == "error").any() and (cpu["status"] == "ok").any()
    ok = (cpu["status"] == "ok").to_numpy()
    np.testing.assert_allclose(np.stack(gpu["emb"][ok]), np.stack(cpu["emb"][ok]), atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")
def test_a_model_actor_that_cannot_use_its_gpu_ends_the_job_with_the_fix(
    corpus, ray_local, tmp_path
):
    """No probe task runs before the stream: each GPU model actor checks its own device as
    it starts. Here (no usable CUDA) the actor planned for cuda refuses to start, and the job
    ends with its one sentence, naming the fix, and no output part."""
    import dataclasses

    from vitflow import engine
    from vitflow.errors import ConfigError

    real = engine.plan_pool

    def cuda_plan(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), device="cuda")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "plan_pool", cuda_plan)
        with pytest.raises(ConfigError) as e:
            run_embed(job(corpus, tmp_path / "out"))
    assert "compute.device is cuda" in str(e.value) and "cannot use the GPU" in str(e.value)
    assert "compute.device: cpu" in str(e.value)
    assert not list((tmp_path / "out").glob("part-*.parquet"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_batches_at_once_in_one_model_actor_give_the_rows_of_one_at_a_time(corpus, ray_local):
    """Two threads calling one model actor at once, as Ray Data does with two batches in
    flight: every batch gets the rows it gets alone, and each call reports its own single
    forward pass (the forward runs under the actor's lock)."""
    from concurrent.futures import ThreadPoolExecutor

    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.decode_task import decode_batch
    from vitflow.preprocess import Preprocessor
    from vitflow.stages import EmbedWorker

    cfg = job(corpus, corpus / "unused")
    bb = create_backbone(cfg.model)
    ref = ray_local.put(backbone_bytes(bb))
    paths = sorted(str(p) for p in (corpus / "images" / "train").rglob("*.jpg"))[:24]
    spec = Preprocessor(bb.data_config).resize_spec()
    batches = []
    for i in range(0, len(paths), 6):
        chunk = paths[i : i + 6]
        batches.append(
            decode_batch(listing_rows(chunk), resize=spec, max_pixels=cfg.source.max_pixels)
        )

    class Counters:  # the run's stats actor, as far as the actor talks to it
        def __init__(self):
            self.calls = []
            self.add = self

        def remote(self, **kw):
            self.calls.append(kw)

    threads = torch.get_num_threads()
    actor = EmbedWorker(cfg.model_dump(mode="json"), [ref], "cpu", threads, None)
    alone = [actor(dict(b)).to_pylist() for b in batches]
    actor.stats = Counters()
    with ThreadPoolExecutor(2) as ex:
        together = list(ex.map(lambda b: actor(dict(b)).to_pylist(), batches * 2))
    for got, want in zip(together, alone * 2, strict=True):
        assert [r["id"] for r in got] == [r["id"] for r in want]
        for a, e in zip(got, want, strict=True):
            assert a["status"] == e["status"]
            if e["status"] == "ok":
                np.testing.assert_allclose(a["emb"], e["emb"], atol=1e-6)
    assert sum(r["status"] == "ok" for rows in alone for r in rows) > len(alone)
    assert all(c["forwards"] == int(c["images"] > 0) for c in actor.stats.calls)
    assert len(actor.stats.calls) == len(together)


_WRITTEN: dict[str, list] = {}


class _KeepRows:
    """A sink's writer as a shared model actor sees one: keeps the rows, returns a receipt."""

    def __init__(self, key: str):
        self.key = key

    def write(self, table):
        _WRITTEN.setdefault(self.key, []).append(table)
        return table.select([columns.ID, columns.STATUS])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_models_sharing_an_input_embed_one_decoded_batch_as_each_would_alone(corpus, ray_local):
    """Two outputs of one resize and crop in one model actor (a matrix job's shared
    stream): from one batch of file bytes, decoded once (the model actor's GPU-decode path,
    on the CPU here), each model writes the rows its own actor writes from CPU-decoded
    pixels, and the receipt tags every row with its output."""
    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.decode_task import decode_batch
    from vitflow.preprocess import Preprocessor
    from vitflow.stages import MEMBER_COLUMN, EmbedWorker, SharedInputWorker

    jobs = [
        job(corpus, corpus / "unused"),
        job(corpus, corpus / "unused", **{"features.0.pool": "cls"}),
    ]
    bb = create_backbone(jobs[0].model)
    ref = ray_local.put(backbone_bytes(bb))
    paths = sorted(str(p) for p in (corpus / "images" / "train" / "cat").iterdir())  # + bad files
    batch = listing_rows(paths)
    common = {"resize": Preprocessor(bb.data_config).resize_spec(), "max_pixels": 10**8}
    on_cpu = decode_batch(dict(batch), **common, mode="cpu")
    as_bytes = decode_batch(dict(batch), **common, mode="gpu")
    threads = torch.get_num_threads()
    models = [
        {
            "job": j.model_dump(mode="json"),
            "weights": [ref],
            "stats_actor": None,
            "writer": (_KeepRows, {"key": f"m{i}"}),
        }
        for i, j in enumerate(jobs)
    ]
    _WRITTEN.clear()
    receipt = SharedInputWorker(models, "cpu", threads, decode="gpu")(as_bytes)
    n = len(paths)
    assert receipt.num_rows == 2 * n
    assert receipt.column(MEMBER_COLUMN).to_pylist() == [0] * n + [1] * n
    for i, j in enumerate(jobs):
        got = _WRITTEN[f"m{i}"][0].to_pylist()
        alone = EmbedWorker(j.model_dump(mode="json"), [ref], "cpu", threads, None)(on_cpu)
        want = alone.to_pylist()
        assert [r["status"] for r in got] == [r["status"] for r in want]
        assert any(r["status"] == "error" for r in want) and any(r["status"] == "ok" for r in want)
        for a, e in zip(got, want, strict=True):
            if e["status"] == "ok":
                np.testing.assert_allclose(a["emb"], e["emb"], atol=1e-6)
    # The two feature sets really differ (the test would pass trivially otherwise).
    first = [r["emb"] for r in _WRITTEN["m0"][0].to_pylist() if r["status"] == "ok"][0]
    second = [r["emb"] for r in _WRITTEN["m1"][0].to_pylist() if r["status"] == "ok"][0]
    assert not np.allclose(first, second)
