"""Turn the raw bytes of an image file into an 8-bit RGB PIL image.

Every file a pipeline reads goes through :func:`decode_image`. Anything that cannot
become an RGB image raises :class:`DecodeError`, whose text is stored in the
error row, so one bad file never takes a whole batch down with an unexpected
exception type.

AVIF is read by Pillow itself; HEIF/HEIC (phone photos) by the pillow-heif plugin.

The module changes no global state beyond one thing: the first HEIF file a process
meets registers pillow-heif's Pillow opener (once; nothing else, no pillow-heif
option, is set). Pillow's ``MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES``
are read, never written, because decoding runs in worker processes that other code
shares.
"""

from __future__ import annotations

import functools
import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, features

SUPPORTED_FORMATS: frozenset[str] = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF"}
)
DEFAULT_MAX_PIXELS: int = 89_478_485
# Formats libjpeg can scale while decoding (Image.draft: 1/2, 1/4, 1/8 in the DCT domain).
DRAFT_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO"})
# Where decode_image records the file's own size when a draft decoded it smaller.
_FULL_SIZE_KEY = "vitflow.full_size"

# ISO-BMFF files start with an "ftyp" box whose major brand (bytes 8..12) names the
# content: these are the brands pillow-heif's opener accepts (HEVC stills and sequences,
# and the generic HEIF ones), and the AV1 brands of AVIF.
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_LOCK = threading.Lock()

_ORIENTATION_TAG = 0x0112
# Integer modes Pillow uses for 16-bit grayscale (PNG, TIFF); "I" also holds them.
_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class DecodeError(ValueError):
    """A file that cannot become an RGB image; str(e) is the readable reason stored in the error row."""


def _brand(data: bytes) -> bytes | None:
    """The ISO-BMFF major brand of ``data`` (``b"heic"``, ``b"avif"``), or None if not ISO-BMFF."""
    head = bytes(data[4:12])
    return head[4:] if head[:4] == b"ftyp" else None


@functools.cache
def _register_heif_opener() -> str | None:
    try:
        from pillow_heif import register_heif_opener

        # No arguments: keyword arguments would change pillow-heif's process-wide options.
        register_heif_opener()
    except Exception as e:  # not installed, or its native library does not load
        return f"{type(e).__name__}: {e}"
    return None


def _heif_plugin_error() -> str | None:
    """Registers pillow-heif's opener on first use (once per process); why not, if it cannot.

    Lazy, so that jobs without HEIF files never import the plugin. An interrupted attempt
    (a decode timeout is a BaseException) is not cached, so the next file tries again.
    """
    with _HEIF_LOCK:
        return _register_heif_opener()


def _unidentified(data: bytes) -> DecodeError:
    """Why Pillow could not identify ``data``, naming the fix where there is one."""
    brand = _brand(data)
    if brand in _HEIF_BRANDS:
        missing = _heif_plugin_error()
        if missing is not None:
            return DecodeError(
                f"HEIF/HEIC image, but the pillow-heif plugin that decodes it is not "
                f"available ({missing}); pip install pillow-heif"
            )
        return DecodeError(
            f"corrupt or truncated HEIF/HEIC image ({len(data)} bytes, brand "
            f"{brand.decode('latin-1')!r}): pillow-heif cannot read its header"
        )
    if brand in _AVIF_BRANDS:
        if not features.check("avif"):
            return DecodeError(
                "AVIF image, but this Pillow was built without AVIF support; "
                "pip install -U pillow (a build where PIL.features.check('avif') is True)"
            )
        return DecodeError(
            f"corrupt or truncated AVIF image ({len(data)} bytes): Pillow cannot read its header"
        )
    return DecodeError(
        f"bytes are not a recognised image format ({len(data)} bytes, "
        f"starting {bytes(data[:8])!r}), or the image header is corrupt"
    )


def _reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    return str(e).strip() or type(e).__name__


def _too_large(size: tuple[int, int], max_pixels: int) -> DecodeError:
    w, h = size
    return DecodeError(
        f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
        "pixels (possible decompression bomb); raise source.max_pixels to accept it"
    )


