"""The model that pretraining optimises: a timm backbone and a projection head, built from
a seed or started from a checkpoint.

A run starts from one of:

- a seeded random init: ``seed`` decides the backbone's and the head's initial weights;
- timm's hub weights (``model.weights: hub``);
- ``model.checkpoint``, local or in object storage: a timm state dict (a whole-model save,
  classifier keys are skipped), an official layout timm converts, a vitflow-exported
  backbone (``*-backbone.safetensors``: it names its architecture, so ``model.name`` may be
  left out) or a vitflow training checkpoint (``checkpoint_*/state.pt``). A projection head
  saved with it is reused when its shapes match the job's head; otherwise the head is
  initialised from ``seed`` and the run says so.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import timm
import torch
from torch import nn

from vitflow.backbone import META_ARCH, META_KWARGS, create_model, match_state_dict
from vitflow.checkpoint_files import Checkpoint
from vitflow.checkpoints import read_checkpoint
from vitflow.errors import ModelError
from vitflow.heads import HEAD_PREFIX, ProjectionHead
from vitflow.training.config import TrainConfig

log = logging.getLogger(__name__)

# Prefixes of a training checkpoint's model state (ContrastiveModel's attribute names).
_TRAIN_BACKBONE, _TRAIN_HEAD = "backbone.", "head."
# Keys an exported backbone may carry besides its encoder and head (MAE decoder, dense PCA).
_NOT_TRAINED = ("mae_decoder.", "dense_pca.")
_HEAD_STREAM = 1  # the head's init seed is derived from (seed, _HEAD_STREAM)


class ContrastiveModel(nn.Module):
    """timm backbone (no classifier) + projection head; ``forward`` returns projections.

    ``init`` says where the weights came from, e.g. ``{"backbone": "seed 3", "head": "seed 3"}``
    (logged to the run's metrics.jsonl at step 0).
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead, init: dict[str, str]):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.init = init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, S, S) -> (B, num_features) -> (B, E)


