"""Reference tests: vitflow's feature sets equal a few lines of plain timm + numpy.

For every model family, every pool / aggregate / layer / norm / normalize combination that
applies is computed by ONE FeatureExtractor (one forward pass) and compared with timm's own
``forward_intermediates`` (timm resolving the layer spec and applying ``norm=``) followed by
the pooling written out by hand in numpy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch

from tests.conftest import TINY
from vitflow.config import FeatureConfig
from vitflow.errors import ModelError
from vitflow.features import FeatureExtractor, resolve_layers

LAYER_SPECS = [1, 3, [0, -1], [-2]]


def tiny(family: str) -> torch.nn.Module:
    name, kwargs = TINY[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def input_for(model: torch.nn.Module) -> torch.Tensor:
    pe = getattr(model, "patch_embed", None)
    hw = tuple(pe.img_size) if pe is not None else (64, 64)
    return torch.from_numpy(np.random.default_rng(1).normal(size=(3, 3, *hw)).astype(np.float32))


def reference_tokens(model, x, spec: FeatureConfig) -> np.ndarray:
    """Plain timm + numpy: the definition of each token feature."""
    with torch.no_grad():
        inter = model.forward_intermediates(
            x,
            indices=spec.layers,
            norm=spec.norm,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
    pooled = []
    for out in inter:
        patch, prefix = (
            (out[0].numpy(), out[1].numpy()) if isinstance(out, tuple) else (out.numpy(), None)
        )
        mean = patch.mean(axis=1)
        if spec.pool == "mean":
            pooled.append(mean)
        elif spec.pool == "cls":
            pooled.append(prefix[:, 0])
        else:
            pooled.append(np.concatenate([prefix[:, 0], mean], axis=1))
    return finish(pooled, spec)


def reference_maps(model, x, spec: FeatureConfig) -> np.ndarray:
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=spec.layers, intermediates_only=True)
    pooled = []
    for fmap in inter:
        a = fmap.numpy()
        if spec.pool in ("avg", "mean"):
            pooled.append(a.mean(axis=(2, 3)))
        elif spec.pool == "max":
            pooled.append(a.max(axis=(2, 3)))
        else:
            pooled.append((np.clip(a, 1e-6, None) ** 3).mean(axis=(2, 3)) ** (1 / 3))
    return finish(pooled, spec)


def finish(pooled: list[np.ndarray], spec: FeatureConfig) -> np.ndarray:
    v = np.concatenate(pooled, axis=1) if spec.aggregate == "concat" else np.mean(pooled, axis=0)
    if spec.normalize == "l2":
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v


def all_specs(pools, aggregates=("concat", "mean"), norms=(False, True)) -> list[FeatureConfig]:
    combos = itertools.product(LAYER_SPECS, pools, aggregates, norms, ("l2", "none"))
    return [
        FeatureConfig(
            name=f"f{i}", layers=layers, pool=pool, aggregate=agg, norm=norm, normalize=nz
        )
        for i, (layers, pool, agg, norm, nz) in enumerate(combos)
    ]


@pytest.mark.parametrize(
    "family,pools",
    [
        ("vit", ("cls", "mean", "cls_mean")),
        ("dinov2_reg", ("cls", "mean", "cls_mean")),
        ("clip", ("cls", "mean", "cls_mean")),
        ("siglip", ("mean",)),
        ("mae", ("cls", "mean", "cls_mean")),
    ],
)
def test_token_models_match_plain_timm(family, pools):
    model = tiny(family)
    x = input_for(model)
    specs = all_specs(pools)
    fx = FeatureExtractor(model, specs, tuple(x.shape[1:]))
    out = fx(x)
    for spec in specs:
        expected = reference_tokens(model, x, spec)
        np.testing.assert_allclose(
            out[spec.name].numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=str(spec)
        )
        assert fx.dims[spec.name] == expected.shape[1]


def test_cnn_stages_match_plain_timm():
    model = tiny("resnet")
    x = input_for(model)
    # Stage widths differ (64..512), so aggregate=mean only fits single-layer specs.
    specs = [
        FeatureConfig(name=f"f{i}", layers=layers, pool=pool, aggregate=agg, normalize=nz)
        for i, (layers, pool, agg, nz) in enumerate(
            itertools.product(
                [1, 2, [0, -1], [-2]], ["avg", "max", "gem", "mean"], ["concat"], ["l2", "none"]
            )
        )
    ] + [FeatureConfig(name="single_mean", layers=[-1], pool="gem", aggregate="mean")]
    fx = FeatureExtractor(model, specs, tuple(x.shape[1:]))
    out = fx(x)
    for spec in specs:
        np.testing.assert_allclose(
            out[spec.name].numpy(),
            reference_maps(model, x, spec),
            rtol=1e-4,
            atol=1e-5,
            err_msg=str(spec),
        )
    dims = {str(s.layers): fx.dims[s.name] for s in specs}
    assert dims == {"1": 512, "2": 256 + 512, "[0, -1]": 64 + 512, "[-2]": 256, "[-1]": 512}


def test_last_block_with_norm_equals_forward_features():
    # timm's own closed form: the last intermediate with norm=True is forward_features.
    model = tiny("dinov2_reg")
    x = input_for(model)
    specs = [
        FeatureConfig(name="mean", layers=1, pool="mean", norm=True, normalize="none"),
        FeatureConfig(name="cls", layers=[-1], pool="cls", norm=True, normalize="none"),
    ]
    out = FeatureExtractor(model, specs, tuple(x.shape[1:]))(x)
    with torch.no_grad():
        ff = model.forward_features(x)
    npt = model.num_prefix_tokens
    assert npt == 5
    torch.testing.assert_close(out["mean"], ff[:, npt:].mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cls"], ff[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_one_backbone_pass_for_many_feature_sets(family):
    model = tiny(family)
    x = input_for(model)
    calls = []
    next(model.children()).register_forward_pre_hook(lambda *_: calls.append(1))
    pool = "mean" if family == "vit" else "gem"
    specs = [
        FeatureConfig(name=f"f{i}", layers=layers, pool=pool)
        for i, layers in enumerate([1, 2, [0], [-1, 1]])
    ]
    fx = FeatureExtractor(model, specs, tuple(x.shape[1:]))
    calls.clear()
    fx(x)
    assert len(calls) == 1


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_hook_fallback_equals_forward_intermediates(family):
    model = tiny(family)
    x = input_for(model)
    pool = "cls_mean" if family == "vit" else "max"
    specs = [
        FeatureConfig(name="a", layers=3, pool=pool),
        FeatureConfig(name="b", layers=[0], pool=pool),
    ]
    via_api = FeatureExtractor(model, specs, tuple(x.shape[1:]), extractor="intermediates")(x)
    via_hooks = FeatureExtractor(model, specs, tuple(x.shape[1:]), extractor="hooks")(x)
    for k in via_api:
        torch.testing.assert_close(via_hooks[k], via_api[k])


def test_hooks_used_when_model_lacks_forward_intermediates():
    class Legacy(torch.nn.Module):
        """A timm model with the API removed, as an older or third-party model would be."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.feature_info = [dict(i, module="inner." + i["module"]) for i in inner.feature_info]

        def forward_features(self, x):
            return self.inner.forward_features(x)

    inner = tiny("resnet")
    x = input_for(inner)
    spec = [FeatureConfig(name="a", layers=2, pool="avg")]
    fx = FeatureExtractor(Legacy(inner), spec, tuple(x.shape[1:]))
    assert fx.mode == "hooks"
    torch.testing.assert_close(
        fx(x)["a"], FeatureExtractor(inner, spec, tuple(x.shape[1:]))(x)["a"]
    )


