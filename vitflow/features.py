"""Layer hooks: every requested feature set from ONE forward pass of the backbone.

A :class:`FeatureExtractor` resolves each :class:`~vitflow.config.FeatureConfig` against the
model once (layer indices, pooling, output width), then per batch runs the backbone a single
time for the union of requested layers and pools, aggregates and normalises per feature set.

Block outputs come from timm's ``forward_intermediates`` (un-normed; ``norm: true`` applies
the model's final norm afterwards, per token, which is what timm's ``norm=True`` does); a
model without that API falls back to forward hooks on the modules its ``feature_info`` names.

A ``dense`` feature set keeps the spatial layout instead of pooling: the layers' patch tokens
(or a CNN stage's map) as ``(h, w, D)`` per image, each cell normalised as ``normalize``
says, and with ``shift`` upscaled by pixel shifts (:func:`vitflow.dense.pixel_shift`: one
more backbone pass per shifted copy, for that feature set only).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from vitflow.config import FeatureConfig
from vitflow.errors import ModelError
from vitflow.pooling import (
    KIND_WORDS,
    POOLS,
    Pool,
    PoolKind,
    aggregate_layers,
    find_pool,
    normalize_vectors,
    pool_map,
    pool_names,
    pool_tokens,
    spell_choices,
)

_POOLED = "pooled"  # key of the backbone's own pooled output in the intermediates dict


def num_layers(model: torch.nn.Module) -> int:
    """How many intermediates the model exposes (timm's ``feature_take_indices`` domain)."""
    info = getattr(model, "feature_info", None)
    if info is not None and len(info) > 0:
        return len(info)
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, torch.nn.Sequential | torch.nn.ModuleList):
            return len(seq)
    raise ModelError(
        f"cannot tell the layers of {type(model).__name__}: it has no feature_info, blocks or stages"
    )


def resolve_layers(layers: int | list[int], n: int, feature: str) -> tuple[int, ...]:
    """Resolve a layer spec exactly as timm's ``feature_take_indices`` does, with a clear error.

    An int ``k`` means the last ``k`` layers; a list holds indices, negatives from the end.
    """
    if isinstance(layers, int):
        if layers > n:
            raise ModelError(
                f"feature {feature!r} asks for the last {layers} layers, but the model has {n}; "
                f"use layers <= {n}"
            )
        return tuple(range(n - layers, n))
    out = []
    for i in layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ModelError(
                f"feature {feature!r}: layer index {i} is out of range for a model with {n} "
                f"layers (valid: {-n}..{n - 1})"
            )
        out.append(j)
    return tuple(out)


@dataclass(frozen=True)
class FeaturePlan:
    """One feature set resolved against a model.

    A ``backbone`` feature pools block outputs: ``indices`` are the blocks, ``pool`` a name
    of :data:`vitflow.pooling.POOLS` (aliases resolved, e.g. ``mean`` on a map is ``avg``).
    A ``head`` feature is the projection head on the backbone's pooled output: it has no
    blocks, no pool and no aggregation.
    """

    name: str
    source: str  # "backbone" | "head"
    indices: tuple[int, ...]
    pool: str | None
    aggregate: str | None
    norm: bool
    normalize: str
    dim: int = 0
    dense: bool = False
    shift: dict | None = None  # ShiftConfig as a dict (pixels, neighbourhood, stride)
    shape: tuple[int, ...] = ()  # dense: (h, w, D) of the stored map
    stride: int | list[int] = 0  # dense: pixels per map cell ([rows, cols] if not square)
    pca: int | None = None  # dense: principal components kept per cell (None: all D)
    map_channels: int = 0  # dense: D of the map on the device (before any PCA)


def _has_cls(model: torch.nn.Module) -> bool:
    flag = getattr(model, "has_class_token", None)
    if flag is not None:
        return bool(flag)
    return getattr(model, "cls_token", None) is not None


