"""Tests for vitflow.decode: every image is generated in memory."""

from __future__ import annotations

import gc
import io
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageFile

from vitflow.decode import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    DecodeError,
    decode_image,
)

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    if fmt == "HEIF":
        # Writing goes through pillow-heif's Pillow plugin, the writer that turns an EXIF
        # orientation into the irot box phones write. decode_image registers the same
        # opener on its first HEIF file, with the same call.
        pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def blocks(w: int = 40, h: int = 20) -> np.ndarray:
    """Four flat quadrants of distinct colours: survives JPEG and shows any rotation."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = RED
    arr[: h // 2, w // 2 :] = GREEN
    arr[h // 2 :, : w // 2] = BLUE
    arr[h // 2 :, w // 2 :] = YELLOW
    return arr


def _chunk(tag: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(tag + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)


def png_raw(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    """A hand-built PNG, for what Pillow cannot write (16-bit colour, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png16(arr: np.ndarray, color_type: int) -> bytes:
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return png_raw(w, h, 16, color_type, zlib.compress(rows))


def rgb_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)
    return arr.astype(int)


# --- supported formats -------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),  # four colours fit a palette exactly
    ],
)
def test_lossless_formats_round_trip_exactly(fmt, kwargs):
    src = blocks(37, 23)
    out = decode_image(encode(Image.fromarray(src), fmt, **kwargs))
    assert out.size == (37, 23)
    np.testing.assert_array_equal(rgb_array(out), src)


def test_jpeg_round_trips_approximately():
    src = blocks(64, 32)
    out = decode_image(encode(Image.fromarray(src), "JPEG", quality=95))
    assert out.size == (64, 32)
    assert np.abs(rgb_array(out) - src).mean() < 4


def test_mpo_first_picture_is_decoded():
    first = Image.new("RGB", (16, 8), RED)
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 8), BLUE)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data)
    assert out.size == (16, 8)
    assert np.abs(rgb_array(out) - RED).max() < 8


def test_supported_formats_and_default_limit():
    expected = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF"}
    assert expected == SUPPORTED_FORMATS
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_result_is_loaded_and_detached_from_input():
    src = blocks(8, 8)
    data = bytearray(encode(Image.fromarray(src), "PNG"))
    out = decode_image(data)
    data[:] = b"\x00" * len(data)  # the caller may reuse its buffer
    assert not isinstance(out, ImageFile.ImageFile)
    np.testing.assert_array_equal(rgb_array(out), src)


# --- orientation -------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation, k):
    src = blocks(40, 20)
    img = Image.fromarray(src)
    exif = img.getexif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=100, subsampling=0, exif=exif)
    out = rgb_array(decode_image(data))
    expected = np.rot90(src, k=k).astype(int)
    assert out.shape == expected.shape
    # Compare away from the block edges, where JPEG rings.
    h, w = expected.shape[:2]
    for y in (h // 4, 3 * h // 4):
        for x in (w // 4, 3 * w // 4):
            assert np.abs(out[y, x] - expected[y, x]).max() <= 6, (y, x)


# --- alpha and transparency --------------------------------------------------


def test_rgba_is_composited_on_white():
    arr = np.array(
        [[[10, 20, 30, 0], [0, 0, 0, 128], [200, 100, 0, 128], [1, 2, 3, 255]]],
        dtype=np.uint8,
    )
    out = rgb_array(decode_image(encode(Image.fromarray(arr), "PNG")))
    a = arr[..., 3:].astype(float) / 255
    expected = a * arr[..., :3] + (1 - a) * 255
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [1, 2, 3]
    assert np.abs(out - expected).max() <= 1


def test_la_is_composited_on_white():
    arr = np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8)
    img = Image.fromarray(arr, "LA")
    out = rgb_array(decode_image(encode(img, "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert np.abs(out[0, 2] - (128 / 255 * 100 + 127 / 255 * 255)).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_index_becomes_white(fmt):
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 1])
    out = rgb_array(decode_image(encode(img, fmt, transparency=1)))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 255], [255, 255, 255]]


def test_grayscale_colour_key_becomes_white():
    img = Image.fromarray(np.array([[0, 50, 100]], dtype=np.uint8))
    out = rgb_array(decode_image(encode(img, "PNG", transparency=50)))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [100, 100, 100]]


def test_rgba_tiff_is_composited_on_white():
    img = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    out = rgb_array(decode_image(encode(img, "TIFF")))
    assert (out == 255).all()


