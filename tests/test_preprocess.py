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


# --- opt-in fast paths: tensor resize (GPU decode) and the JPEG draft size -------------

# timm's third crop mode: fit the longer side, pad with the mean colour, then crop.
BORDER_CONFIGS = {
    "border-bicubic-90-imagenet-32": {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "border",
        **IMAGENET,
    },
    "border-bilinear-115-imagenet-48x40": {
        "input_size": (3, 48, 40),
        "interpolation": "bilinear",
        "crop_pct": 1.15,
        "crop_mode": "border",
        **IMAGENET,
    },
}
ALL_CONFIGS = {**DATA_CONFIGS, **BORDER_CONFIGS}
# Tensor resampling uses PIL's filters and rounding order, in float32 rather than PIL's
# fixed point: a level apart here and there (two at most), on noise, the worst case.
TENSOR_MAX_DIFF, TENSOR_MEAN_DIFF = 2, 0.1


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
@pytest.mark.parametrize(
    "size", [*IMAGE_SIZES, (640, 480), (333, 1000)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_tensor_resize_crop_is_the_pil_transform_within_a_level_or_two(name, size):
    p = Preprocessor(ALL_CONFIGS[name])
    img = random_image(*size)
    want = p.resize_crop(img).astype(np.int16)
    got = p.resize_crop_tensor(as_tensor(img))
    assert got.dtype == torch.uint8 and got.shape == (1, *want.shape)
    diff = np.abs(got[0].numpy().astype(np.int16) - want)
    assert diff.max() <= TENSOR_MAX_DIFF and diff.mean() <= TENSOR_MEAN_DIFF


def test_tensor_resize_crop_of_a_batch_equals_one_by_one():
    p = Preprocessor(DATA_CONFIGS["bicubic-875-imagenet-32"])
    imgs = [random_image(97, 61, seed=s) for s in range(3)]
    batch = p.resize_crop_tensor(torch.cat([as_tensor(im) for im in imgs]))
    for i, im in enumerate(imgs):
        assert torch.equal(batch[i], p.resize_crop_tensor(as_tensor(im))[0])


def test_border_mode_pads_with_the_mean_colour_on_tensors_too():
    p = Preprocessor(BORDER_CONFIGS["border-bicubic-90-imagenet-32"])
    img = Image.new("RGB", (200, 20), (10, 20, 30))  # a wide strip: padded above and below
    want, got = p.resize_crop(img), p.resize_crop_tensor(as_tensor(img))[0].numpy()
    fill = [round(255 * v) for v in IMAGENET["mean"]]
    assert (want[0] == fill).all() and (got[0] == fill).all()
    assert np.abs(got.astype(int) - want).max() <= TENSOR_MAX_DIFF


@pytest.mark.parametrize(
    ("interpolation", "named"), [("lanczos", "lanczos"), ("nearest", "nearest")]
)
def test_tensor_path_refuses_what_torch_cannot_run_like_pil(interpolation, named):
    p = Preprocessor({"input_size": (3, 16, 16), "interpolation": interpolation, **HALF})
    assert named in p.tensor_unsupported
    with pytest.raises(ValueError, match=named):
        p.resize_crop_tensor(torch.zeros((1, 3, 20, 20), dtype=torch.uint8))
    ok = Preprocessor({"input_size": (3, 16, 16), "interpolation": "bicubic", **HALF})
    assert ok.tensor_unsupported is None
    with pytest.raises(ValueError, match="expected uint8"):
        ok.resize_crop_tensor(torch.zeros((1, 3, 20, 20)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bicubic-875-imagenet-32", (36, 36)),  # shorter side to floor(32 / 0.875) = 36
        ("bicubic-100-imagenet-48x40", (40, 48)),  # non-square: fit into 48 x 40 (h x w)
        ("bicubic-90-half-32-squash", (35, 35)),  # squash: both sides to floor(32 / 0.9)
        ("border-bilinear-115-imagenet-48x40", (34, 41)),  # border: fit the longer side
    ],
)
def test_draft_size_is_what_the_first_resize_writes_at_most(name, expected):
    assert Preprocessor(ALL_CONFIGS[name]).draft_size == expected


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
@pytest.mark.parametrize("size", [(1200, 300), (300, 1200), (700, 700), (130, 90)])
def test_a_drafted_jpeg_is_never_upsampled_by_the_resize(name, size):
    import io

    from vitflow.decode import decode_image

    p = Preprocessor(ALL_CONFIGS[name])
    buf = io.BytesIO()
    random_image(*size).save(buf, "JPEG", quality=90)
    drafted = decode_image(buf.getvalue(), draft_size=p.draft_size)
    resized = p.transform.transforms[0](decode_image(buf.getvalue()))  # the exact resize
    assert drafted.width >= resized.width and drafted.height >= resized.height
    assert p.resize_crop(drafted).shape == (*p.input_size[1:], 3)


# --- the torch-free plan decode actors run (vitflow.resize) -----------------------------

PLAN_INTERPOLATIONS = ["bicubic", "bilinear", "lanczos", "nearest", "box", "hamming"]
PLAN_SIZES = [*IMAGE_SIZES, (1, 1), (640, 480), (333, 1000), (224, 224), (255, 257)]


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("interpolation", PLAN_INTERPOLATIONS)
@pytest.mark.parametrize("input_size", [(3, 32, 32), (3, 48, 40)], ids=["32", "48x40"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0, 1.15])
def test_torch_free_plan_is_timms_pil_steps_pixel_for_pixel(
    crop_mode, interpolation, input_size, crop_pct
):
    """What decode actors run (Pillow alone) equals timm's own resize/crop objects exactly,
    for every crop mode and interpolation, on images larger, smaller and as large."""
    cfg = {
        "input_size": input_size,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        **IMAGENET,
    }
    p = Preprocessor(cfg)
    assert p.plan is not None
    timm_steps = create_transform(**cfg, is_training=False).transforms[:-2]  # ToTensor, Normalize
    for w, h in PLAN_SIZES:
        img = random_image(w, h, seed=3)
        want = img
        for t in timm_steps:
            want = t(want)
        np.testing.assert_array_equal(p.plan(img), np.asarray(want), err_msg=f"{w}x{h}")


def test_plan_round_trips_through_json_and_decode_tasks_run_it_without_torch(tmp_path):
    """The spec the driver hands to decode actors is plain JSON, and running it (read,
    decode, resize/crop a block) imports neither torch nor timm nor torchvision."""
    import subprocess
    import sys

    from vitflow.resize import ResizeCrop

    cfg = ALL_CONFIGS["border-bilinear-115-imagenet-48x40"]
    p = Preprocessor(cfg)
    spec = p.resize_spec()
    assert ResizeCrop.from_json(spec) == p.plan
    img = random_image(97, 61)
    img.save(tmp_path / "a.png")
    code = f"""
import json, sys
import numpy as np
from vitflow.decode_task import decode_batch
out = decode_batch({{"path": np.array([{str(tmp_path / "a.png")!r}], dtype=object)}},
                   resize={spec!r}, max_pixels=10**8)
assert list(out["status"]) == ["ok"], out["error"]
np.save({str(tmp_path / "px.npy")!r}, out["__pixels"][0])
print(json.dumps(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    np.testing.assert_array_equal(np.load(tmp_path / "px.npy"), p.resize_crop(img))


def test_a_step_without_a_plan_runs_timms_objects_in_the_decode_task(monkeypatch):
    """A transform the plan does not know travels as its data config, and the decode actor
    runs timm's objects: the same pixels, and no draft decoding."""
    import vitflow.preprocess
    from vitflow.decode_task import resizer

    cfg = ALL_CONFIGS["bicubic-875-imagenet-32"]
    exact = Preprocessor(cfg).resize_crop(random_image(97, 61))
    monkeypatch.setattr(vitflow.preprocess, "_plan", lambda steps, size: None)
    p = Preprocessor(cfg)
    assert p.plan is None and p.draft_size is None
    spec = p.resize_spec()
    assert "steps" not in json.loads(spec)
    resize_crop, size, draft = resizer(spec)
    assert size == (32, 32) and draft is None
    np.testing.assert_array_equal(resize_crop(random_image(97, 61)), exact)


def test_resize_crop_refuses_an_unknown_op():
    from vitflow.resize import ResizeCrop

    with pytest.raises(ValueError, match="unknown resize/crop op 'rotate'"):
        ResizeCrop(({"op": "rotate"},), (8, 8))
    with pytest.raises(ValueError, match="unknown interpolation"):
        ResizeCrop(({"op": "resize", "size": [8], "interpolation": "cubic"},), (8, 8))


def test_steps_the_plan_cannot_reproduce_exactly_get_no_plan():
    """Random resizing, a subclass and a refused max_size are left to timm's own objects."""
    from timm.data.transforms import ResizeKeepRatio
    from torchvision import transforms as T

    from vitflow.preprocess import _plan

    crop = T.CenterCrop(32)
    assert _plan([T.Resize(36), crop], (3, 32, 32)) is not None
    assert _plan([ResizeKeepRatio(36, random_scale_prob=0.5), crop], (3, 32, 32)) is None
    assert _plan([ResizeKeepRatio(36, interpolation="random"), crop], (3, 32, 32)) is None

    class MyResize(T.Resize):
        pass

    assert _plan([MyResize(36), crop], (3, 32, 32)) is None
    assert _plan([T.Resize(36, max_size=30), crop], (3, 32, 32)) is None
    capped = [T.Resize(36, max_size=40), crop]  # a long side capped at 40: 32x40 crops pad
    plan = _plan(capped, (3, 32, 32))
    for w, h in PLAN_SIZES:
        img = random_image(w, h, seed=5)
        np.testing.assert_array_equal(plan(img), np.asarray(T.Compose(capped)(img)))
