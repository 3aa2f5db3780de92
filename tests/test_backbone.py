"""Checkpoint loading: safetensors, torch.load(weights_only=True), timm's whole-model form,
wrapper prefixes, and mismatches that must fail naming the keys."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from vitflow.backbone import create_backbone
from vitflow.config import ModelConfig
from vitflow.errors import ModelError

VIT_NAME, VIT_KW = TINY["vit"]


def _vit(**extra) -> torch.nn.Module:
    return timm.create_model(VIT_NAME, pretrained=False, **{**VIT_KW, **extra}).eval()


def _cfg(path, **kw) -> ModelConfig:
    return ModelConfig(name=VIT_NAME, kwargs=VIT_KW, checkpoint=str(path), **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sb.items():
        assert torch.equal(sa[k], v), k


def test_safetensors_round_trip_and_sha256(tmp_path):
    src = _vit(num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), path)
    bb = create_backbone(_cfg(path))
    _same_weights(bb.model, src)
    assert bb.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_whole_model_pth_with_classifier_head_loads_head_unused(tmp_path):
    src = _vit(num_classes=7)  # a fine-tuned classifier, saved in timm's usual form
    path = tmp_path / "finetuned.pth"
    torch.save(src.state_dict(), path)
    bb = create_backbone(_cfg(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.forward_features(x), src.forward_features(x))
    assert "head.weight" not in bb.model.state_dict()


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path):
    src = _vit(num_classes=0)
    path = tmp_path / "ddp.pth"
    torch.save(
        {"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path
    )
    _same_weights(create_backbone(_cfg(path)).model, src)


def test_resnet_torchvision_style_fc_head_is_skipped(tmp_path):
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    bb = create_backbone(ModelConfig(name="resnet18", checkpoint=str(path)))
    assert not any(k.startswith("fc.") for k in bb.model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.forward_features(x), src.forward_features(x))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _vit(num_classes=0).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    state["blocks.9.mlp.fc1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(ModelError) as e:
        create_backbone(_cfg(path))
    msg = str(e.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys: blocks.9.mlp.fc1.weight" in msg


def test_only_missing_keys_suggest_a_partial_save(tmp_path):
    state = _vit(num_classes=0).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("blocks.3.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    with pytest.raises(ModelError) as e:
        create_backbone(_cfg(path))
    msg = str(e.value)
    assert "missing keys: blocks.3.attn.proj.bias" in msg
    assert "unexpected keys" not in msg
    assert "partial save" in msg and "depth" in msg


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_vit(num_classes=0, embed_dim=48, num_heads=2).state_dict(), path)
    with pytest.raises(
        ModelError,
        match=r"shape mismatches: blocks.0.attn.proj.bias \(48,\) vs model \(32,\).*\(\+46 more\)",
    ):
        create_backbone(_cfg(path))


class NotATensor:
    """Any picklable object a weights_only load must refuse to construct."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"state_dict": _vit(num_classes=0).state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        create_backbone(_cfg(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        create_backbone(_cfg(tmp_path / "nope.safetensors"))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelError, match="not a valid safetensors"):
        create_backbone(_cfg(path))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet1B'.*did you mean .*resnet18"):
        create_backbone(ModelConfig(name="resnet1B"))


def test_bad_model_kwargs():
    with pytest.raises(ModelError, match="model.kwargs"):
        create_backbone(ModelConfig(name="resnet18", kwargs={"no_such_arg": 1}))


def test_vit_data_config_follows_img_size():
    bb = create_backbone(ModelConfig(name=VIT_NAME, kwargs=VIT_KW))
    assert bb.data_config["input_size"] == (3, 32, 32)


def test_shipped_weights_never_refetch_hub_weights():
    """Model actors rebuild from the driver's bytes; pretrained: true must not download
    again (offline here, a download would fail)."""
    from vitflow.backbone import backbone_bytes, backbone_from_bytes

    src = create_backbone(ModelConfig(name=VIT_NAME, kwargs=VIT_KW))
    again = backbone_from_bytes(
        backbone_bytes(src), ModelConfig(name=VIT_NAME, kwargs=VIT_KW, pretrained=True)
    )
    _same_weights(again.model, src.model)


@pytest.mark.parametrize(
    "name, kwargs, without_init",
    [
        *[(n, kw, True) for n, kw in TINY.values()],
        # Rotary tables are non-persistent buffers (computed at init, never saved): this
        # one must take the ordinary way, random init and all.
        ("eva02_tiny_patch14_224", dict(img_size=28), False),
    ],
)
def test_model_actors_rebuild_the_drivers_backbone_exactly(name, kwargs, without_init):
    """A model actor builds the backbone from the driver's bytes without random init where
    that gives the same model, and the ordinary way where it would not: either way the
    rebuilt model computes what the driver's does, bit for bit."""
    from safetensors.torch import load

    from vitflow import backbone
    from vitflow.backbone import backbone_bytes, backbone_from_bytes

    cfg = ModelConfig(name=name, kwargs=kwargs)
    src = create_backbone(cfg)
    raw = backbone_bytes(src)
    fast = backbone._loaded_without_init(cfg, load(raw), "state dict")
    assert (fast is not None) == without_init
    again = backbone_from_bytes(raw, cfg)
    x = torch.randn(2, *src.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.model(x), src.model(x))
    assert all(p.requires_grad and not p.is_meta for p in again.model.parameters())
    assert not again.model.training


def test_a_half_precision_state_dict_still_gives_a_float32_model_without_init():
    """Assignment would keep a checkpoint's dtype; the model's own is kept, as a copy is."""
    from vitflow import backbone

    cfg = ModelConfig(name=VIT_NAME, kwargs=VIT_KW)
    src = _vit()
    half = {k: v.half() for k, v in src.state_dict().items()}
    fast = backbone._loaded_without_init(cfg, half, "state dict")
    assert {p.dtype for p in fast.parameters()} == {torch.float32}
    for k, v in fast.state_dict().items():
        assert torch.equal(v, half[k].float()), k