# --- modes -------------------------------------------------------------------


def test_grayscale_is_replicated():
    arr = np.arange(0, 256, 17, dtype=np.uint8).reshape(2, 8)
    out = rgb_array(decode_image(encode(Image.fromarray(arr), "PNG")))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_bilevel_is_black_and_white():
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    out = rgb_array(decode_image(encode(img, "PNG")))
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_16bit_grayscale_png_is_scaled():
    arr = np.array([[0, 128, 129, 1000, 32768, 65535, 257 * 100, 257 * 200 + 128]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = rgb_array(decode_image(encode(img, "PNG")))
    expected = np.rint(arr / 257).astype(int)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_16bit_grayscale_colour_key_becomes_white():
    arr = np.array([[0, 40000, 65535]], dtype=np.uint16)
    out = rgb_array(decode_image(encode(Image.fromarray(arr), "PNG", transparency=40000)))
    assert out[0, :, 0].tolist() == [0, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_32bit_integer_tiff_is_scaled_and_clipped():
    arr = np.array([[-5, 0, 1000, 65535, 70000]], dtype=np.int32)
    img = Image.fromarray(arr)
    assert img.mode == "I"
    out = rgb_array(decode_image(encode(img, "TIFF")))
    assert out[0, :, 1].tolist() == [0, 0, 4, 255, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # normalised
        ([-3.0, 100.4, 300.0], [0, 100, 255]),  # already 0..255, clipped
        ([np.nan, 0.25, 1.0], [0, 64, 255]),
    ],
)
def test_float_tiff(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    out = rgb_array(decode_image(encode(img, "TIFF")))
    assert out[0, :, 2].tolist() == expected


def test_16bit_rgb_png_is_reduced_to_8bit():
    arr = np.array([[[0, 32768, 65535], [257 * 100 + 200, 1000, 65000]]], dtype=np.uint16)
    out = rgb_array(decode_image(png16(arr, color_type=2)))
    assert out.shape == (1, 2, 3)
    assert np.abs(out - np.rint(arr / 257)).max() <= 1


def test_16bit_rgba_png_is_reduced_and_composited():
    arr = np.array([[[0, 0, 0, 65535], [0, 0, 0, 0], [65535, 0, 0, 32896]]], dtype=np.uint16)
    out = rgb_array(decode_image(png16(arr, color_type=6)))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - [255, 127.5, 127.5]).max() <= 1


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    out = rgb_array(decode_image(data))
    assert np.abs(out - RED).max() < 8


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [("LAB", (255, 128, 128), (255, 255, 255)), ("YCbCr", (76, 85, 255), RED)],
)
def test_other_colour_spaces_convert(mode, colour, expected):
    out = rgb_array(decode_image(encode(Image.new(mode, (4, 4), colour), "TIFF")))
    assert np.abs(out - expected).max() <= 3


@pytest.mark.parametrize(("fmt", "kwargs"), [("GIF", {}), ("WEBP", {"lossless": True})])
def test_animation_gives_first_frame(fmt, kwargs):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = rgb_array(decode_image(data))
    assert (out == RED).all()


def test_multipage_tiff_gives_first_page():
    pages = [Image.new("RGB", (8, 8), c) for c in (GREEN, BLUE)]
    out = rgb_array(decode_image(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])))
    assert (out == GREEN).all()


# --- AVIF and HEIF/HEIC (phone photos) -------------------------------------

# The closest to lossless each writer gets: top quality, full-resolution chroma. Pixels
# still pass through YCbCr, so they come back within a few levels, not bit-exact.
NEAR_LOSSLESS = {
    "AVIF": {"quality": 100, "subsampling": "4:4:4"},
    "HEIF": {"quality": -1, "chroma": 444},
}


