"""Checkpoints as users have them: the official files of DINOv2, MAE, OpenAI CLIP, open_clip
and DeiT III, converted by timm's own filter; position embeddings resampled to another
img_size; and a Hugging Face cache copied to a machine without internet.

Each official layout is built here from a tiny timm model by undoing timm 1.0.31's conversion
(``timm/models/vision_transformer.py``: ``checkpoint_filter_fn``, ``_convert_dinov2``,
``_convert_openai_clip``). Loading it through vitflow must give back the source model
exactly, and the same model that timm's own loader makes of the file
(``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

from vitflow.backbone import backbone_bytes, backbone_from_bytes, create_backbone, read_checkpoint
from vitflow.config import ModelConfig
from vitflow.errors import ModelError

DINO_KW = dict(img_size=28, embed_dim=32, depth=2, num_heads=2)
VIT16_KW = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
CLIP_KW = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)


# Official layouts, each the inverse of timm's conversion of it. `src` is a tiny timm model
# (with its classifier head where the official file has one).


def dinov2(src: torch.nn.Module, swiglu: bool = False) -> dict:
    """Meta's ``dinov2_vit{s,b,l,g}14_pretrain.pth`` (facebookresearch/dinov2 hub models): a
    bare state dict, timm's keys plus ``mask_token`` (1, D); ViT-g's SwiGLU MLP is
    ``mlp.w12`` / ``mlp.w3`` where timm has ``mlp.fc1`` / ``mlp.fc2``."""
    out = {}
    for k, v in src.state_dict().items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v
    out["mask_token"] = torch.randn(1, src.embed_dim)
    return out


def dinov2_reg(src: torch.nn.Module) -> dict:
    """Meta's ``dinov2_vits14_reg4_pretrain.pth``: ``register_tokens`` (1, 4, D), and a
    ``pos_embed`` with a slot for the CLS token, which timm folds into ``cls_token``."""
    sd = src.state_dict()
    meta_cls, cls_pos = torch.randn(1, 1, src.embed_dim), torch.randn(1, 1, src.embed_dim)
    with torch.no_grad():  # timm's cls_token = Meta's cls_token + pos_embed[:, 0], exactly
        src.cls_token.copy_(meta_cls + cls_pos[:, 0])
    out = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    out["cls_token"] = meta_cls
    out["register_tokens"] = sd["reg_token"]
    out["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    out["mask_token"] = torch.randn(1, src.embed_dim)
    return out


def mae_pretrain(src: torch.nn.Module) -> dict:
    """``mae_pretrain_vit_base.pth``: the encoder, in timm's names, under ``model``."""
    return {"model": dict(src.state_dict())}


def mae_visualize(src: torch.nn.Module) -> dict:
    """``mae_visualize_vit_base.pth``: the whole MAE, encoder and decoder, under ``model``."""
    d, tokens = 16, src.pos_embed.shape[1]
    out = dict(src.state_dict())
    out["mask_token"] = torch.randn(1, 1, d)
    out["decoder_embed.weight"], out["decoder_embed.bias"] = (
        torch.randn(d, src.embed_dim),
        torch.randn(d),
    )
    out["decoder_pos_embed"] = torch.randn(1, tokens, d)
    for i in range(2):
        out.update({f"decoder_blocks.{i}.{k}": v for k, v in Block(d, 2).state_dict().items()})
    out["decoder_norm.weight"], out["decoder_norm.bias"] = torch.randn(d), torch.randn(d)
    out["decoder_pred.weight"], out["decoder_pred.bias"] = (
        torch.randn(16 * 16 * 3, d),
        torch.randn(16 * 16 * 3),
    )
    return {"model": out}