class FeatureExtractor(torch.nn.Module):
    """Computes named feature vectors from one backbone forward pass.

    Args:
        model: a timm backbone in eval mode.
        features: the feature sets to compute.
        input_size: ``(C, H, W)`` the model is fed; used once for a dry run that checks the
            spec fits and measures each feature's width.
        extractor: ``auto`` | ``intermediates`` | ``hooks``.

    Example:
        >>> import timm, torch
        >>> from vitflow.config import FeatureConfig
        >>> m = timm.create_model("resnet18", num_classes=0).eval()
        >>> fx = FeatureExtractor(m, [FeatureConfig(name="emb", pool="gem")], (3, 64, 64))
        >>> fx(torch.zeros(2, 3, 64, 64))["emb"].shape
        torch.Size([2, 512])
    """

    def __init__(
        self,
        model,
        features: list[FeatureConfig],
        input_size,
        extractor: str = "auto",
        head: torch.nn.Module | None = None,
        pca: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        # Dense maps' fitted PCAs ({feature: {"components": (k, D), "mean": (D,)}}): a dense
        # set that asks for pca is stored projected once its PCA is given (vitflow.embed
        # fits it on a sample with this extractor built without one).
        self._pca = {}
        for name, fitted in (pca or {}).items():
            self.register_buffer(f"pca_{name}_components", fitted["components"].float())
            self.register_buffer(f"pca_{name}_mean", fitted["mean"].float())
            self._pca[name] = (f"pca_{name}_components", f"pca_{name}_mean")
        self.head = head.eval() if head is not None else None
        for f in features:
            if f.source == "head" and head is None:
                raise ModelError(
                    f"feature {f.name!r} has source: head, but the checkpoint has no projection "
                    "head (only vitflow-trained backbones carry one); use source: backbone"
                )
        self.need_final = any(f.source == "head" for f in features)
        if extractor == "auto":
            extractor = "intermediates" if hasattr(model, "forward_intermediates") else "hooks"
        if extractor == "intermediates" and not hasattr(model, "forward_intermediates"):
            raise ModelError(
                f"{type(model).__name__} has no forward_intermediates; use model.extractor: hooks"
            )
        self.mode = extractor
        self.n_layers = num_layers(model)
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        plans = [
            FeaturePlan(f.name, "head", (), None, None, False, f.normalize)
            if f.source == "head"
            else FeaturePlan(
                f.name,
                "backbone",
                resolve_layers(f.layers, self.n_layers, f.name),
                None if f.dense else f.pool,
                f.aggregate,
                f.norm,
                f.normalize,
                dense=f.dense,
                shift=f.shift.model_dump() if f.shift is not None else None,
                pca=f.pca if f.dense else None,
            )
            for f in features
        ]
        # Head-only jobs still take the last block so the probe below can see the output kind.
        self.take = tuple(sorted({i for p in plans for i in p.indices})) or (self.n_layers - 1,)
        self._final_norm = getattr(model, "norm", None)
        if self.mode == "hooks":
            self._hook_modules = self._feature_modules()
        self.input_size = tuple(input_size)
        with torch.inference_mode():
            probe = self._intermediates(torch.zeros(1, *input_size))
            self.kind: PoolKind = "map" if probe[self.take[0]][0].ndim == 4 else "token"
            self.plans = [self._check(p, probe) for p in plans]

    # -- planning -------------------------------------------------------------------------

    def _check(self, plan: FeaturePlan, probe) -> FeaturePlan:
        if plan.dense:
            return self._check_dense(plan, probe)
        if plan.source == "backbone":
            plan = replace(plan, pool=self._resolve_pool(plan).name)
            if plan.norm and self.kind == "map":
                raise ModelError(
                    f"feature {plan.name!r}: norm: true applies a ViT's final norm to tokens; "
                    f"{self._arch()} gives feature maps, so set norm: false"
                )
            if plan.norm and not isinstance(self._final_norm, torch.nn.Module):
                raise ModelError(
                    f"feature {plan.name!r}: norm: true, but {self._arch()} has no final norm"
                )
        try:
            vec = self._pool_one(plan, probe)
        except ValueError as e:
            raise ModelError(f"feature {plan.name!r}: {e}") from e
        dim = int(vec.shape[-1])
        # The registry's width rule must hold, or the output column would be mis-sized.
        if plan.source == "backbone" and dim != (expected := self._width(plan, probe)):
            raise ModelError(
                f"feature {plan.name!r}: pool {plan.pool!r} gave {dim} values where its width "
                f"rule says {expected}; {self._arch()}'s block outputs are not laid out as "
                "vitflow reads them"
            )
        return replace(plan, dim=dim)

    def _check_dense(self, plan: FeaturePlan, probe) -> FeaturePlan:
        """The map's shape and stride, and one run of the whole dense path on the probe, so
        a map that cannot be laid out or upscaled is refused here, not in the actors."""
        from vitflow.dense import output_stride

        if plan.norm and self.kind == "map":
            raise ModelError(
                f"feature {plan.name!r}: norm: true applies a ViT's final norm to tokens; "
                f"{self._arch()} gives feature maps, so set norm: false"
            )
        _, height, width = self.input_size
        try:
            _, d, h, w = self._dense_map(plan, probe).shape
            plan = replace(plan, map_channels=int(d))
            if plan.name in self._pca:
                k, fitted_d = getattr(self, self._pca[plan.name][0]).shape
                if fitted_d != d or k != plan.pca:
                    raise ValueError(
                        f"its PCA maps {fitted_d} channels to {k}, but the map has {d} and the "
                        f"job asks for {plan.pca} (a run resumed with another pca: rerun it "
                        "with --overwrite)"
                    )
                d = k
            if height % h or width % w:
                raise ValueError(
                    f"its map is {h}x{w} for a {height}x{width} input, a size the map's "
                    "stride does not divide"
                )
            ph, pw = height // h, width // w
            shape: tuple[int, ...] = (h, w, int(d))
            stride: int | list[int] = ph if ph == pw else [ph, pw]
            if plan.shift is not None:
                if ph != pw:
                    raise ValueError(f"pixel shifts need square cells; this map's are {ph}x{pw} px")
                try:
                    stride = output_stride(ph, plan.shift["pixels"], plan.shift["stride"])
                except ValueError as e:
                    raise ValueError(f"shift: {e}") from None
                shape = (height // stride, width // stride, int(d))
            plan = replace(plan, dim=shape[0] * shape[1] * shape[2], shape=shape, stride=stride)
            got = self._dense(plan, torch.zeros(1, *self.input_size), probe)
            if got.shape[1] != plan.dim:
                raise ValueError(f"the map came out with {got.shape[1]} values, not {plan.dim}")
        except (ValueError, RuntimeError) as e:  # e.g. layers whose maps differ in size
            raise ModelError(f"feature {plan.name!r}: {e}") from e
        return plan

    def _dense_map(self, plan: FeaturePlan, inter) -> torch.Tensor:
        """``(B, D, h, w)`` float32: the plan's layers as maps at the patch stride,
        aggregated (not yet normalised)."""
        maps = []
        for i in plan.indices:
            main, _ = inter[i]
            if self.kind == "map":
                maps.append(main.float())
                continue
            if plan.norm:
                main = self._final_norm(main)
            b, n, d = main.shape
            h, w = self._grid(n)
            maps.append(main.float().transpose(1, 2).reshape(b, d, h, w))
        sizes = {tuple(m.shape[-2:]) for m in maps}
        if len(sizes) > 1:
            raise ValueError(
                f"layers {list(plan.indices)} give maps of different sizes "
                f"({', '.join(f'{a}x{b}' for a, b in sorted(sizes))}); a dense feature set "
                "takes layers of one stride"
            )
        if plan.aggregate == "concat":
            return torch.cat(maps, dim=1)
        return torch.stack(maps).mean(dim=0)

    def _grid(self, tokens: int) -> tuple[int, int]:
        """The patch grid of ``tokens`` patch tokens at this extractor's input size."""
        _, height, width = self.input_size
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "patch_size", None)
        if size is not None:
            ph, pw = (size, size) if isinstance(size, int) else tuple(size)
            if (height // ph) * (width // pw) == tokens and height % ph == 0 and width % pw == 0:
                return height // ph, width // pw
        raise ValueError(
            f"{self._arch()}'s {tokens} patch tokens do not form the patch grid of a "
            f"{height}x{width} input, so they cannot be laid out as a map"
        )

    def _dense(self, plan: FeaturePlan, x: torch.Tensor, inter) -> torch.Tensor:
        """``(B, h * w * D)``: the plan's map (pixel-shift upscaled where it asks, then each
        cell normalised), cells row by row, each cell's D values together."""
        fmap = self._dense_map(plan, inter)
        if plan.shift is not None:
            from vitflow.dense import pixel_shift

            # pixel_shift takes the unshifted copy first (shift_offsets): that is the pass
            # already made for every feature set; each shifted copy costs one more.
            unshifted = [fmap]

            def patch_map(im: torch.Tensor) -> torch.Tensor:
                return (
                    unshifted.pop() if unshifted else self._dense_map(plan, self._intermediates(im))
                )

            fmap = pixel_shift(
                patch_map,
                x,
                self.input_size[1] // fmap.shape[-2],  # square cells (checked at planning)
                plan.shift["pixels"],
                plan.shift["neighbourhood"],
                plan.stride,
            )
        if plan.normalize == "l2":
            fmap = torch.nn.functional.normalize(fmap, dim=1)
        cells = fmap.permute(0, 2, 3, 1)  # (B, h, w, D)
        if plan.name in self._pca:
            comp, mean = (getattr(self, n) for n in self._pca[plan.name])
            with torch.autocast(cells.device.type, enabled=False):  # float32, not bf16
                cells = (cells.float() - mean) @ comp.T
        return cells.reshape(fmap.shape[0], -1)

    @torch.inference_mode()
    def dense_cells(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``(B * h * w, D)``: the cells of dense feature ``name`` at the patch stride,
        normalised as it says and not projected (what its PCA is fitted on)."""
        plan = next(p for p in self.plans if p.name == name)
        fmap = self._dense_map(plan, self._intermediates(x))
        if plan.normalize == "l2":
            fmap = torch.nn.functional.normalize(fmap, dim=1)
        return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])

    def _width(self, plan: FeaturePlan, probe) -> int:
        """The feature's width by the registry's rule: each layer's pooled width (from the
        layer's own width), summed for concat, the common width for mean."""
        channel_dim = 1 if self.kind == "map" else -1
        widths = [POOLS[plan.pool].width(probe[i][0].shape[channel_dim]) for i in plan.indices]
        return sum(widths) if plan.aggregate == "concat" else widths[0]

    def _resolve_pool(self, plan: FeaturePlan) -> Pool:
        """The registry's pool for ``plan.pool`` on this model's output, or a message that
        names the pools that fit."""
        pool = find_pool(plan.pool, self.kind)
        has_cls = self.kind == "map" or _has_cls(self.model)
        if pool is None:
            other = POOLS[plan.pool].kind if plan.pool in POOLS else None
            why = f"is for {KIND_WORDS[other]}" if other else "is not a pool"
            raise ModelError(
                f"feature {plan.name!r}: pool {plan.pool!r} {why}, but {self._arch()} gives "
                f"{KIND_WORDS[self.kind]}; use pool: "
                f"{spell_choices(pool_names(self.kind, has_cls=has_cls))}"
            )
        if pool.needs_cls and not has_cls:
            raise ModelError(
                f"feature {plan.name!r}: pool {plan.pool!r} needs a CLS token, but "
                f"{self._arch()} has none ({self.prefix_tokens} prefix tokens; its global pool "
                f"is {getattr(self.model, 'global_pool', None)!r}); use pool: "
                f"{spell_choices(pool_names(self.kind, has_cls=False))}"
            )
        return pool

    def _arch(self) -> str:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return repr(cfg.get("architecture") or type(self.model).__name__)

    def _feature_modules(self) -> list[torch.nn.Module]:
        info = getattr(self.model, "feature_info", None)
        if info is None:
            raise ModelError(
                f"{self._arch()} has neither forward_intermediates nor feature_info to hook"
            )
        names = [i["module"] for i in info] if isinstance(info, list) else info.module_name()
        return [self.model.get_submodule(n) for n in names]

    # -- forward --------------------------------------------------------------------------

    def _intermediates(
        self, x: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Block outputs for ``self.take``: ``{index: (main, prefix_or_None)}``."""
        if self.mode == "hooks":
            return self._hooked(x)
        params = inspect.signature(self.model.forward_intermediates).parameters
        # A head feature needs the full forward (final features); otherwise stop after the
        # last requested block.
        kwargs = {"indices": list(self.take), "intermediates_only": not self.need_final}
        if "stop_early" in params:
            kwargs["stop_early"] = not self.need_final
        if "norm" in params:
            kwargs["norm"] = False
        if "return_prefix_tokens" in params:
            kwargs["return_prefix_tokens"] = True
            kwargs["output_fmt"] = "NLC"
        outs = self.model.forward_intermediates(x, **kwargs)
        res = {}
        if self.need_final:
            final, outs = outs
            res[_POOLED] = (self.model.forward_head(final, pre_logits=True), None)
        for i, o in zip(self.take, outs, strict=True):
            res[i] = (o[0], o[1]) if isinstance(o, tuple) else (o, None)
        return res

    def _hooked(self, x: torch.Tensor):
        captured: dict[int, torch.Tensor] = {}
        handles = [
            self._hook_modules[i].register_forward_hook(
                lambda _m, _inp, out, i=i: captured.__setitem__(i, out)
            )
            for i in self.take
        ]
        try:
            fwd = getattr(self.model, "forward_features", self.model)
            final = fwd(x)
        finally:
            for h in handles:
                h.remove()
        res = {}
        if self.need_final:
            res[_POOLED] = (self.model.forward_head(final, pre_logits=True), None)
        for i in self.take:
            out = captured[i]
            if out.ndim == 3 and self.prefix_tokens:
                res[i] = (out[:, self.prefix_tokens :], out[:, : self.prefix_tokens])
            else:
                res[i] = (out, None)
        return res

    def _pool_one(self, plan: FeaturePlan, inter) -> torch.Tensor:
        if plan.source == "head":
            return normalize_vectors(self.head(inter[_POOLED][0].float()).float(), plan.normalize)
        pooled = []
        for i in plan.indices:
            main, prefix = inter[i]
            if self.kind == "map":
                pooled.append(pool_map(main.float(), plan.pool))
                continue
            if plan.norm:
                main = self._final_norm(main)
                prefix = self._final_norm(prefix) if prefix is not None else None
            pooled.append(
                pool_tokens(main.float(), None if prefix is None else prefix.float(), plan.pool)
            )
        return normalize_vectors(aggregate_layers(pooled, plan.aggregate), plan.normalize)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, H, W)`` input -> ``{feature name: (B, dim) float32}``."""
        inter = self._intermediates(x)
        return {
            p.name: self._dense(p, x, inter) if p.dense else self._pool_one(p, inter).float()
            for p in self.plans
        }

    @property
    def dims(self) -> dict[str, int]:
        return {p.name: p.dim for p in self.plans}

    @property
    def dense(self) -> tuple[str, ...]:
        """The dense feature sets (their columns are float16 maps, not vectors)."""
        return tuple(p.name for p in self.plans if p.dense)