def gradient(w: int = 64, h: int = 48) -> np.ndarray:
    """Smooth ramps in every channel: what lossy codecs keep, unlike noise or hard edges."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 2], axis=-1).astype(np.uint8)


def heif_16bit(arr: np.ndarray, mode: str, *, save_to_12bit: bool) -> bytes:
    """A 10-bit (or 12-bit) HEIF from 16-bit samples; Pillow has no 16-bit RGB mode to save."""
    h, w = arr.shape[:2]
    buf = io.BytesIO()
    pillow_heif.from_bytes(mode=mode, size=(w, h), data=arr.astype("<u2").tobytes()).save(
        buf, quality=-1, chroma=444, save_to_12bit=save_to_12bit
    )
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heif_round_trip_within_a_few_levels(fmt):
    src = gradient()
    data = encode(Image.fromarray(src), fmt, **NEAR_LOSSLESS[fmt])
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt
    out = decode_image(data)
    assert out.size == (64, 48)
    assert np.abs(rgb_array(out) - src).max() <= 3


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_generic_mif1_brand_is_read_whatever_the_codec(fmt):
    # "mif1" says HEIF container, not which codec: AV1 (Pillow) or HEVC (pillow-heif).
    data = bytearray(encode(Image.new("RGB", (16, 8), BLUE), fmt, **NEAR_LOSSLESS[fmt]))
    data[8:12] = b"mif1"
    out = rgb_array(decode_image(bytes(data)))
    assert out.shape == (8, 16, 3)
    assert np.abs(out - BLUE).max() <= 3


@pytest.mark.parametrize(("fmt", "kwargs"), [("AVIF", {}), ("HEIF", {"quality": 80})])
def test_lossy_avif_and_heif_round_trip_approximately(fmt, kwargs):
    src = gradient()
    out = decode_image(encode(Image.fromarray(src), fmt, **kwargs))
    assert out.size == (64, 48)
    assert np.abs(rgb_array(out) - src).mean() < 4


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heif_orientation_is_applied_once(fmt, orientation, k):
    # Both writers store the EXIF orientation as irot/imir boxes. Pillow's AVIF reader hands
    # them back as the EXIF tag; libheif applies them itself. Applied twice, 6 and 8 would
    # come out upside down and 3 not turned at all.
    src = blocks(40, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(src), fmt, exif=exif.tobytes(), **NEAR_LOSSLESS[fmt])
    out = rgb_array(decode_image(data))
    expected = np.rot90(src, k=k).astype(int)
    assert out.shape == expected.shape
    h, w = expected.shape[:2]
    for y in (h // 4, 3 * h // 4):
        for x in (w // 4, 3 * w // 4):
            assert np.abs(out[y, x] - expected[y, x]).max() <= 6, (y, x)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heif_alpha_is_composited_on_white(fmt):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 60)
    rgba[:, :8, 3] = 0
    rgba[:, 8:, 3] = 255
    rgba[8:, 8:, 3] = 128
    data = encode(Image.fromarray(rgba), fmt, **NEAR_LOSSLESS[fmt])
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGBA"
    out = rgb_array(decode_image(data))
    a = rgba[..., 3:].astype(float) / 255
    expected = a * rgba[..., :3] + (1 - a) * 255
    assert out[4, 4].tolist() == [255, 255, 255]
    assert np.abs(out - expected).max() <= 2


@pytest.mark.parametrize("save_to_12bit", [False, True], ids=["10bit", "12bit"])
def test_high_bit_depth_heif_becomes_8bit_rgb(save_to_12bit):
    src = gradient().astype(np.uint16) * 257  # 16-bit samples, 8-bit value v * 257
    out = decode_image(heif_16bit(src, "RGB;16", save_to_12bit=save_to_12bit))
    assert out.size == (64, 48)
    assert np.abs(rgb_array(out) - np.rint(src / 257)).max() <= 3


@pytest.mark.parametrize("save_to_12bit", [False, True], ids=["10bit", "12bit"])
def test_high_bit_depth_grayscale_heif_is_scaled(save_to_12bit):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)
    src = np.repeat(ramp[None, :], 8, axis=0)
    data = heif_16bit(src, "L;16", save_to_12bit=save_to_12bit)
    out = rgb_array(decode_image(data))
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "I;16"  # pillow-heif hands deep grayscale over as 16-bit
    for c in range(3):
        assert np.abs(out[..., c] - np.rint(src / 257)).max() <= 1


def _python(code: str, *args: str) -> str:
    """Runs ``code`` in a fresh interpreter (plugin registration is per process); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("brand", [b"heic", b"mif1"])