def _pillow_refused(e: Exception, max_pixels: int) -> DecodeError:
    # Pillow's hard cap (twice MAX_IMAGE_PIXELS) fires inside Image.open, before
    # our own check, and cannot be lifted without mutating Pillow's global.
    return DecodeError(
        f"image too large: {_reason(e)} (source.max_pixels is {max_pixels}; Pillow refuses "
        "images this size whatever source.max_pixels says)"
    )


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable.

    For JPEG it is known from the header alone, before any pixel is decoded.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        # A corrupt EXIF block should not cost an otherwise decodable image.
        return 1
    return orientation if orientation in range(1, 9) else 1


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag, so the image is as a viewer displays it.

    AVIF and HEIF store orientation as irot/imir boxes. Pillow's AVIF reader reports them as
    this tag, so they are applied here; libheif applies them while decoding and pillow-heif
    resets the tag to 1, so a HEIF image is never turned twice.
    """
    if exif_orientation(img) != 1:
        return ImageOps.exif_transpose(img)
    return img


def _int_to_rgb(img: Image.Image) -> Image.Image:
    """Scales 16-bit grayscale 0..65535 onto 0..255, rounding like value / 257."""
    raw = np.asarray(img)
    vals = np.clip(raw, 0, 65535).astype(np.int32)
    # (v + 128) // 257 == round(v / 257) for integers (257 is odd, so no ties),
    # and stays in int32 instead of allocating a float64 copy of a large image.
    gray = ((vals + 128) // 257).astype(np.uint8)
    transparency = img.info.get("transparency")
    if isinstance(transparency, int):
        # A tRNS colour key is binary alpha, so compositing on white is a fill.
        gray[raw == transparency] = 255
    return Image.fromarray(gray).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Maps float data to 0..255: [0, 1] is taken as normalised, anything else is clipped."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    gray = np.rint(np.clip(arr, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any loaded Pillow mode to RGB, compositing transparency onto white."""
    if img.mode in _INT_MODES:
        return _int_to_rgb(img)
    if img.mode == "F":
        return _float_to_rgb(img)
    if img.has_transparency_data:
        # Models never saw a black background behind transparent pixels, which
        # is what a plain convert("RGB") would produce; white matches viewers.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _draft(img: Image.Image, size: tuple[int, int]) -> None:
    """Lets libjpeg decode ``img`` at 1/2, 1/4 or 1/8 scale, never below ``size`` (displayed
    width, height) in either dimension. Before ``load``: the scale is a decoder setting."""
    w, h = size
    if exif_orientation(img) in (5, 6, 7, 8):
        # The file stores the image on its side; the draft works in stored pixels.
        w, h = h, w
    # Mode "RGB" leaves the JPEG's colour space alone: CMYK and L convert as without a draft.
    img.draft("RGB", (max(int(w), 1), max(int(h), 1)))


def decoded_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the image in its file, in displayed orientation: ``img.size``,
    unless :func:`decode_image` decoded it smaller with ``draft_size``."""
    return img.info.get(_FULL_SIZE_KEY, img.size)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decodes image bytes into an 8-bit RGB image in displayed orientation.

    Args:
        data: The complete contents of an image file.
        max_pixels: Largest width * height accepted. It is checked against the
            header, before any pixel is decoded. Pillow itself refuses images
            above twice its ``MAX_IMAGE_PIXELS`` whatever this value is.
        draft_size: ``(width, height)`` in displayed orientation, or None (default: decode
            every pixel). For a JPEG at least twice as large in both dimensions, libjpeg
            decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, never below this size
            (:meth:`vitflow.preprocess.Preprocessor.draft_size` is the smallest size its
            resize reads). Much faster for camera photos, but the pixels differ from the
            exact path; other formats ignore it. :func:`decoded_size` still gives the
            file's size.

    Returns:
        A fully loaded mode "RGB" image that no longer refers to ``data``. Only
        the first frame of animated or multi-page files is returned.

    Raises:
        DecodeError: If the bytes are empty, not an image, in a format outside
            ``SUPPORTED_FORMATS``, too large, corrupt or truncated, or in a
            mode that cannot be converted to RGB; also for a HEIF/HEIC file when
            the pillow-heif plugin is not installed (the reason says so).
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if _brand(data) in _HEIF_BRANDS:
        # Before Image.open, which only knows HEIF once the opener is registered. When the
        # plugin is missing, Pillow's AVIF reader may still claim a generic "mif1" file.
        _heif_plugin_error()
    with warnings.catch_warnings():
        # The max_pixels check below replaces Pillow's warning, which would
        # otherwise be printed once per large image.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError as e:
            raise _unidentified(data) from e
        except Image.DecompressionBombError as e:
            raise _pillow_refused(e, max_pixels) from e
        except Exception as e:
            raise DecodeError(f"unreadable image header: {_reason(e)}") from e

        with img:
            fmt = img.format
            if fmt not in SUPPORTED_FORMATS:
                raise DecodeError(
                    f"unsupported image format {fmt}; supported formats: "
                    f"{', '.join(sorted(SUPPORTED_FORMATS))}"
                )
            if img.width * img.height > max_pixels:
                raise _too_large(img.size, max_pixels)
            stored_size = img.size
            if draft_size is not None and fmt in DRAFT_FORMATS:
                _draft(img, draft_size)
            try:
                # Decoding is lazy: force it here so truncation surfaces now.
                img.load()
            except Image.DecompressionBombError as e:
                raise _pillow_refused(e, max_pixels) from e
            except Exception as e:
                raise DecodeError(f"corrupt or truncated {fmt}: {_reason(e)}") from e
            try:
                rgb = _to_rgb(_upright(img))
                if rgb is img:
                    # Closing the file object destroys its pixel core: detach a copy.
                    rgb = img.copy()
            except Exception as e:
                raise DecodeError(
                    f"cannot convert {fmt} image (mode {img.mode}) to RGB: {_reason(e)}"
                ) from e
            if img.size != stored_size:
                # Drafted: keep the file's size, turned as the pixels were.
                turned = exif_orientation(img) in (5, 6, 7, 8)
                rgb.info[_FULL_SIZE_KEY] = stored_size[::-1] if turned else stored_size
    return rgb
