"""Pixel-shift upscaling of patch maps (vitflow.dense) against a hand-written reference."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from vitflow.dense import output_stride, pixel_shift, shift_offsets

PATCH = 4


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=PATCH,
        embed_dim=24,
        depth=2,
        num_heads=2,
    ).eval()

    def patch_map(x):
        with torch.no_grad():
            tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
        b, n, d = tokens.shape
        side = int(n**0.5)
        return tokens.transpose(1, 2).reshape(b, d, side, side)

    return patch_map


def reference(patch_map, x, patch, pixels, neighbourhood, stride):
    """Roll, forward, upsample to pixels, unroll, average, then pool to the stride."""
    dirs = {
        "von_neumann": [(0, 1), (1, 0), (0, -1), (-1, 0)],
        "moore": [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)],
    }[neighbourhood]
    shifts = {(0, 0)} | {(p * dy, p * dx) for p in pixels for dy, dx in dirs}
    maps = []
    for dy, dx in sorted(shifts):
        f = patch_map(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
        full = F.interpolate(f, scale_factor=patch, mode="nearest")
        maps.append(torch.roll(full, shifts=(-dy, -dx), dims=(2, 3)))
    mean = torch.stack(maps).mean(0)
    return F.avg_pool2d(mean, stride) if stride > 1 else mean


@pytest.mark.parametrize(
    "pixels,neighbourhood", [([2, 1], "von_neumann"), ([2], "moore"), ([3, 1], "moore")]
)
def test_pixel_shift_equals_roll_forward_upsample_unroll_average(tiny_vit, pixels, neighbourhood):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    s = output_stride(PATCH, pixels)
    got = pixel_shift(tiny_vit, x, PATCH, pixels, neighbourhood)
    want = reference(tiny_vit, x, PATCH, pixels, neighbourhood, s)
    assert got.shape == (2, 24, 32 // s, 32 // s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Finer than the patch grid, and not just the unshifted map spread out.
    plain = tiny_vit(x).repeat_interleave(PATCH // s, 2).repeat_interleave(PATCH // s, 3)
    assert (got - plain).abs().max() > 1e-3


def test_a_model_equivariant_at_the_patch_stride_gives_back_its_own_map():
    """A patch-wise model (conv with kernel = stride = p, then pointwise) commutes with
    rolls by multiples of p: every shifted copy unrolls to the same map."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=PATCH, stride=PATCH)

    def patch_map(x):
        with torch.no_grad():
            return F.gelu(conv(x))

    x = torch.randn(1, 3, 32, 32)
    own = patch_map(x)
    got = pixel_shift(patch_map, x, PATCH, [PATCH, 2 * PATCH], "moore")
    torch.testing.assert_close(got, own, rtol=1e-6, atol=1e-6)
    finer = pixel_shift(patch_map, x, PATCH, [PATCH], "von_neumann", stride=2)
    torch.testing.assert_close(finer, own.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_a_linear_projection_before_averaging_equals_projecting_the_average(tiny_vit):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))

    def project(f):
        return torch.einsum("kd,bdhw->bkhw", w, f)

    full = pixel_shift(tiny_vit, x, PATCH, [2], "von_neumann")
    torch.testing.assert_close(
        pixel_shift(tiny_vit, x, PATCH, [2], "von_neumann", project=project),
        project(full),
        rtol=1e-4,
        atol=1e-4,
    )


def test_offsets_and_strides():
    assert shift_offsets([7, 4, 2], "von_neumann")[0] == (0, 0)
    assert len(shift_offsets([7, 4, 2], "von_neumann")) == 1 + 3 * 4
    assert len(shift_offsets([7, 4, 2], "moore")) == 1 + 3 * 8
    assert output_stride(14, [7, 4, 2]) == 1 and output_stride(16, [8, 4]) == 4
    with pytest.raises(ValueError, match="must divide the patch size 16"):
        output_stride(16, [8, 4], stride=8)
    with pytest.raises(ValueError, match="unknown neighbourhood"):
        shift_offsets([2], "hex")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        pixel_shift(lambda x: x, torch.zeros(1, 3, 30, 32), PATCH, [2])


@pytest.mark.parametrize(
    "name, kwargs, size, feature",
    [
        (
            "vit_small_patch16_224",
            {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2},
            32,
            {"layers": [0, -1], "aggregate": "mean"},
        ),
        (
            "vit_small_patch16_224",
            {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2},
            32,
            {"shift": {"pixels": [4]}},
        ),
        ("resnet18", {}, 64, {}),
    ],
)
def test_dense_maps_from_forward_hooks_equal_those_from_forward_intermediates(
    name, kwargs, size, feature
):
    """model.extractor: hooks (models without timm's forward_intermediates) gives the same
    maps, pixel-shifted ones included."""
    from vitflow.config import FeatureConfig
    from vitflow.features import FeatureExtractor

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    feats = [FeatureConfig(name="d", dense=True, **feature)]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = {
            mode: FeatureExtractor(model, feats, (3, size, size), mode)(x)["d"]
            for mode in ("intermediates", "hooks")
        }
    assert maps["hooks"].shape == maps["intermediates"].shape
    torch.testing.assert_close(maps["hooks"], maps["intermediates"])