def test_heif_without_pillow_heif_is_an_error_naming_the_fix(tmp_path, brand):
    # A generic "mif1" file is claimed by Pillow's AVIF reader too, which cannot read HEVC.
    heic = bytearray(encode(Image.fromarray(blocks()), "HEIF", quality=90))
    heic[8:12] = brand
    assert decode_image(bytes(heic)).size == (40, 20)  # with the plugin it reads
    (tmp_path / "a.heic").write_bytes(heic)
    (tmp_path / "b.avif").write_bytes(encode(Image.fromarray(blocks()), "AVIF"))
    out = _python(
        """
import sys
from pathlib import Path

sys.modules["pillow_heif"] = None  # what `import pillow_heif` meets where it is not installed
from vitflow.decode import DecodeError, decode_image

try:
    decode_image(Path(sys.argv[1]).read_bytes())
except DecodeError as e:
    print(e)
else:
    print("decoded without pillow-heif")
print(decode_image(Path(sys.argv[2]).read_bytes()).size)
""",
        str(tmp_path / "a.heic"),
        str(tmp_path / "b.avif"),
    )
    reason, avif_size = out.strip().splitlines()
    assert reason.startswith("HEIF/HEIC image, but the pillow-heif plugin")
    assert reason.endswith("pip install pillow-heif")
    assert avif_size == "(40, 20)"  # other formats are unaffected


def test_heif_opener_is_registered_lazily_and_changes_nothing_else(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(blocks()), "PNG"))
    (tmp_path / "b.heic").write_bytes(encode(Image.fromarray(blocks()), "HEIF", quality=90))
    out = _python(
        """
import copy, sys
from pathlib import Path
from PIL import Image, ImageFile
from vitflow.decode import decode_image

png, heic = (Path(p).read_bytes() for p in sys.argv[1:3])
decode_image(png)
print("imported before HEIF:", "pillow_heif" in sys.modules)
import pillow_heif.options as options

Image.init()
opened = set(Image.OPEN)
pillow = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
settings = {k: copy.deepcopy(v) for k, v in vars(options).items() if k.isupper()}
sizes = {decode_image(heic).size for _ in range(3)}
print("sizes:", sizes)
print("new openers:", sorted(set(Image.OPEN) - opened), "HEIF ids:", Image.ID.count("HEIF"))
print("pillow globals kept:", pillow == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES))
print("pillow-heif options kept:", settings == {k: v for k, v in vars(options).items() if k.isupper()})
""",
        str(tmp_path / "a.png"),
        str(tmp_path / "b.heic"),
    )
    assert out.splitlines() == [
        "imported before HEIF: False",
        "sizes: {(40, 20)}",
        "new openers: ['HEIF'] HEIF ids: 1",
        "pillow globals kept: True",
        "pillow-heif options kept: True",
    ]


# --- refusals ----------------------------------------------------------------


def test_empty_file():
    with pytest.raises(DecodeError, match=r"empty file \(0 bytes\)"):
        decode_image(b"")


def test_text_is_not_an_image():
    with pytest.raises(DecodeError, match="not a recognised image format"):
        decode_image(b"this is a text file that someone saved as photo.jpg\n" * 3)


def test_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(DecodeError, match="corrupt or truncated JPEG: image file is truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png():
    rng = np.random.default_rng(0)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)), "PNG"))
    start = data.index(b"IDAT") + 4 + 100
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    with pytest.raises(DecodeError, match="corrupt or truncated PNG"):
        decode_image(bytes(data))


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_unsupported_format_is_named(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    with pytest.raises(DecodeError, match=f"unsupported image format {fmt}") as info:
        decode_image(data)
    for name in SUPPORTED_FORMATS:
        assert name in str(info.value)


def _bomb(width: int, height: int) -> bytes:
    # A header that claims a huge 1-bit image over a tiny IDAT: decoding it
    # would fail as truncated, so a size refusal proves nothing was decoded.
    return png_raw(width, height, 1, 0, zlib.compress(b"\x00" * 64))


def test_bomb_refused_from_header_without_decoding():
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(DecodeError, match="source.max_pixels") as info:
            decode_image(_bomb(10_000, 10_000))
    assert time.perf_counter() - start < 1
    message = str(info.value)
    assert "10000x10000" in message and str(DEFAULT_MAX_PIXELS) in message


def test_bomb_beyond_pillow_hard_limit_is_a_decode_error():
    with pytest.raises(DecodeError, match="source.max_pixels") as info:
        decode_image(_bomb(20_000, 20_000))
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_max_pixels_is_honoured_both_ways():
    data = encode(Image.new("RGB", (20, 10), BLUE), "PNG")
    with pytest.raises(DecodeError, match=r"20x10 = 200 pixels exceeds the limit of 199"):
        decode_image(data, max_pixels=199)
    assert decode_image(data, max_pixels=200).size == (20, 10)


def test_raised_limit_lets_a_large_header_through_to_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError, match="corrupt or truncated PNG"):
            decode_image(_bomb(10_000, 10_000), max_pixels=150_000_000)


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    for _ in range(n):
        cut = int(rng.integers(1, len(data)))
        yield data[:cut]
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), size=4):
            flipped[pos] ^= int(rng.integers(1, 256))
        yield bytes(flipped)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's own notes on corrupt metadata
