"""Build a timm backbone from a :class:`~vitflow.config.ModelConfig` and load its weights.

The backbone is always created without its classifier (``num_classes=0``): embeddings
never need it, and a whole-model checkpoint's head keys are then recognised and skipped.
Reading and converting checkpoint files lives in :mod:`vitflow.checkpoints`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from safetensors.torch import load as load_safetensors_bytes
from timm.data import resolve_model_data_config

from vitflow.checkpoints import match_state_dict, read_checkpoint, safetensors_metadata
from vitflow.config import ModelConfig
from vitflow.errors import ModelError
from vitflow.heads import HEAD_PREFIX, ProjectionHead

__all__ = [
    "Backbone",
    "backbone_bytes",
    "backbone_from_bytes",
    "create_backbone",
    "create_model",
    "data_config",
    "match_state_dict",
    "read_checkpoint",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)


def create_model(cfg: ModelConfig) -> torch.nn.Module:
    """Create the timm architecture named by ``cfg`` (without classifier), in eval mode."""
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name.split(".")[0], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"unknown timm model {cfg.name!r}{hint}")
    kwargs = {**cfg.kwargs, "num_classes": 0}
    try:
        # Random init is seeded: a rerun, a resume or another replica gets the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(cfg.name, pretrained=cfg.weights == "hub", **kwargs)
    except TypeError as e:
        raise ModelError(
            f"timm cannot build {cfg.name!r} with model.kwargs {cfg.kwargs}: {e}"
        ) from e
    except Exception as e:
        if cfg.weights == "hub":
            raise ModelError(
                f"could not fetch the hub weights of {cfg.name!r}: {type(e).__name__}: {e}. "
                f"{_hub_cache_hint(cfg.name)}Without internet, copy a Hugging Face cache that "
                "holds them to this machine and set HF_HUB_CACHE (with HF_HUB_OFFLINE=1), or "
                "pass the weights file as model.checkpoint (--checkpoint); see docs/weights.md"
            ) from e
        raise ModelError(
            f"timm cannot build {cfg.name!r} with model.kwargs {cfg.kwargs}: "
            f"{type(e).__name__}: {e}"
        ) from e
    return model.eval()


def _hub_cache_hint(name: str) -> str:
    """Where timm looked for ``name``'s hub weights, as a sentence (empty if unknown)."""
    from huggingface_hub import constants

    try:
        repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    except RuntimeError:  # an unknown pretrained tag; timm's own message says so
        return ""
    if not repo:
        return ""
    folder = f"{constants.HF_HUB_CACHE}/models--{repo.split('@')[0].replace('/', '--')}"
    return f"timm reads them from the hub repo {repo} (cached in {folder}). "


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's timm eval preprocessing (input size, interpolation, mean/std, crop)."""
    cfg = dict(resolve_model_data_config(model))
    # A ViT built with img_size=... keeps its pretrained cfg's input size; the patch embed
    # only accepts its own size, so that size wins.
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is not None and not getattr(pe, "dynamic_img_size", False):
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    return cfg


# Metadata keys of a vitflow-exported backbone (safetensors header, strings only).
META_ARCH = "vitflow.architecture"
META_KWARGS = "vitflow.model_kwargs"
META_DATA_CONFIG = "vitflow.data_config"
META_HEAD = "vitflow.projection_head"
META_MAE = "vitflow.mae_decoder"  # the decoder's head count; its tensors under MAE_PREFIX
MAE_PREFIX = "mae_decoder."
PCA_PREFIX = "dense_pca."  # dense_pca.<feature>.components / .mean: a dense map's fitted PCA


@dataclass
class Backbone:
    """A loaded backbone, its preprocessing, where its weights came from, and the projection
    head when the checkpoint carries one (vitflow-trained backbones do)."""

    model: torch.nn.Module
    data_config: dict[str, Any]
    checkpoint_sha256: str | None = None
    head: torch.nn.Module | None = None
    name: str | None = None
    kwargs: dict[str, Any] | None = None
    mae_decoder: torch.nn.Module | None = None  # with model.mae_loss (vitflow.mae.MAEDecoder)
    # Dense feature sets' fitted PCAs: {feature: {"components": (k, D), "mean": (D,)}}
    dense_pca: dict[str, dict[str, torch.Tensor]] | None = None


