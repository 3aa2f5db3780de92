"""Tests for vitflow.gpu_decode: batched device decode with per-file fallback to the exact CPU
path. Run on the CPU (torchvision's decode_jpeg with libjpeg): the logic is the GPU path's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitflow import gpu_decode
from vitflow.decode import DecodeError, decode_image
from vitflow.gpu_decode import decode_resize_batch, exact_fallback, is_device_decodable
from vitflow.preprocess import Preprocessor
from vitflow.synthetic import bad_files, synthetic_image

CFG = {
    "input_size": (3, 64, 64),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
# The device path resamples in float32 (see Preprocessor.resize_crop_tensor); on the CPU its
# decoder is the exact path's libjpeg, so these bound the whole difference.
MAX_DIFF, MEAN_DIFF = 2, 0.1
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(CFG)


def jpeg(img: Image.Image, orientation: int | None = None, **kw) -> bytes:
    if orientation is not None:
        exif = img.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return synthetic_image(np.random.default_rng(seed), (w, h), seed)


def quadrants(w: int = 160, h: int = 80) -> Image.Image:
    """Four flat colours: any turn or mirror shows at the corners."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2], arr[: h // 2, w // 2 :] = RED, GREEN
    arr[h // 2 :, : w // 2], arr[h // 2 :, w // 2 :] = BLUE, YELLOW
    return Image.fromarray(arr)


def exact(pre: Preprocessor, data: bytes) -> np.ndarray:
    return pre.resize_crop(decode_image(data))


def reason(data: bytes, max_pixels: int = 10**8) -> str:
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=max_pixels)
    return str(e.value)


def assert_close(got: torch.Tensor, want: np.ndarray) -> None:
    diff = np.abs(got.cpu().numpy().astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


def test_a_mixed_batch_gives_every_file_an_ok_or_error_row(pre):
    bad = bad_files()
    png = io.BytesIO()
    photo(90, 70, 2).save(png, "PNG")
    big = jpeg(photo(400, 300, 9))
    damaged = bytearray(jpeg(photo(320, 240, 7)))
    mid = len(damaged) // 2
    damaged[mid : mid + 200] = b"\xff" * 200  # a sound header, a broken scan
    files = {
        "jpeg": jpeg(photo(320, 240, 1)),
        "png": png.getvalue(),
        "gray": jpeg(photo(200, 150, 3).convert("L")),
        "cmyk": jpeg(photo(120, 100, 4).convert("CMYK")),
        "rotated": jpeg(quadrants(), orientation=6),
        "progressive": jpeg(photo(300, 200, 5), progressive=True),
        "corrupt": bad["corrupt.jpg"],
        "truncated": bad["truncated.jpg"],
        "damaged scan": bytes(damaged),
        "not an image": bad["not_an_image.png"],
        "empty": b"",
        "too large": big,
        "same size as jpeg": jpeg(photo(320, 240, 6)),
    }
    names = list(files)
    datas = list(files.values())
    # From the header: JPEG/grayscale/progressive ones that end in their EOI marker (the
    # damaged scan too: its damage shows only when decoding it).
    device_bound = ["jpeg", "gray", "rotated", "progressive", "damaged scan", "same size as jpeg"]
    assert [n for n, d in files.items() if is_device_decodable(d, max_pixels=100_000)] == (
        device_bound
    )

    out = decode_resize_batch(datas, pre, "cpu", max_pixels=100_000)
    pixels, errors, sizes, on_device, device, why = out

    assert pixels.shape == (len(datas), 64, 64, 3) and pixels.dtype == torch.uint8
    assert device == torch.device("cpu") and why is None
    row = dict(zip(names, range(len(names)), strict=True))
    # Errors carry the exact path's own reason; their pixels are zeros and sizes -1.
    for name in ("corrupt", "truncated", "damaged scan", "not an image", "empty"):
        i = row[name]
        assert errors[i] == reason(datas[i]), name
        assert sizes[i] == (-1, -1) and not on_device[i] and not pixels[i].any()
    assert errors[row["too large"]] == reason(big, max_pixels=100_000)
    assert "400x300 = 120000 pixels exceeds the limit of 100000" in errors[row["too large"]]
    # JPEGs in RGB or grayscale go to the device; PNG and CMYK the exact CPU way.
    ok = [n for n in names if errors[row[n]] is None]
    assert ok == ["jpeg", "png", "gray", "cmyk", "rotated", "progressive", "same size as jpeg"]
    assert [n for n in ok if on_device[row[n]]] == [
        "jpeg",
        "gray",
        "rotated",
        "progressive",
        "same size as jpeg",
    ]
    for n in ok:
        i = row[n]
        assert sizes[i] == decode_image(datas[i]).size, n
        if on_device[i]:
            assert_close(pixels[i], exact(pre, datas[i]))
        else:
            np.testing.assert_array_equal(pixels[i].numpy(), exact(pre, datas[i]))
    # The rotated one is upright: stored 160x80 on its side, displayed 80x160.
    assert sizes[row["rotated"]] == (80, 160)
    up = pixels[row["rotated"]].numpy().astype(int)
    for (y, x), colour in {(8, 8): BLUE, (8, 56): RED, (56, 8): YELLOW, (56, 56): GREEN}.items():
        assert np.abs(up[y, x] - colour).max() <= 10, (y, x)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_the_exact_path(pre, orientation):
    data = jpeg(photo(150, 90, orientation), orientation=orientation)
    out = decode_resize_batch([data], pre, "cpu")
    assert out.on_device == [True]
    assert out.sizes[0] == decode_image(data).size
    assert_close(out.pixels[0], exact(pre, data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pils_exif_transpose(orientation):
    from PIL import ImageOps

    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(img))
    got = gpu_decode._orient(torch.from_numpy(arr).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


def test_without_cuda_a_cuda_batch_is_decoded_the_exact_way_and_says_so(pre, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import torchvision.io

    def no_decode(*args, **kwargs):
        raise AssertionError("decode_jpeg must not be called without CUDA")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_decode)
    datas = [jpeg(photo(120, 90, 1)), b"junk"]

    out = decode_resize_batch(datas, pre, "cuda")

    assert out.device == torch.device("cpu") and out.pixels.device.type == "cpu"
    assert "CUDA is not available" in out.fallback_reason
    assert out.on_device == [False, False]
    np.testing.assert_array_equal(out.pixels[0].numpy(), exact(pre, datas[0]))
    assert out.errors[1] == reason(b"junk")
    assert gpu_decode.decode_device("cuda:0")[0] == torch.device("cpu")


def test_a_jpeg_the_decoder_rejects_goes_the_cpu_way_and_the_others_stay(pre, monkeypatch):
    import torchvision.io

    datas = [jpeg(photo(100, 80, s)) for s in range(3)]
    real = torchvision.io.decode_jpeg
    refused = datas[1]

    def picky(inp, *args, **kwargs):
        batch = inp if isinstance(inp, list) else [inp]
        if any(bytes(t.numpy()) == refused for t in batch):
            raise RuntimeError("nvjpeg: unsupported")  # as for the whole list
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    out = decode_resize_batch(datas, pre, "cpu")
    assert out.on_device == [True, False, True] and out.errors == [None] * 3
    np.testing.assert_array_equal(out.pixels[1].numpy(), exact(pre, datas[1]))
    assert_close(out.pixels[0], exact(pre, datas[0]))


def test_mpo_first_picture_is_decoded_on_the_device(pre):
    buf = io.BytesIO()
    first = photo(160, 120, 1)
    first.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (160, 120), BLUE)])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_resize_batch([data], pre, "cpu")
    assert out.on_device == [True] and out.sizes == [(160, 120)]
    assert_close(out.pixels[0], exact(pre, data))