@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("TIFF", {}),
        ("BMP", {}),
        ("AVIF", {}),
        ("HEIF", {}),
    ],
)
def test_damaged_files_only_ever_raise_decode_error(fmt, kwargs):
    rng = np.random.default_rng(42)
    src = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    for data in _mutations(encode(src, fmt, **kwargs), rng, 40):
        try:
            out = decode_image(data)
        except DecodeError as e:
            assert str(e)
        else:
            assert out.mode == "RGB" and out.size[0] > 0


def _raise(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


@pytest.mark.parametrize(
    ("target", "name", "expected"),
    [
        (Image, "open", "unreadable image header"),
        (ImageFile.ImageFile, "load", "corrupt or truncated PNG"),
        (Image.Image, "convert", "cannot convert PNG image (mode L) to RGB"),
    ],
)
@pytest.mark.parametrize(
    "exc",
    [struct.error("unpack requires a buffer"), EOFError("eof"), SyntaxError("bad"), MemoryError()],
)
def test_any_pillow_exception_becomes_decode_error(monkeypatch, target, name, expected, exc):
    data = encode(Image.new("L", (4, 4), 7), "PNG")
    monkeypatch.setattr(target, name, _raise(exc))
    with pytest.raises(DecodeError, match=re.escape(expected)) as info:
        decode_image(data)
    assert info.value.__cause__ is exc
    if isinstance(exc, MemoryError):
        assert "out of memory" in str(info.value)


def test_pillow_globals_are_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for data in (b"", _bomb(20_000, 20_000), _bomb(10_000, 10_000)):
        with pytest.raises(DecodeError):
            decode_image(data, max_pixels=150_000_000)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert issubclass(DecodeError, ValueError)


@pytest.fixture(scope="module")
def slow_and_fast_files(tmp_path_factory):
    """A batch of a big noisy PNG (slow to decode) and a tiny one, and the resize spec."""
    from vitflow.preprocess import Preprocessor

    d = tmp_path_factory.mktemp("timeouts")
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
    ).save(d / "big.png")
    Image.new("RGB", (8, 8)).save(d / "small.png")
    spec = Preprocessor(
        {
            "input_size": (3, 16, 16),
            "interpolation": "bilinear",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
    ).resize_spec()
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "path": np.array([str(d / "big.png"), str(d / "small.png")], dtype=object),
        "label": np.array([None, None], dtype=object),
        "split": np.array([None, None], dtype=object),
    }
    return batch, spec


@pytest.mark.parametrize("where", ["main thread", "another thread"])
def test_decode_over_its_time_budget_is_cut_off_as_an_error_row(slow_and_fast_files, where):
    """The decode stage bounds each file's decode time (a file that would hang), in the main
    thread (a Ray task) and outside it (Ray Data runs an actor's batches in a thread)."""
    import concurrent.futures

    from vitflow.decode_task import decode_batch

    batch, spec = slow_and_fast_files

    def run(timeout):
        return decode_batch(dict(batch), resize=spec, max_pixels=10**8, decode_timeout_s=timeout)

    if where == "another thread":
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            out = pool.submit(run, 0.005).result(timeout=60)
            unbounded = pool.submit(run, None).result(timeout=60)
    else:
        out, unbounded = run(0.005), run(None)
    assert list(out["status"]) == ["error", "ok"]
    assert "decode_timeout_s" in out["error"][0]
    assert list(unbounded["status"]) == ["ok", "ok"]