_OPENAI_NAMES = [  # timm -> OpenAI CLIP, within the image tower
    ("patch_embed.proj.", "conv1."),
    ("norm_pre.", "ln_pre."),
    ("blocks.", "transformer.resblocks."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]


def _clip_text_tower(width: int = 16, context: int = 7, vocab: int = 50) -> dict:
    out = {
        "positional_embedding": torch.randn(context, width),
        "token_embedding.weight": torch.randn(vocab, width),
        "ln_final.weight": torch.randn(width),
        "ln_final.bias": torch.randn(width),
        "text_projection": torch.randn(width, width),
        "logit_scale": torch.tensor(4.6052),
    }
    for k, v in Block(width, 2).state_dict().items():
        k = "transformer.resblocks.0." + k
        for a, b in _OPENAI_NAMES[3:]:
            k = k.replace(a, b)
        out[k] = v
    return out


def openai_clip(src: torch.nn.Module) -> dict:
    """OpenAI's ``ViT-B-32.pt`` as a state dict (``torch.jit.load(...).state_dict()``): the
    image tower under ``visual.`` in OpenAI's names, with ``proj`` (D, E) for timm's head,
    then the text tower and the scalars the JIT archive carries."""
    out = {}
    for k, v in src.state_dict().items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k == "head.weight":
            k, v = "proj", v.t()
        elif k == "head.bias":
            continue  # OpenAI's projection has none; timm adds zeros
        elif k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        else:
            for a, b in _OPENAI_NAMES:
                k = k.replace(a, b)
        out["visual." + k] = v
    out.update(_clip_text_tower())
    out.update(
        input_resolution=torch.tensor(64),
        context_length=torch.tensor(7),
        vocab_size=torch.tensor(50),
    )
    return out


def open_clip_training(src: torch.nn.Module) -> dict:
    """An open_clip training checkpoint (``epoch_32.pt``): the CLIP state dict of DDP
    (``module.`` prefix) under ``state_dict``, next to the optimizer's state."""
    sd = {
        k: v
        for k, v in openai_clip(src).items()
        if k not in ("input_resolution", "context_length", "vocab_size")
    }
    return {
        "epoch": 32,
        "name": "ViT-B-32",
        "state_dict": {"module." + k: v for k, v in sd.items()},
        "optimizer": {
            "state": {0: {"step": torch.tensor(10.0)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
    }


def open_clip_timm_trunk(src: torch.nn.Module) -> dict:
    """open_clip's ``open_clip_model.safetensors`` for a timm-trunk tower (SigLIP): the timm
    model under ``visual.trunk.``, the text tower under ``text.``."""
    out = {"visual.trunk." + k: v for k, v in src.state_dict().items()}
    out.update({"text." + k: v for k, v in _clip_text_tower().items() if k != "logit_scale"})
    out.update({"logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-10.0)})
    return out


def deit3(src: torch.nn.Module) -> dict:
    """``deit_3_small_224_1k.pth``: DeiT III's own names for layer scale (``gamma_1``,
    ``gamma_2``), with the classifier head, under ``model``."""
    sd = src.state_dict()
    return {
        "model": {
            k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
            for k, v in sd.items()
        }
    }


@dataclass
class Layout:
    name: str
    kwargs: dict
    build: Callable[[torch.nn.Module], dict]
    filename: str
    source_classes: int | None = None  # the source's head, where the official file has one
    timm_kwargs: dict = field(default_factory=dict)


LAYOUTS = {
    "dinov2": Layout(
        "vit_small_patch14_dinov2.lvd142m", DINO_KW, dinov2, "dinov2_vits14_pretrain.pth"
    ),
    "dinov2_reg4": Layout(
        "vit_small_patch14_reg4_dinov2.lvd142m",
        DINO_KW,
        dinov2_reg,
        "dinov2_vits14_reg4_pretrain.pth",
    ),
    "dinov2_giant_swiglu": Layout(
        "vit_giant_patch14_dinov2.lvd142m",
        DINO_KW,
        lambda src: dinov2(src, swiglu=True),
        "dinov2_vitg14_pretrain.pth",
    ),
    "mae": Layout("vit_base_patch16_224.mae", VIT16_KW, mae_pretrain, "mae_pretrain_vit_base.pth"),
    "mae_visualize": Layout(
        "vit_base_patch16_224.mae",
        VIT16_KW,
        mae_visualize,
        "mae_visualize_vit_base.pth",
        # timm loads strictly for MAE and refuses the decoder keys; the state-dict check
        # against the source still catches anything missing.
        timm_kwargs=dict(pretrained_strict=False),
    ),
    "openai_clip": Layout(
        "vit_base_patch32_clip_quickgelu_224.openai", CLIP_KW, openai_clip, "ViT-B-32.pth", 16
    ),
    "open_clip_training": Layout(
        "vit_base_patch32_clip_quickgelu_224.openai", CLIP_KW, open_clip_training, "epoch_32.pt", 16
    ),
    "open_clip_timm_trunk": Layout(
        "vit_base_patch16_siglip_224.v2_webli",
        VIT16_KW,
        open_clip_timm_trunk,
        "open_clip_model.safetensors",
    ),
    "deit3": Layout(
        "deit3_small_patch16_224.fb_in1k", VIT16_KW, deit3, "deit_3_small_224_1k.pth", 10
    ),
}


def write_official(tmp_path, layout: Layout) -> tuple[torch.nn.Module, str]:
    """The source model (random weights, classifier removed) and its official-layout file."""
    extra = {} if layout.source_classes is None else {"num_classes": layout.source_classes}
    src = timm.create_model(layout.name, pretrained=False, **layout.kwargs, **extra).eval()
    with torch.no_grad():  # no parameter keeps its constant init, so a mix-up cannot hide
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = layout.build(src)
    path = tmp_path / layout.filename
    if path.suffix == ".safetensors":
        save_file(ckpt, path)
    else:
        torch.save(ckpt, path)
    src.reset_classifier(0)  # the backbone vitflow builds has no classifier either
    return src, str(path)


def timm_loads(layout: Layout, path: str, **kwargs) -> torch.nn.Module:
    """timm's own loader (its filter, its classifier handling) on the same file."""
    kwargs = {**layout.kwargs, **kwargs}
    return timm.create_model(
        layout.name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        num_classes=0,
        **layout.timm_kwargs,
        **kwargs,
    ).eval()


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def assert_same_output(model: torch.nn.Module, reference: torch.nn.Module, img_size: int) -> None:
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_official_layout_loads_as_the_source_model_and_as_timm_loads_it(tmp_path, layout):
    layout = LAYOUTS[layout]
    src, path = write_official(tmp_path, layout)
    bb = create_backbone(ModelConfig(name=layout.name, kwargs=layout.kwargs, checkpoint=path))
    assert_same_weights(bb.model, src)
    assert_same_output(bb.model, src, layout.kwargs["img_size"])
    ref = timm_loads(layout, path)
    assert_same_weights(bb.model, ref)
    assert_same_output(bb.model, ref, layout.kwargs["img_size"])


@pytest.mark.parametrize("layout", ["dinov2_reg4", "mae"])
def test_position_embedding_is_resampled_to_img_size(tmp_path, layout):
    layout = LAYOUTS[layout]
    src, path = write_official(tmp_path, layout)
    kwargs = {**layout.kwargs, "img_size": 2 * layout.kwargs["img_size"]}
    bb = create_backbone(ModelConfig(name=layout.name, kwargs=kwargs, checkpoint=path))
    ref = timm_loads(layout, path, img_size=kwargs["img_size"])
    assert bb.model.pos_embed.shape == ref.pos_embed.shape != src.pos_embed.shape
    assert_same_weights(bb.model, ref)
    assert_same_output(bb.model, ref, kwargs["img_size"])
    source = src.state_dict()
    assert all(
        torch.equal(v, source[k]) for k, v in bb.model.state_dict().items() if k != "pos_embed"
    )
    # Model actors rebuild from the driver's converted, resampled weights: nothing changes.
    again = backbone_from_bytes(backbone_bytes(bb), ModelConfig(name=layout.name, kwargs=kwargs))
    assert_same_weights(again.model, bb.model)


def test_mae_decoder_is_skipped_with_a_log_and_stays_in_the_checkpoint(tmp_path, caplog):
    layout = LAYOUTS["mae_visualize"]
    src, path = write_official(tmp_path, layout)
    ckpt = read_checkpoint(path)
    before = {k: v.clone() for k, v in ckpt.state_dict.items()}
    with caplog.at_level(logging.INFO, logger="vitflow.checkpoints"):
        bb = create_backbone(
            ModelConfig(name=layout.name, kwargs=layout.kwargs), state_dict=ckpt.state_dict
        )
    assert_same_weights(bb.model, src)
    assert f"ignoring {len(before) - len(src.state_dict())} keys of the MAE decoder" in caplog.text
    assert (
        "decoder_blocks, decoder_embed, decoder_norm, decoder_pos_embed, decoder_pred, mask_token"
        in caplog.text
    )
    # The decoder stays readable for whatever loads it next.
    assert sorted(ckpt.state_dict) == sorted(before)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in before.items())


def test_conversion_leaves_the_callers_state_dict_untouched(tmp_path):
    """timm's DINOv2 conversion pops keys from the dict it is given; vitflow gives it a copy,
    so the state dict read_checkpoint returned still holds the whole file."""
    layout = LAYOUTS["dinov2_reg4"]
    src, path = write_official(tmp_path, layout)
    ckpt = read_checkpoint(path)
    keys = sorted(ckpt.state_dict)
    bb = create_backbone(
        ModelConfig(name=layout.name, kwargs=layout.kwargs), state_dict=ckpt.state_dict
    )
    assert_same_weights(bb.model, src)
    assert sorted(ckpt.state_dict) == keys
    assert {"mask_token", "register_tokens"} <= set(keys)


def test_clip_text_tower_is_skipped_with_a_log(tmp_path, caplog):
    layout = LAYOUTS["openai_clip"]
    _, path = write_official(tmp_path, layout)
    with caplog.at_level(logging.INFO, logger="vitflow.checkpoints"):
        create_backbone(ModelConfig(name=layout.name, kwargs=layout.kwargs, checkpoint=path))
    assert "keys of the CLIP text tower" in caplog.text
    assert "token_embedding" in caplog.text


def test_layout_timm_cannot_convert_is_named_as_such(tmp_path):
    """A Hugging Face transformers DINOv2 (``embeddings.*``, ``encoder.layer.*``) is not a
    layout timm converts: the message says so instead of blaming the model name alone."""
    path = tmp_path / "hf_transformers_dinov2.safetensors"
    save_file(
        {
            "embeddings.cls_token": torch.zeros(1, 1, 32),
            "embeddings.patch_embeddings.projection.weight": torch.zeros(32, 3, 14, 14),
            "encoder.layer.0.norm1.weight": torch.zeros(32),
        },
        path,
    )
    with pytest.raises(ModelError) as e:
        create_backbone(
            ModelConfig(name=LAYOUTS["dinov2"].name, kwargs=DINO_KW, checkpoint=str(path))
        )
    msg = str(e.value)
    assert "holds no weight of model 'vit_small_patch14_dinov2'" in msg
    assert "its keys look like embeddings.cls_token" in msg
    assert "layout timm does not convert" in msg


def test_extra_modules_are_named_without_blaming_the_model(tmp_path):
    """A DINO training checkpoint that kept its projection head: the encoder is complete, so
    the message points at the extra keys, not only at model.name."""
    _, path = write_official(tmp_path, LAYOUTS["dinov2"])
    state = dict(torch.load(path, weights_only=True))
    state["dino_head.mlp.0.weight"] = torch.zeros(8, 32)
    torch.save(state, path)
    with pytest.raises(ModelError) as e:
        create_backbone(ModelConfig(name=LAYOUTS["dinov2"].name, kwargs=DINO_KW, checkpoint=path))
    msg = str(e.value)
    assert "unexpected keys: dino_head.mlp.0.weight." in msg
    assert "missing keys" not in msg
    assert "modules besides the image encoder" in msg


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_names_how_to_save_its_state_dict(tmp_path):
    """OpenAI's CLIP ``.pt`` files are TorchScript archives; weights_only refuses them."""
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ModelError, match=r"TorchScript archive.*torch.jit.load.*state_dict\(\)"):
        create_backbone(
            ModelConfig(name=LAYOUTS["openai_clip"].name, kwargs=CLIP_KW, checkpoint=str(path))
        )


# A Hugging Face cache carried to a machine without internet.

HUB_NAME, HUB_KW = LAYOUTS["dinov2"].name, DINO_KW


@pytest.fixture
def hub_env(monkeypatch):
    """Point huggingface_hub at a cache for one test. It reads HF_* variables once, when it is
    imported (documented behaviour), so its constants module is reloaded after they are set,
    and again after they are restored."""
    import huggingface_hub.constants

    def set_env(**env: str) -> None:
        for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"HF_HUB_OFFLINE": "1", **env}.items():
            monkeypatch.setenv(name, value)
        importlib.reload(huggingface_hub.constants)
        assert huggingface_hub.constants.HF_HUB_OFFLINE

    yield set_env
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def fill_hub_cache(cache, repo: str, filename: str, state: dict) -> None:
    """The layout huggingface_hub writes: blobs by sha256, a snapshot per commit whose files
    link to the blobs, and refs/main naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    tmp = folder / "blobs" / "download.incomplete"
    if filename.endswith(".safetensors"):
        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(folder / "blobs" / sha)
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / filename).symlink_to(f"../../blobs/{sha}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.mark.parametrize(
    ("variable", "filename"),
    [("HF_HUB_CACHE", "model.safetensors"), ("HF_HOME", "pytorch_model.bin")],
)
def test_copied_hub_cache_loads_offline(tmp_path, hub_env, variable, filename):
    src = timm.create_model(HUB_NAME, pretrained=False, **HUB_KW).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    repo = timm.models.get_pretrained_cfg(HUB_NAME).hf_hub_id
    assert repo == "timm/vit_small_patch14_dinov2.lvd142m"
    # Filled on a connected machine, copied (links and all) to this one, original gone.
    fill_hub_cache(tmp_path / "connected" / "hub", repo, filename, src.state_dict())
    shutil.copytree(tmp_path / "connected", tmp_path / "offline", symlinks=True)
    shutil.rmtree(tmp_path / "connected")
    home = tmp_path / "offline"
    hub_env(**{variable: str(home / "hub" if variable == "HF_HUB_CACHE" else home)})
    bb = create_backbone(ModelConfig(name=HUB_NAME, kwargs=HUB_KW, weights="hub"))
    assert_same_weights(bb.model, src)
    assert_same_output(bb.model, src, HUB_KW["img_size"])


def test_hub_weights_missing_offline_names_the_cache_folder(tmp_path, hub_env):
    hub_env(HF_HUB_CACHE=str(tmp_path / "empty"))
    with pytest.raises(ModelError) as e:
        create_backbone(ModelConfig(name=HUB_NAME, kwargs=HUB_KW, weights="hub"))
    msg = str(e.value)
    assert f"{tmp_path / 'empty'}/models--timm--vit_small_patch14_dinov2.lvd142m" in msg
    assert "HF_HUB_CACHE" in msg and "docs/weights.md" in msg


def test_a_checkpoint_of_another_patch_size_is_refused_unless_asked_for(tmp_path):
    """timm's filter would resample a /16 kernel into a /32 model: a model that runs but is
    not the checkpoint's. Refused, unless model.kwargs.patch_size asks for it."""
    import pytest
    from safetensors.torch import save_file

    from vitflow.config import ModelConfig
    from vitflow.errors import ModelError

    kw = dict(img_size=64, embed_dim=32, depth=1, num_heads=2)
    src = timm.create_model("vit_base_patch16_224", num_classes=0, **kw)
    save_file(src.state_dict(), tmp_path / "b16.safetensors")
    cfg = ModelConfig(
        name="vit_base_patch32_224", kwargs=kw, checkpoint=str(tmp_path / "b16.safetensors")
    )
    with pytest.raises(ModelError, match="16x16 patch embedding .* 32x32 patches"):
        create_backbone(cfg)
    on_purpose = cfg.model_copy(update={"kwargs": {**kw, "patch_size": 32}})
    bb = create_backbone(on_purpose)
    assert bb.model.patch_embed.proj.weight.shape[-1] == 32
