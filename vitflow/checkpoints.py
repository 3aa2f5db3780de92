"""Fitting a checkpoint's weights to a timm model.

Official layouts (Meta's DINOv2 and MAE, OpenAI CLIP, open_clip, DeiT) are converted by the
timm model's own ``checkpoint_filter_fn``, which also resamples the position embedding to
``model.kwargs.img_size``; parts that are not the image encoder (an MAE decoder, a CLIP text
tower) are set aside with a log; what is left over is named key by key. Reading the files
lives in :mod:`vitflow.checkpoint_files`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable

import timm
import torch

from vitflow.checkpoint_files import (  # noqa: F401 - re-exported for callers of this module
    Checkpoint,
    read_checkpoint,
    safetensors_metadata,
)
from vitflow.errors import ModelError

log = logging.getLogger(__name__)


_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")
_MAX_KEYS_SHOWN = 8


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(n + "." for n in names)


# Parts of a checkpoint that are not the image encoder. The backbone skips them; they stay
# in the file (and in read_checkpoint's state dict) for whatever needs them later.
_MAE_DECODER = ("decoder_embed", "decoder_blocks.", "decoder_norm", "decoder_pred", "decoder_pos")
_CLIP_IMAGE_TOWER = "visual."


def non_encoder_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, list[str]]:
    """Name the keys of ``state`` that belong to another part of the network than the encoder.

    Args:
        state: a checkpoint's state dict, wrapper prefixes already stripped.
        expected: the model's own keys; these are never listed.

    Returns:
        ``{part: sorted keys}`` for the parts found: ``"MAE decoder"`` (``decoder_*`` and the
        ``mask_token`` that goes with it in MAE's full checkpoints) and ``"CLIP text tower"``
        (everything outside ``visual.`` in an OpenAI CLIP or open_clip checkpoint).
    """
    parts: dict[str, list[str]] = {}
    decoder = [k for k in state if k.startswith(_MAE_DECODER)]
    if decoder:
        # Without a decoder, mask_token is DINOv2's, which timm's filter needs to see.
        parts["MAE decoder"] = decoder + [k for k in ("mask_token",) if k in state]
    if any(k.startswith(_CLIP_IMAGE_TOWER) for k in state):
        parts["CLIP text tower"] = [k for k in state if not k.startswith(_CLIP_IMAGE_TOWER)]
    parts = {part: sorted(k for k in keys if k not in expected) for part, keys in parts.items()}
    return {part: keys for part, keys in parts.items() if keys}


def timm_checkpoint_filter(model: torch.nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` timm applies to this model's pretrained weights, if any.

    timm hands it to ``build_model_with_cfg`` from the module that registers the model, which
    is not always the module of its class (``vision_transformer_hybrid`` builds a
    ``VisionTransformer``), so that module is asked first.
    """
    names = []
    arch = model.pretrained_cfg.get("architecture")
    if arch and timm.is_model(arch):
        names.append(timm.models.model_entrypoint(arch).__module__)
    names.append(type(model).__module__)
    for name in names:
        fn = getattr(sys.modules.get(name), "checkpoint_filter_fn", None)
        if callable(fn):
            if "adapt_layer_scale" in inspect.signature(fn).parameters:
                # As timm's DeiT entrypoints do: DeiT III's official checkpoints name layer
                # scale gamma_1/gamma_2; timm's own ViT keys (ls1.gamma) never match it.
                fn = functools.partial(fn, adapt_layer_scale=True)
            return fn
    return None


# Where each layout keeps its patch embedding (timm/DINOv2/MAE/DeiT, OpenAI CLIP, open_clip).
_PATCH_KERNELS = ("patch_embed.proj.weight", "visual.conv1.weight", "conv1.weight")


def _check_patch_size(model: torch.nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    mine = model.state_dict().get("patch_embed.proj.weight")
    theirs = next((state[k] for k in _PATCH_KERNELS if k in state), None)
    if mine is None or theirs is None or theirs.ndim != 4:
        return
    if tuple(theirs.shape[-2:]) != tuple(mine.shape[-2:]):
        raise ModelError(
            f"checkpoint {uri!r} has a {theirs.shape[-2]}x{theirs.shape[-1]} patch embedding but "
            f"model {model.pretrained_cfg.get('architecture')!r} uses "
            f"{mine.shape[-2]}x{mine.shape[-1]} patches; loading it would resample the patch "
            "weights and give another model's vectors. Use the model name with the checkpoint's "
            "patch size (e.g. patch14 for DINOv2), or set model.kwargs.patch_size to resample "
            "on purpose"
        )


def convert_checkpoint(
    model: torch.nn.Module, state: dict[str, torch.Tensor], uri: str
) -> dict[str, torch.Tensor]:
    """Convert ``state`` to timm's layout for ``model`` with timm's own filter for it.

    The filter renames official layouts (Meta's DINOv2, OpenAI CLIP, open_clip, DeiT III) and
    resamples the position embedding (and patch embedding) to the model's size; a state dict
    already in timm's layout passes through. ``state`` itself is not modified.
    """
    fn = timm_checkpoint_filter(model)
    if fn is None:
        return dict(state)
    base = getattr(fn, "func", fn)
    where = f"{base.__module__}.{base.__name__}"
    try:
        try:
            out = fn(dict(state), model)
        except TypeError:  # one-argument filters, which timm's load_pretrained also accepts
            out = fn(dict(state))
    except Exception as e:
        raise ModelError(
            f"checkpoint {uri!r} cannot be converted to the layout of "
            f"{model.pretrained_cfg.get('architecture')!r} by timm's {where}: "
            f"{type(e).__name__}: {e}. Re-save it in timm's layout, or set model.name to the "
            "architecture it was saved from"
        ) from e
    if set(out) != set(state):
        log.info("checkpoint %s: converted to timm's layout by %s", uri, where)
    return out


def match_state_dict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    uri: str,
    *,
    allow_patch_resample: bool = False,
) -> dict:
    """Return the weights in ``state`` that load into ``model``, or raise naming every mismatch.

    In order: common wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
    torch.compile) are stripped when that makes the keys match; parts that are not the image
    encoder (an MAE decoder, a CLIP text tower) are skipped with an info log; timm's
    ``checkpoint_filter_fn`` for the model converts official layouts and resamples the
    position embedding (:func:`convert_checkpoint`); keys of the model's classifier head are
    dropped (the backbone has none). Whatever is left must match the model exactly.
    ``state`` is not modified.

    timm's filter would also resample a patch embedding of another patch size; that gives
    a model that runs but is not the checkpoint's, so it is refused unless
    ``allow_patch_resample`` (set when the job asks for ``model.kwargs.patch_size``).
    """
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    other = non_encoder_keys(state, set(expected))
    for part, keys in other.items():
        groups = sorted({k.split(".")[0] for k in keys})
        log.info(
            "checkpoint %s: ignoring %d keys of the %s for the backbone (%s)",
            uri,
            len(keys),
            part,
            ", ".join(groups[:_MAX_KEYS_SHOWN]),
        )
    skip = {k for keys in other.values() for k in keys}
    if not allow_patch_resample:
        _check_patch_size(model, state, uri)
    state = convert_checkpoint(model, {k: v for k, v in state.items() if k not in skip}, uri)
    head = _classifier_prefixes(model)
    dropped = [k for k in state if k not in expected and k.startswith(head)]
    kept = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in kept.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        raise _mismatch_error(model, uri, kept, missing, unexpected, shapes)
    if dropped:
        log.info("checkpoint %s: ignoring %d classifier-head keys", uri, len(dropped))
    return kept


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more


def _mismatch_error(
    model: torch.nn.Module,
    uri: str,
    kept: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
) -> ModelError:
    arch = model.pretrained_cfg.get("architecture")
    if not set(kept) - set(unexpected):
        return ModelError(
            f"checkpoint {uri!r} holds no weight of model {arch!r}, even after timm's conversion "
            f"for it: its keys look like {', '.join(sorted(kept)[:3]) or 'nothing'}, the "
            f"model's like {', '.join(missing[:3])}. The file is in a layout timm does not "
            "convert for this model (re-save it in timm's layout), or it holds another "
            "architecture (set model.name to that one)"
        )
    parts = [
        f"{label}: {_shown(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if keys
    ]
    if shapes or (missing and unexpected):
        hint = (
            "Check that model.name and model.kwargs (e.g. embed_dim, depth, patch_size) "
            "describe the architecture the checkpoint was saved from"
        )
    elif missing:
        hint = (
            "The checkpoint lacks weights the model has: it is a partial save (e.g. of the "
            "trainable parameters only), or of a shallower variant (check model.name and "
            "model.kwargs such as depth)"
        )
    else:
        hint = (
            "The checkpoint has weights the model lacks: it is of a deeper or larger variant "
            "(check model.name and model.kwargs such as depth), or it carries modules besides "
            "the image encoder (remove them from the file)"
        )
    return ModelError(
        f"checkpoint {uri!r} does not fit model {arch!r}: " + "; ".join(parts) + ". " + hint
    )


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k in expected for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