@pytest.mark.parametrize("in_thread", [False, True])
def test_a_time_limit_never_strikes_after_its_block(in_thread, monkeypatch):
    """Blocks that end around their limit: the timeout is raised inside the ``with`` or not
    at all, never later in code that did not ask for it."""
    import threading

    from vitflow.decode_task import DecodeTimeout, time_limit

    outcome: dict[str, object] = {}
    stray: list = []  # an exception raised where nobody could catch it ("Exception ignored")
    monkeypatch.setattr(sys, "unraisablehook", stray.append)

    def many():
        cut = 0
        for i in range(400):
            try:
                with time_limit(0.002):
                    sum(range(1000 + 2000 * i))  # from well inside the limit to far past it
            except DecodeTimeout:
                cut += 1
            for _ in range(3000):  # a late exception would land here, outside the try
                pass
        outcome["cut"] = cut

    if in_thread:
        t = threading.Thread(target=many)
        t.start()
        t.join(timeout=120)
    else:
        many()
    assert 0 < outcome["cut"] < 400  # some blocks were cut, some were not
    gc.collect()
    assert stray == []


# --- JPEG draft (reduced-scale decode, opt-in) ----------------------------------------


def _jpeg(w: int, h: int, mode: str = "RGB", orientation: int | None = None, **kw) -> bytes:
    """A smooth colour gradient (survives scaling), optionally with an EXIF orientation."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    if orientation is not None:
        exif = img.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    return encode(img, "JPEG", quality=92, **kw)


def _close(a: Image.Image, b: Image.Image, size: tuple[int, int]) -> float:
    """Mean absolute difference of two images brought to one small size."""
    a, b = (np.asarray(i.resize(size, Image.BICUBIC), dtype=np.int16) for i in (a, b))
    return float(np.abs(a - b).mean())


def test_draft_decodes_a_large_jpeg_smaller_but_never_below_the_size():
    from vitflow.decode import decoded_size

    data = _jpeg(1280, 960)
    exact = decode_image(data)
    drafted = decode_image(data, draft_size=(248, 248))
    # 960 // 248 = 3: libjpeg's largest power-of-two scale not above it is 1/2.
    assert drafted.size == (640, 480) and drafted.mode == "RGB"
    assert decoded_size(drafted) == (1280, 960) == decoded_size(exact) == exact.size
    assert _close(drafted, exact, (320, 240)) < 1.5
    assert decode_image(data, draft_size=(100, 100)).size == (160, 120)  # 1/8, the most
    assert decode_image(data, draft_size=(700, 10)).size == (1280, 960)  # 1280 // 700 = 1


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_draft_size_is_in_displayed_orientation(orientation):
    from vitflow.decode import decoded_size

    # Stored 1600x400; orientations 6 and 8 display it as 400x1600.
    data = _jpeg(1600, 400, orientation=orientation)
    exact = decode_image(data)
    want = (95, 390) if orientation in (6, 8) else (390, 95)
    drafted = decode_image(data, draft_size=want)
    assert drafted.width >= want[0] and drafted.height >= want[1]
    assert drafted.width * drafted.height == (1600 // 4) * (400 // 4)  # 1/4 in both cases
    assert decoded_size(drafted) == exact.size
    assert _close(drafted, exact, (exact.width // 8, exact.height // 8)) < 1.5


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_draft_keeps_grayscale_and_cmyk_conversions(mode):
    data = _jpeg(800, 600, mode=mode)
    exact, drafted = decode_image(data), decode_image(data, draft_size=(100, 100))
    assert drafted.mode == "RGB" and drafted.size == (200, 150)
    assert _close(drafted, exact, (100, 75)) < 1.5


def test_draft_leaves_other_formats_and_small_jpegs_alone():
    from vitflow.decode import decoded_size

    png = encode(Image.fromarray(gradient(640, 480)), "PNG")
    assert decode_image(png, draft_size=(50, 50)).size == (640, 480)
    small = _jpeg(300, 200)
    out = decode_image(small, draft_size=(248, 248))
    np.testing.assert_array_equal(rgb_array(out), rgb_array(decode_image(small)))
    assert decoded_size(out) == (300, 200)


def test_draft_applies_to_the_first_picture_of_an_mpo():
    from vitflow.decode import decoded_size

    first = Image.fromarray(gradient(800, 600))
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (800, 600), BLUE)])
    out = decode_image(data, draft_size=(100, 100))
    assert out.size == (200, 150) and decoded_size(out) == (800, 600)
    assert _close(out, decode_image(data), (100, 75)) < 1.5


def test_draft_checks_max_pixels_against_the_file_not_the_draft():
    with pytest.raises(DecodeError, match="1280x960 = 1228800 pixels exceeds the limit"):
        decode_image(_jpeg(1280, 960), max_pixels=1_000_000, draft_size=(100, 100))
