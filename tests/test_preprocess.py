"""Tests for vitflow.preprocess: the split eval transform equals timm's unsplit one exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from vitflow.backbone import data_config
from vitflow.preprocess import Preprocessor

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

DATA_CONFIGS = {
    "bicubic-875-imagenet-32": {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        **IMAGENET,
    },
    "bilinear-100-half-32": {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        **HALF,
    },
    "bicubic-100-imagenet-48x40": {
        "input_size": (3, 48, 40),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        **IMAGENET,
    },
    "bilinear-875-half-48x40": {
        "input_size": (3, 48, 40),
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "crop_mode": "center",
        **HALF,
    },
    "bicubic-90-half-32-squash": {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "squash",
        **HALF,
    },
}

# (width, height): landscape, portrait, square, exactly the input size, smaller than it.
IMAGE_SIZES = [(97, 61), (23, 71), (64, 64), (40, 48), (17, 13), (5, 9)]


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 1000 * w + h)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module", params=list(DATA_CONFIGS), ids=list(DATA_CONFIGS))
def cfg_and_pre(request):
    cfg = DATA_CONFIGS[request.param]
    return cfg, Preprocessor(cfg)


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{w}x{h}" for w, h in IMAGE_SIZES])
def test_split_transform_equals_timm_eval_transform(cfg_and_pre, size):
    cfg, p = cfg_and_pre
    img = random_image(*size)
    pixels = p.resize_crop(img)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (cfg["input_size"][1], cfg["input_size"][2], 3)
    got = p.to_tensor(np.stack([pixels]))[0]
    want = create_transform(**cfg, is_training=False)(img)
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape == cfg["input_size"]
    assert (got - want).abs().max().item() <= 1e-6


def test_batch_equals_images_one_by_one(cfg_and_pre):
    cfg, p = cfg_and_pre
    imgs = [random_image(w, h, seed=7) for w, h in IMAGE_SIZES]
    batch = p.to_tensor(np.stack([p.resize_crop(im) for im in imgs]))
    assert batch.shape == (len(imgs), *cfg["input_size"])
    reference = create_transform(**cfg, is_training=False)
    for i, im in enumerate(imgs):
        assert (batch[i] - reference(im)).abs().max().item() <= 1e-6


def test_json_round_tripped_config_gives_same_pixels(cfg_and_pre):
    # Decode tasks get the data config as JSON (tuples become lists).
    cfg, p = cfg_and_pre
    again = Preprocessor(json.loads(json.dumps(cfg)))
    assert again.input_size == p.input_size
    for w, h in IMAGE_SIZES:
        img = random_image(w, h, seed=3)
        np.testing.assert_array_equal(again.resize_crop(img), p.resize_crop(img))


def test_resize_crop_by_hand_square_crop_pct_1():
    # crop_pct 1.0, square image: a plain PIL resize to the input size, no crop.
    p = Preprocessor(
        {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, **HALF}
    )
    img = random_image(64, 64)
    want = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(p.resize_crop(img), want)


def test_resize_crop_by_hand_landscape():
    # Shorter side to floor(32 / 0.8) = 40, keep the aspect ratio, then the centre 32 x 32.
    p = Preprocessor(
        {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.8, **HALF}
    )
    img = random_image(100, 50)
    resized = img.resize((80, 40), Image.Resampling.BILINEAR)
    want = np.asarray(resized.crop((24, 4, 56, 36)))
    np.testing.assert_array_equal(p.resize_crop(img), want)


def test_to_tensor_closed_form():
    p = Preprocessor({"input_size": (3, 4, 5), "interpolation": "bicubic", **IMAGENET})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 255, 128)
    got = p.to_tensor(pixels)
    mean = np.array(IMAGENET["mean"]).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET["std"]).reshape(1, 3, 1, 1)
    want = (pixels.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert got.dtype == torch.float32
    assert got.shape == (3, 3, 4, 5)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_to_tensor_accepts_a_torch_tensor():
    p = Preprocessor({"input_size": (3, 8, 8), **HALF})
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    assert torch.equal(p.to_tensor(torch.from_numpy(pixels)), p.to_tensor(pixels))
    assert p.to_tensor(np.full((1, 8, 8, 3), 255, np.uint8)).eq(1.0).all()  # (1 - .5) / .5
    assert p.to_tensor(np.zeros((1, 8, 8, 3), np.uint8)).eq(-1.0).all()


def test_input_size_attribute():
    assert Preprocessor({"input_size": [3, 48, 40], **HALF}).input_size == (3, 48, 40)


def test_vit_built_small_is_fed_its_own_size():
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0
    )
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32)
    # The whole chain works at that size: preprocess an image and run the model on it.
    p = Preprocessor(cfg)
    x = p.to_tensor(np.stack([p.resize_crop(random_image(50, 40))]))
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, model.num_features)