def pooled_width(backbone: nn.Module) -> int:
    """Width of what the classifier-less backbone returns: timm's ``head_hidden_size`` where
    a pre-logits layer widens it (MobileNetV3, EfficientNet-style conv heads), else
    ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def resolve_architecture(cfg: TrainConfig, checkpoint: Checkpoint | None = None) -> TrainConfig:
    """Fill ``model.name`` and ``model.kwargs`` from a vitflow-exported ``model.checkpoint``.

    The driver calls this once, so the workers, the export and the plots all see the
    architecture by name. A checkpoint that names a different architecture than
    ``model.name`` is refused, naming both. ``checkpoint``: the file, when already read.
    """
    m = cfg.model
    if not m.checkpoint:
        return cfg
    meta = (checkpoint or _read(cfg)).metadata
    arch = meta.get(META_ARCH)
    if not arch:
        if not m.name:
            raise ModelError(
                f"model.checkpoint {m.checkpoint!r} does not name its architecture (it is not "
                "a vitflow-exported backbone); set model.name to the timm model it was saved from"
            )
        return cfg
    if m.name and m.name.split(".")[0] != arch.split(".")[0]:
        raise ModelError(
            f"model.name is {m.name!r} but model.checkpoint {m.checkpoint!r} is a vitflow "
            f"export of a {arch!r} backbone; set model.name to {arch!r} or leave it out"
        )
    kwargs = {**json.loads(meta.get(META_KWARGS) or "{}"), **m.kwargs}
    model = m.model_copy(update={"name": m.name or arch, "kwargs": kwargs})
    return cfg.model_copy(update={"model": model})


def build_model(cfg: TrainConfig) -> ContrastiveModel:
    """The job's backbone + projection head, with their initial weights (module docstring).

    Example:
        >>> from vitflow.config import load_config
        >>> cfg = load_config("jobs/simo2-digits.yaml", schema=TrainConfig)  # doctest: +SKIP
        >>> build_model(cfg).init  # doctest: +SKIP
        {'backbone': 'seed 0', 'head': 'seed 0'}
    """
    ckpt = _read(cfg) if cfg.model.checkpoint else None
    cfg = resolve_architecture(cfg, ckpt)
    m = cfg.model
    # Backbone and head draw from streams of their own, so the head's init is the same
    # whether the backbone was initialised or loaded. fork_rng leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)  # the CPU one: modules init on the CPU
        if m.checkpoint or m.weights == "hub":
            backbone = create_model(m)  # its init is overwritten by the weights
        else:
            backbone = _seeded_timm_model(cfg)
        torch.default_generator.manual_seed(
            int(np.random.SeedSequence([cfg.seed, _HEAD_STREAM]).generate_state(1)[0])
        )
        head = ProjectionHead(pooled_width(backbone), m.embedding_dim, m.head_hidden_dim)
    init = {"backbone": "hub weights" if m.weights == "hub" else f"seed {cfg.seed}"}
    init["head"] = f"seed {cfg.seed}"
    if m.checkpoint:
        body, head_state = _split_state(ckpt.state_dict)
        backbone.load_state_dict(
            match_state_dict(
                backbone, body, m.checkpoint, allow_patch_resample="patch_size" in m.kwargs
            ),
            strict=True,
        )
        init["backbone"] = m.checkpoint
        if head_state:
            init["head"] = _load_head(head, head_state, cfg)
    return ContrastiveModel(backbone, head, init)


def _read(cfg: TrainConfig):
    uri = cfg.model.checkpoint
    return read_checkpoint(uri, cfg.storage.options_for(uri))


def _seeded_timm_model(cfg: TrainConfig) -> nn.Module:
    """``create_model`` with the random init drawn from the global generator (which
    :func:`build_model` seeded with ``cfg.seed``) instead of create_model's fixed seed 0."""
    m = cfg.model
    if not timm.is_model(m.name):
        create_model(m)  # raises, naming close matches
    try:
        model = timm.create_model(m.name, pretrained=False, **{**m.kwargs, "num_classes": 0})
    except Exception:
        create_model(m)  # raises the same failure as a ModelError naming model.kwargs
        raise
    return model.eval()


def _split_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone keys, head keys) of an export (``projection_head.*``), a training
    checkpoint (``backbone.*`` / ``head.*``) or a plain state dict (no head)."""
    if any(k.startswith(_TRAIN_BACKBONE) for k in state) and all(
        k.startswith((_TRAIN_BACKBONE, _TRAIN_HEAD)) for k in state
    ):
        body = {
            k[len(_TRAIN_BACKBONE) :]: v for k, v in state.items() if k.startswith(_TRAIN_BACKBONE)
        }
        head = {k[len(_TRAIN_HEAD) :]: v for k, v in state.items() if k.startswith(_TRAIN_HEAD)}
        return body, head
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    body = {k: v for k, v in state.items() if not k.startswith((HEAD_PREFIX, *_NOT_TRAINED))}
    return body, head


def _load_head(head: ProjectionHead, saved: dict[str, torch.Tensor], cfg: TrainConfig) -> str:
    """Load the checkpoint's head when it has the job's shapes; else keep the seeded init and
    say why. Returns where the head's weights came from."""
    own = head.state_dict()
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    if shapes == {k: tuple(v.shape) for k, v in own.items()}:
        head.load_state_dict(saved, strict=True)
        return cfg.model.checkpoint
    log.warning(
        "model.checkpoint %s: its projection head (%s) does not fit the job's (%s, from "
        "model.embedding_dim and model.head_hidden_dim); the head starts from seed %d, the "
        "backbone from the checkpoint",
        cfg.model.checkpoint,
        _weight_shapes(shapes),
        _weight_shapes({k: tuple(v.shape) for k, v in own.items()}),
        cfg.seed,
    )
    return f"seed {cfg.seed} (the checkpoint's head has other shapes)"


def _weight_shapes(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {list(s)}" for k, s in shapes.items() if k.endswith("weight"))