def test_fallback_errors_become_reasons(pre):
    def fallback(data):
        if data == b"slow":
            raise DecodeError("decode took longer than source.decode_timeout_s=1 s; cut off")
        raise KeyError("boom")

    out = decode_resize_batch([b"slow", b"odd"], pre, "cpu", fallback=fallback)
    assert out.errors == [
        "decode took longer than source.decode_timeout_s=1 s; cut off",
        "preprocessing failed: KeyError: 'boom'",
    ]
    assert exact_fallback(pre)(jpeg(photo(70, 70)))[1] == (70, 70)


def test_chunks_and_size_groups_change_nothing(pre, monkeypatch):
    datas = [jpeg(photo(w, h, i)) for i, (w, h) in enumerate([(120, 90)] * 3 + [(90, 120)] * 2)]
    whole = decode_resize_batch(datas, pre, "cpu")
    monkeypatch.setattr(gpu_decode, "MAX_CHUNK_PIXELS", 120 * 90 * 2)  # two images a chunk
    chunked = decode_resize_batch(datas, pre, "cpu")
    assert torch.equal(whole.pixels, chunked.pixels) and whole.sizes == chunked.sizes
    assert all(whole.on_device)
    for i, d in enumerate(datas):
        assert_close(whole.pixels[i], exact(pre, d))


def test_a_transform_torch_cannot_run_sends_the_batch_the_exact_way(pre):
    lanczos = Preprocessor({**CFG, "interpolation": "lanczos"})
    datas = [jpeg(photo(120, 90))]
    out = decode_resize_batch(datas, lanczos, "cpu")
    assert out.on_device == [False] and "lanczos" in out.fallback_reason
    np.testing.assert_array_equal(out.pixels[0].numpy(), exact(lanczos, datas[0]))


def test_an_empty_batch(pre):
    out = decode_resize_batch([], pre, "cpu")
    assert out.pixels.shape == (0, 64, 64, 3) and out.errors == [] and out.sizes == []
