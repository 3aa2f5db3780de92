"""Pretraining transforms: shapes, randomness, and exact agreement with timm's eval path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from vitflow.preprocess import Preprocessor
from vitflow.training.transforms import (
    EvalTransform,
    SimCLRTransform,
    SIMO2Transform,
    blur_kernel_size,
    eval_data_config,
)

S = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # equal per-channel stats keep grayscale views gray after Normalize


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# Non-square both ways, smaller than S, exactly S, and a large one.
SIZES = [(40, 24), (24, 40), (10, 12), (S, S), (97, 61)]


@pytest.mark.parametrize("w,h", SIZES)
def test_eval_transform_equals_timm(w, h):
    img = _image(w, h)
    ref = create_transform(
        input_size=(3, S, S),
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        crop_pct=1.0,
        crop_mode="center",
        is_training=False,
    )
    out = EvalTransform(S, MEAN, STD)(img)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert torch.equal(out, ref(img))


@pytest.mark.parametrize("w,h", SIZES)
def test_eval_transform_equals_embed_preprocessor(w, h):
    # The embed job's split path (PIL part in decode tasks, normalise on the model actor)
    # fed the same data config must reproduce training-time evaluation.
    img = _image(w, h, seed=1)
    p = Preprocessor(eval_data_config(S, MEAN, STD))
    embed = p.to_tensor(np.stack([p.resize_crop(img)]))[0]
    assert torch.equal(embed, EvalTransform(S, MEAN, STD)(img))


def test_eval_data_config_fields():
    cfg = eval_data_config(32, MEAN, [0.2, 0.2, 0.2])
    assert cfg == {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": MEAN,
        "std": (0.2, 0.2, 0.2),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def test_simclr_views_shapes_and_differ():
    v0, v1 = SimCLRTransform(S, MEAN, STD)(_image(40, 30))
    for v in (v0, v1):
        assert v.shape == (3, S, S) and v.dtype == torch.float32
    assert not torch.equal(v0, v1)


def test_simclr_seeded_determinism():
    t, img = SimCLRTransform(S, MEAN, STD), _image(40, 30)
    torch.manual_seed(123)
    a = [t(img) for _ in range(3)]
    torch.manual_seed(123)
    b = [t(img) for _ in range(3)]
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    torch.manual_seed(124)
    assert not torch.equal(t(img)[0], a[0][0])


def test_simclr_grayscale_rate():
    # Colour jitter and blur keep a gray image gray, so a view has equal channels iff
    # RandomGrayscale fired (p=0.2) on a random-colour source image.
    t, img = SimCLRTransform(S, HALF, HALF), _image(24, 24, seed=2)
    torch.manual_seed(0)
    views = [v for _ in range(100) for v in t(img)]
    gray = [torch.equal(v[0], v[1]) and torch.equal(v[1], v[2]) for v in views]
    assert 0.08 < np.mean(gray) < 0.32  # 200 draws: 0.2 +- 0.03 (one sd)


def test_blur_kernel_size_is_odd_tenth():
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 9, 23]


def test_simo2_without_randomness_is_eval():
    img = _image(40, 24, seed=3)
    ref = EvalTransform(S, MEAN, STD)(img)
    out = SIMO2Transform(S, MEAN, STD, jitter=0.0, flip_p=0.0)(img)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    flipped = SIMO2Transform(S, MEAN, STD, jitter=0.0, flip_p=1.0)(img)
    assert torch.equal(flipped, ref.flip(-1))


def test_simo2_default_flips_half_and_jitters():
    img = _image(40, 24, seed=4)
    ref = EvalTransform(S, MEAN, STD)(img)
    torch.manual_seed(0)
    flip_only = SIMO2Transform(S, MEAN, STD, jitter=0.0)
    outs = [flip_only(img) for _ in range(200)]
    plain = [torch.equal(o, ref) for o in outs]
    assert all(p or torch.equal(o, ref.flip(-1)) for p, o in zip(plain, outs, strict=True))
    assert 0.35 < np.mean(plain) < 0.65
    # The default jitters every view, but only photometrically: per-pixel colour changes,
    # the framing does not (the jittered view stays strongly correlated with eval).
    v = SIMO2Transform(S, MEAN, STD, flip_p=0.0)(img)
    assert not torch.equal(v, ref)
    corr = np.corrcoef(v.mean(0).flatten().numpy(), ref.mean(0).flatten().numpy())[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=4), "Expected image_size >= 8, but got 4"),
        (dict(mean=(0.5, 0.5)), "Expected mean to be 3 finite floats"),
        (dict(std=(0.5, 0.0, 0.5)), "Expected every std > 0"),
    ],
)
@pytest.mark.parametrize("cls", [EvalTransform, SimCLRTransform, SIMO2Transform])
def test_constructor_validation(cls, kwargs, match):
    args = dict(image_size=S, mean=MEAN, std=STD) | kwargs
    with pytest.raises(ValueError, match=match):
        cls(**args)
