"""Where a training run's initial weights come from: the seed, a timm state dict, a vitflow
export (head reused or re-initialised), a training checkpoint, object storage."""

from __future__ import annotations

import logging
import os

import pytest
import timm
import torch

from vitflow.config import load_config
from vitflow.errors import ModelError
from vitflow.training.config import TrainConfig
from vitflow.training.loop import STATE_FILE
from vitflow.training.model import build_model
from vitflow.training.trainer import export_backbone

ARCH = "resnet18"


def job(**model) -> TrainConfig:
    base = {
        "method": "simo2",
        "data": {"uri": "unused", "image_size": 32},
        "model": {"name": ARCH, "embedding_dim": 16, "head_hidden_dim": 0, **model},
        "output": {"uri": "unused"},
    }
    return load_config(base=base, schema=TrainConfig)


def with_(cfg: TrainConfig, **over) -> TrainConfig:
    return load_config(
        base=cfg.model_dump(mode="json"),
        overrides=[f"{k}={v}" for k, v in over.items()],
        schema=TrainConfig,
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder as Ray Train leaves it (one checkpoint), with weights unlike any seed's
    init, and its exported backbone (exported by the real exporter)."""
    run = tmp_path_factory.mktemp("run")
    cfg = job()
    model = build_model(with_(cfg, seed=7))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained": equal to no seed's init
    folder = run / "checkpoint_000001"
    folder.mkdir()
    torch.save(
        {"model": model.state_dict(), "step": 1, "config": cfg.model_dump(mode="json")},
        folder / STATE_FILE,
    )
    return model, export_backbone(str(run)), str(folder / STATE_FILE)


def test_seed_changes_the_initial_weights():
    a, b, a_again = (build_model(with_(job(), seed=s)) for s in (0, 1, 0))
    assert differs(a.backbone, b.backbone) and differs(a.head, b.head)
    assert_same_weights(a, a_again)
    assert a.init == {"backbone": "seed 0", "head": "seed 0"}


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build_model(job())
    torch.testing.assert_close(torch.rand(3), want)


def test_export_gives_the_same_backbone_and_head_at_step_0(trained_run):
    trained, exported, _ = trained_run
    # model.name may be left out: the export names its architecture.
    model = build_model(job(name=None, checkpoint=exported))
    assert_same_weights(model.backbone, trained.backbone)
    assert_same_weights(model.head, trained.head)
    assert model.init == {"backbone": exported, "head": exported}
    assert model.init["backbone"].endswith(f"{ARCH}-simo2-backbone.safetensors")


def test_export_with_another_head_shape_reinitialises_the_head(trained_run, caplog):
    trained, exported, _ = trained_run
    with caplog.at_level(logging.WARNING, logger="vitflow.training.model"):
        model = build_model(with_(job(checkpoint=exported, embedding_dim=8), seed=3))
    assert_same_weights(model.backbone, trained.backbone)
    assert model.head.layers[0].weight.shape == (8, 512)
    # The head is the seed's, exactly as a run without a checkpoint would start it.
    assert_same_weights(model.head, build_model(with_(job(embedding_dim=8), seed=3)).head)
    assert model.init["head"].startswith("seed 3")
    assert "projection head" in caplog.text and "re-initialised" not in caplog.text
    assert "head starts from seed 3" in caplog.text


def test_training_checkpoint_resumes_backbone_and_head(trained_run):
    trained, _, state = trained_run
    model = build_model(job(checkpoint=state))
    assert_same_weights(model, trained)


def test_timm_state_dict_with_its_classifier(tmp_path):
    torch.manual_seed(5)
    src = timm.create_model(ARCH, num_classes=10)
    path = tmp_path / "resnet.pth"
    torch.save(src.state_dict(), path)
    model = build_model(job(checkpoint=str(path)))
    want = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert model.init == {"backbone": str(path), "head": "seed 0"}


def test_wrong_name_for_an_export_names_both_architectures(trained_run):
    _, exported, _ = trained_run
    with pytest.raises(ModelError, match="is a vitflow export of a 'resnet18' backbone"):
        build_model(job(name="resnet34", checkpoint=exported))


def test_checkpoint_without_architecture_needs_a_name(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), path)
    with pytest.raises(ModelError, match="does not name its architecture.*set model.name"):
        build_model(job(name=None, checkpoint=str(path)))


@pytest.mark.timeout(120)
def test_export_in_object_storage(trained_run, s3_bucket):
    fs, bucket, endpoint = s3_bucket
    trained, exported, _ = trained_run
    uri = f"s3://{bucket}/models/{os.path.basename(exported)}"
    fs.put(exported, uri)
    cfg = with_(job(name=None, checkpoint=uri), **{"storage.endpoint_url": endpoint})
    model = build_model(cfg)
    assert_same_weights(model, trained)


def test_head_takes_the_pooled_width_of_a_model_with_a_conv_head():
    # MobileNetV3's pooled output (head_hidden_size 1024) is wider than num_features (288).
    model = build_model(job(name="mobilenetv3_small_050")).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 16)
