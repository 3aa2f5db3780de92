"""The training loop as a plain function (one rank, no Ray): bf16 autocast on CPU, bad
training images skipped and counted, the error budget, an exact resume, fp32 checkpoints."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch

from vitflow.config import load_config
from vitflow.errors import VitflowError
from vitflow.synthetic import make_digits_folder, make_image_folder
from vitflow.training.config import TrainConfig
from vitflow.training.loop import autocast_for, train_loop
from vitflow.training.model import build_model
from vitflow.training.report import read_metrics

BAD = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8


def job(data: Path, out: Path, **over) -> TrainConfig:
    base = {
        "method": "simo2",
        "data": {"uri": str(data), "image_size": 32, "loader_workers": 0},
        "model": {"name": "test_resnet", "embedding_dim": 16, "head_hidden_dim": 0},
        "simo2": {"samples_per_class": 6, "classes_per_batch": 4},
        "optim": {"lr": 1e-3, "steps": 6},
        "scaling": {"num_workers": 1},
        "output": {"uri": str(out), "checkpoint_every": 3, "log_every": 1},
        "monitor": {"knn_every": 0, "max_images": 50},
    }
    return load_config(
        base=base, overrides=[f"{k}={v}" for k, v in over.items()], schema=TrainConfig
    )


def run(cfg: TrainConfig, state: dict | None = None) -> list[dict]:
    """Run the loop; return the checkpoints it reported (rank 0's state dicts)."""
    saved: list[dict] = []
    # deepcopy: a state dict holds the live tensors, which the next steps change in place.
    train_loop(cfg, state=state, report=lambda metrics, s: saved.append(copy.deepcopy(s)))
    return saved


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """4 classes x 6 train images: with samples_per_class 6 every image is in every batch."""
    root = tmp_path_factory.mktemp("small")
    make_image_folder(root, classes=("a", "b", "c", "d"), per_class=6, size=(40, 36))
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_digits_folder(root, size=32)
    return root


def test_autocast_bf16_runs_the_forward_in_bf16():
    cfg = job(Path("x"), Path("y"), **{"compute.precision": "bf16"})
    model = build_model(cfg)
    with autocast_for(cfg, torch.device("cpu")):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    fp32 = job(Path("x"), Path("y"))
    with autocast_for(fp32, torch.device("cpu")):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float32


@pytest.mark.timeout(300)
def test_bf16_on_cpu_trains_like_fp32_and_checkpoints_stay_fp32(digits, tmp_path):
    over = {
        "optim.steps": 30,
        "optim.lr": 3e-3,
        "compute.channels_last": "true",
        "output.checkpoint_every": 30,
        "simo2.samples_per_class": 8,
        "simo2.classes_per_batch": 10,
    }
    tails = {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        cfg = job(digits, out, **over, **{"compute.precision": precision})
        (state,) = run(cfg)
        losses = [m["loss"] for m in read_metrics(str(out)) if "loss" in m]
        assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
        head, tails[precision] = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert tails[precision] < 0.95 * head, (precision, losses)
        assert all(
            v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point()
        )
        assert read_metrics(str(out))[0]["precision"] == precision
    # Only the forward runs in bf16: the run follows the fp32 one closely.
    assert tails["bf16"] == pytest.approx(tails["fp32"], rel=0.05)


def test_fp16_on_cpu_is_refused_naming_bf16(tmp_path):
    with pytest.raises(Exception, match="on CPU use bf16"):
        job(tmp_path, tmp_path, **{"compute.precision": "fp16"})


@pytest.mark.timeout(300)
def test_corrupt_images_are_skipped_counted_and_ignored_by_the_monitor(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    (data / "train" / "b" / "zz-corrupt.png").write_bytes(BAD)  # drawn in every batch
    (data / "val" / "c" / "zz-corrupt.png").write_bytes(BAD)  # held out: the monitor's
    out = tmp_path / "run"
    cfg = job(data, out, **{"monitor.knn_every": 6, "simo2.samples_per_class": 7})
    states = run(cfg)
    metrics = read_metrics(str(out))
    logged = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    # One bad file among class b's 7; replacements are drawn from the class, so it costs at
    # least one replacement per step (more when a replacement draws it again).
    assert all(m["bad_images"] == 1 for m in logged)
    assert [m["skipped_images"] >= m["step"] for m in logged] == [True] * 6
    assert logged[-1]["skipped_images"] == states[-1]["ingest"]["skipped"]
    assert list(states[-1]["ingest"]["bad"]) == [str(data / "train" / "b" / "zz-corrupt.png")]
    knn = [m["knn_top1"] for m in metrics if "knn_top1" in m]
    assert len(knn) == 2 and all(0.0 <= k <= 1.0 for k in knn)


@pytest.mark.timeout(300)
def test_error_budget_stops_the_run_naming_a_file(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    (data / "train" / "a" / "zz-corrupt.png").write_bytes(BAD)
    cfg = job(data, tmp_path / "run", **{"data.max_error_fraction": 0.01})
    with pytest.raises(VitflowError, match=r"max_error_fraction=0.01; e.g. .*zz-corrupt.png"):
        run(cfg)
    # Within the budget the same data trains to the end.
    run(job(data, tmp_path / "ok", **{"data.max_error_fraction": 0.5}))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "over",
    [{}, {"model.kwargs": "{drop_rate: 0.3, drop_path_rate: 0.2}"}],
    ids=["plain", "dropout"],
)
def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(small, tmp_path, over):
    """Also with dropout and drop-path: the training process's own draws at a step do not
    depend on where the run started."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-equal float sums
    try:
        full = run(job(small, tmp_path / "a", **over))
        resumed = run(job(small, tmp_path / "b", **over), state=full[0])
    finally:
        torch.set_num_threads(threads)
    assert [s["step"] for s in full] == [3, 6] and resumed[-1]["step"] == 6
    for k, v in full[-1]["model"].items():
        torch.testing.assert_close(resumed[-1]["model"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compiled_model_trains_and_saves_the_plain_keys(small, tmp_path):
    over = {"optim.steps": 3, "output.checkpoint_every": 3}
    eager = run(job(small, tmp_path / "eager", **over))[-1]
    compiled = run(job(small, tmp_path / "compiled", **over, **{"compute.compile": "true"}))[-1]
    assert compiled["model"].keys() == eager["model"].keys()  # no _orig_mod. prefix
    # The first step's loss comes before any update: compiled and eager forward agree.
    first = [
        next(m["loss"] for m in read_metrics(str(tmp_path / name)) if "loss" in m)
        for name in ("eager", "compiled")
    ]
    assert first[1] == pytest.approx(first[0], rel=1e-4)


def test_embedding_for_monitor_and_plots_leaves_unreadable_images_out(small, tmp_path):
    from vitflow.training.data import ImageStore
    from vitflow.training.loop import embed_images
    from vitflow.training.transforms import EvalTransform

    bad = tmp_path / "bad.png"
    bad.write_bytes(BAD)
    good = sorted(str(p) for p in (small / "val").rglob("*.jpg"))[:2]
    paths = [good[0], str(bad), good[1], str(tmp_path / "missing.jpg")]
    model = build_model(job(small, tmp_path))
    tf = EvalTransform(32, (0.5,) * 3, (0.5,) * 3)
    feats, kept = embed_images(model.backbone, ImageStore(10), paths, tf, torch.device("cpu"))
    assert kept == [0, 2] and feats.shape == (2, model.backbone.num_features)
    with torch.no_grad():
        want = model.backbone.eval()(torch.stack([tf(ImageStore(0).get(p)) for p in good]))
    torch.testing.assert_close(torch.from_numpy(feats), want)


def test_gpu_workers_reserve_the_cores_that_feed_them_by_default():
    """scaling.cpus_per_worker left out: 1 CPU for a CPU worker; a GPU worker gets its node's
    CPUs per GPU less one (the fewest over the GPU nodes), and its loader processes use
    them."""
    from vitflow.training.loop import loader_workers
    from vitflow.training.trainer import sized_for_cluster

    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},  # a CPU-only head
        {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 1.0}},  # gone
    ]
    auto = {"data.loader_workers": "null"}
    gpu = sized_for_cluster(job(Path("x"), Path("y"), **auto, **{"scaling.use_gpu": "true"}), nodes)
    assert gpu.scaling.cpus_per_worker == 11.0  # 95 // 8 on the 8-GPU node
    assert loader_workers(gpu) == 10
    cpu = sized_for_cluster(job(Path("x"), Path("y"), **auto), nodes)
    assert cpu.scaling.cpus_per_worker == 1.0 and loader_workers(cpu) == 0
    mine = job(Path("x"), Path("y"), **{"scaling.use_gpu": "true", "scaling.cpus_per_worker": 3})
    assert sized_for_cluster(mine, nodes).scaling.cpus_per_worker == 3.0