def _resolve_architecture(cfg: ModelConfig, metadata: dict[str, str]) -> ModelConfig:
    """Fill model.name/kwargs from an exported backbone's metadata; refuse a contradiction."""
    arch = metadata.get(META_ARCH)
    if not arch:
        if not cfg.name:
            raise ModelError(
                f"checkpoint {cfg.checkpoint!r} does not name its architecture; set model.name"
            )
        return cfg
    kwargs = {**json.loads(metadata.get(META_KWARGS, "{}")), **cfg.kwargs}
    if cfg.name and cfg.name.split(".")[0] != arch.split(".")[0]:
        raise ModelError(
            f"model.name is {cfg.name!r} but checkpoint {cfg.checkpoint!r} holds a {arch!r} "
            "backbone; drop model.name or fix it"
        )
    return cfg.model_copy(update={"name": cfg.name or arch, "kwargs": kwargs})


def _loaded_without_init(
    cfg: ModelConfig, body: dict[str, torch.Tensor], source: str
) -> torch.nn.Module | None:
    """The architecture built on the meta device (no memory, no random init) and given
    ``body``'s tensors as its own; None where that would not give exactly the model
    :func:`create_model` + ``load_state_dict`` gives, so the caller takes that way instead.

    Random init is most of a model's build time (about 1 s for ViT-B/16 on a busy core,
    10+ s for a ViT-g), paid by every model actor only to be overwritten. It can be skipped
    only where the state dict is the whole model: no non-persistent buffers (rotary tables,
    computed at init and not saved), no tensor held as a plain attribute, no tied weights
    (assignment would untie them), and nothing left on the meta device after loading.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(
                cfg.name, pretrained=False, **{**cfg.kwargs, "num_classes": 0}
            )
    except Exception:  # e.g. an init that reads a tensor's value: the ordinary way decides
        return None
    modules = list(model.modules())
    if any(m._non_persistent_buffers_set for m in modules) or any(
        isinstance(v, torch.Tensor) for m in modules for v in vars(m).values()
    ):
        return None
    if len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters())):
        return None
    try:
        matched = match_state_dict(
            model, body, source, allow_patch_resample="patch_size" in cfg.kwargs
        )
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        model.load_state_dict(
            {k: v.to(dtypes[k]) for k, v in matched.items()}, strict=True, assign=True
        )
    except Exception:  # a mismatch is reported by the ordinary way, which runs next; a
        return None  # filter that cannot run on meta tensors falls back there too
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model.eval()


def create_backbone(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    skip_init: bool = False,
) -> Backbone:
    """Build the backbone and load its weights (and projection head, if the checkpoint has one).

    Args:
        cfg: the model section of the job config.
        state_dict: weights to load instead of reading ``cfg.checkpoint`` (model actors get
            the driver's validated weights this way, so every replica is identical); may
            hold ``projection_head.*`` keys.
        metadata: the checkpoint metadata that goes with ``state_dict``.
        storage_options: fsspec options for reading ``cfg.checkpoint`` from object storage.
        skip_init: with ``state_dict``, build the model without random init where that gives
            the same model (:func:`_loaded_without_init`); model actors start faster.

    Example:
        >>> from vitflow.config import ModelConfig
        >>> bb = create_backbone(ModelConfig(name="resnet18"))
        >>> bb.data_config["input_size"]
        (3, 224, 224)
    """
    sha = None
    if state_dict is None and cfg.checkpoint:
        ckpt = read_checkpoint(cfg.checkpoint, storage_options)
        state_dict, metadata, sha = ckpt.state_dict, ckpt.metadata, ckpt.sha256
    metadata = metadata or {}
    if cfg.checkpoint:
        cfg = _resolve_architecture(cfg, metadata)
    head = None
    model = None
    mae_state: dict[str, torch.Tensor] = {}
    dense_pca: dict[str, dict[str, torch.Tensor]] = {}
    if state_dict is not None:
        head_state = {
            k[len(HEAD_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)
        }
        # The decoder as backbone_bytes ships it; an official MAE checkpoint's decoder_* keys
        # stay in the body, where match_state_dict skips them as not the encoder's.
        mae_state = {
            k[len(MAE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MAE_PREFIX)
        }
        for k, v in state_dict.items():
            if k.startswith(PCA_PREFIX):
                feature, part = k[len(PCA_PREFIX) :].rsplit(".", 1)
                dense_pca.setdefault(feature, {})[part] = v
        body = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith((HEAD_PREFIX, MAE_PREFIX, PCA_PREFIX))
        }
        if cfg.mae_loss is not None and not mae_state:
            from vitflow.mae import decoder_state

            mae_state = decoder_state(body)
        source = cfg.checkpoint or "state dict"
        if skip_init:
            model = _loaded_without_init(cfg, body, source)
        if model is None:
            model = create_model(cfg)
            model.load_state_dict(
                match_state_dict(
                    model, body, source, allow_patch_resample="patch_size" in cfg.kwargs
                ),
                strict=True,
            )
        if head_state:
            spec = json.loads(metadata.get(META_HEAD, "{}"))
            if not spec:
                raise ModelError(
                    f"checkpoint {cfg.checkpoint!r} has projection-head weights but no {META_HEAD} metadata"
                )
            head = ProjectionHead(**spec)
            head.load_state_dict(head_state, strict=True)
            head.eval()
    else:
        model = create_model(cfg)
    mae_decoder = None
    if cfg.mae_loss is not None:
        mae_decoder = _mae_decoder(cfg, model, mae_state, metadata)
    dc = data_config(model)
    if META_DATA_CONFIG in metadata:
        # Preprocess exactly as the backbone was trained/evaluated.
        dc = {**dc, **json.loads(metadata[META_DATA_CONFIG])}
        dc["input_size"] = tuple(dc["input_size"])
        dc["mean"], dc["std"] = tuple(dc["mean"]), tuple(dc["std"])
    return Backbone(
        model=model.eval(),
        data_config=dc,
        checkpoint_sha256=sha,
        head=head,
        name=cfg.name,
        kwargs=dict(cfg.kwargs),
        mae_decoder=mae_decoder,
        dense_pca=dense_pca or None,
    )


def _mae_decoder(
    cfg: ModelConfig,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> torch.nn.Module:
    """The MAE decoder of ``model.mae_loss``, from the checkpoint's decoder keys, checked
    against the encoder it decodes for."""
    from vitflow.mae import MAEDecoder, check_encoder

    where = f"model.checkpoint {cfg.checkpoint!r}" if cfg.checkpoint else "the weights"
    try:
        check_encoder(model)
        patch = model.patch_embed.patch_size[0]
        heads = int(metadata.get(META_MAE) or cfg.mae_loss.decoder_heads)
        decoder = MAEDecoder.from_state_dict(state, patch_size=patch, num_heads=heads)
    except (ValueError, RuntimeError, AttributeError, AssertionError) as e:
        raise ModelError(f"model.mae_loss: {where}: {e}") from None
    dim = model.embed_dim
    if decoder.decoder_embed.in_features != dim:
        raise ModelError(
            f"model.mae_loss: {where} holds a decoder for a {decoder.decoder_embed.in_features}-"
            f"wide encoder, but {cfg.name!r} is {dim} wide"
        )
    if decoder.decoder_pos_embed.shape[1] - 1 != model.patch_embed.num_patches:
        raise ModelError(
            f"model.mae_loss: {where} holds a decoder for "
            f"{decoder.decoder_pos_embed.shape[1] - 1} patches, but the model sees "
            f"{model.patch_embed.num_patches} at its input size"
        )
    return decoder.eval()


def backbone_bytes(bb: Backbone, extra_metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a backbone (+ projection head) as safetensors bytes that name their
    architecture, model kwargs and preprocessing, so loading needs no other setting."""
    from safetensors.torch import save

    # clone(): safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().clone().contiguous() for k, v in bb.model.state_dict().items()}
    metadata = {
        META_ARCH: str(bb.name),
        META_KWARGS: json.dumps(bb.kwargs or {}),
        META_DATA_CONFIG: json.dumps(bb.data_config),
        **(extra_metadata or {}),
    }
    if bb.head is not None:
        tensors.update(
            {
                HEAD_PREFIX + k: v.detach().clone().contiguous()
                for k, v in bb.head.state_dict().items()
            }
        )
        metadata[META_HEAD] = json.dumps(bb.head.spec())
    if bb.mae_decoder is not None:
        tensors.update(
            {
                MAE_PREFIX + k: v.detach().clone().contiguous()
                for k, v in bb.mae_decoder.state_dict().items()
            }
        )
        metadata[META_MAE] = str(bb.mae_decoder.decoder_blocks[0].attn.num_heads)
    for feature, fitted in (bb.dense_pca or {}).items():
        for part, t in fitted.items():
            tensors[f"{PCA_PREFIX}{feature}.{part}"] = t.detach().float().contiguous()
    return save(tensors, metadata=metadata)


def weights_fingerprint(raw: bytes) -> str:
    """sha256 of safetensors bytes that ignores the header's key order (safetensors writes
    its header from a hash map, so equal weights can serialise to different bytes)."""
    import struct

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(memoryview(raw)[8 + n :])
    return h.hexdigest()


def backbone_from_bytes(raw: bytes, cfg: ModelConfig) -> Backbone:
    """Inverse of :func:`backbone_bytes` (model actors receive the driver's backbone this way)."""
    # The weights are all here: never fetch hub weights again on a worker.
    cfg = cfg.model_copy(update={"weights": None})
    return create_backbone(
        cfg,
        state_dict=load_safetensors_bytes(raw),
        metadata=safetensors_metadata(raw),
        skip_init=True,
    )