def test_layer_resolution_matches_timm_feature_take_indices():
    from timm.models._features import feature_take_indices

    for n in (4, 12):
        for spec in (1, 3, n, [0], [-1], [0, -1, 2], [-n]):
            ours = resolve_layers(spec, n, "f")
            theirs, _ = feature_take_indices(n, spec)
            assert list(ours) == list(theirs)


@pytest.mark.parametrize(
    "family,spec,message",
    [
        ("siglip", FeatureConfig(pool="cls"), "has none"),
        ("siglip", FeatureConfig(pool="cls_mean"), "use pool: mean"),
        ("vit", FeatureConfig(layers=5), "last 5 layers, but the model has 4"),
        ("vit", FeatureConfig(layers=[4]), "out of range"),
        ("vit", FeatureConfig(layers=[-5]), "valid: -4..3"),
        ("vit", FeatureConfig(pool="gem"), "use pool: cls, mean or cls_mean"),
        ("resnet", FeatureConfig(pool="cls"), "use pool: avg, max or gem"),
        ("resnet", FeatureConfig(norm=True), "norm: false"),
        ("resnet", FeatureConfig(layers=2, aggregate="mean"), "one width"),
    ],
)
def test_spec_that_does_not_fit_the_model_fails_clearly(family, spec, message):
    model = tiny(family)
    with pytest.raises(ModelError, match=message):
        FeatureExtractor(model, [spec], tuple(input_for(model).shape[1:]))


@pytest.mark.parametrize("name,size", [("hiera_tiny_224", 224), ("convnext_atto", 64)])
def test_hierarchical_models_pool_their_stage_maps(name, size):
    """Hiera and ConvNeXt expose stage maps (NCHW): the map pools apply, `mean` means avg."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    x = torch.randn(2, 3, size, size)
    specs = [
        FeatureConfig(name="a", layers=2, pool="mean"),
        FeatureConfig(name="b", layers=[0, -1], pool="gem", normalize="none"),
        FeatureConfig(name="c", layers=[-1], pool="max"),
    ]
    out = FeatureExtractor(model, specs, (3, size, size))(x)
    for spec in specs:
        np.testing.assert_allclose(
            out[spec.name].numpy(), reference_maps(model, x, spec), rtol=1e-4, atol=1e-5
        )


def test_head_feature_is_a_plan_of_its_own_kind():
    """source: head is the projection head on the backbone's pooled output: no blocks, no pool."""
    model = tiny("resnet")
    x = input_for(model)
    torch.manual_seed(2)
    head = torch.nn.Linear(512, 8)
    specs = [FeatureConfig(name="emb", pool="mean"), FeatureConfig(name="proj", source="head")]
    fx = FeatureExtractor(model, specs, tuple(x.shape[1:]), head=head)
    emb, proj = fx.plans
    assert (emb.source, emb.pool, emb.indices, emb.dim) == ("backbone", "avg", (4,), 512)
    assert (proj.source, proj.pool, proj.indices, proj.dim) == ("head", None, (), 8)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(head(model(x)), dim=-1)  # model(x): pooled
    torch.testing.assert_close(fx(x)["proj"], expected)
    with pytest.raises(ModelError, match="no projection head"):
        FeatureExtractor(model, specs, tuple(x.shape[1:]))
