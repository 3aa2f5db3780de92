"""Decode a batch of JPEGs on the model's device and resize them there.

``compute.decode: gpu`` moves decode off the CPU cores: the JPEGs of a batch go to
``torchvision.io.decode_jpeg`` together (nvJPEG on a CUDA device), EXIF orientation and the
model's resize/crop (:meth:`vitflow.preprocess.Preprocessor.resize_crop_tensor`) run as
torch ops on the same device, and the result is the ``uint8`` ``(B, H, W, 3)`` batch the
CPU path makes, so :meth:`~vitflow.preprocess.Preprocessor.to_tensor` normalises either.
``uint8`` rather than normalised floats: rows the CPU decoded drop in as they are, a batch
holds a quarter of the memory, and the 8-bit rounding is the exact path's own; the
normalisation left is one elementwise op on the device.

Every file the device cannot or should not decode goes the exact CPU way instead
(:func:`vitflow.decode.decode_image` + :meth:`~vitflow.preprocess.Preprocessor.resize_crop`),
one file at a time: other formats, CMYK and other non-RGB/grayscale JPEGs, a JPEG without
its end marker, anything larger than ``max_pixels`` (refused there from the header, before
any pixel is decoded), and any JPEG the device decoder rejects. So every file still ends as
an ok row or an error row with the CPU path's reason, and a bad file never costs the others.

The device path differs from the exact one by what two decoders and two resamplers differ
by: ``benchmarks/decode_deviation.py`` measures it.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vitflow.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_image,
    decoded_size,
    exif_orientation,
)
from vitflow.preprocess import Preprocessor

log = logging.getLogger(__name__)

# What goes to the device decoder; Pillow names JPEG modes L, RGB (from YCbCr) and CMYK.
# MPO is a JPEG followed by more pictures (phones write it for portrait shots): the decoder
# reads the first, as Pillow does.
DEVICE_FORMATS = frozenset({"JPEG", "MPO"})
DEVICE_MODES = frozenset({"RGB", "L"})
# Decoded pixels held at once per chunk of a batch: 12 camera photos of 12 Mpx, 0.45 GB of
# uint8, and 1.8 GB as the float32 the first resize pass reads.
MAX_CHUNK_PIXELS = 150_000_000
_EOI = b"\xff\xd9"

# A fallback decodes one file the exact way: bytes -> (uint8 (H, W, 3), (width, height)).
Fallback = Callable[[bytes], tuple[np.ndarray, tuple[int, int]]]


class DecodedBatch(NamedTuple):
    """What :func:`decode_resize_batch` returns; unpacks as ``pixels, errors, sizes, ...``."""

    pixels: torch.Tensor  # uint8 (B, H, W, 3) on `device`, zeros on error rows
    errors: list[str | None]  # the reason per error row, None per ok row
    sizes: list[tuple[int, int]]  # (width, height) as displayed; (-1, -1) on error rows
    on_device: list[bool]  # True where the device decoded the row, False: CPU path or error
    device: torch.device  # where pixels are
    fallback_reason: str | None  # why the whole batch went the CPU way; None when it did not


def decode_device(device: str | torch.device) -> tuple[torch.device, str | None]:
    """The device a batch decoded for ``device`` lands on, and why the device decoder is
    not used (None when it is).

    ``cuda`` without a usable GPU gives ``cpu`` and the reason: such a batch is decoded with
    the exact CPU path, never attempted on CUDA. ``cpu`` runs the device path's logic with
    libjpeg, for tests and benchmarks.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), (
            "compute.decode is gpu but CUDA is not available (torch.cuda.is_available() is "
            "False): images are decoded on the CPU, the exact way"
        )
    if dev.type not in ("cuda", "cpu"):
        return dev, f"torchvision decodes JPEG on cuda or cpu only, not {dev.type}"
    return dev, None


def exact_fallback(pre: Preprocessor, max_pixels: int = DEFAULT_MAX_PIXELS) -> Fallback:
    """The exact CPU path as a :data:`Fallback`: ``decode_image`` + ``resize_crop``."""

    def decode(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        img = decode_image(data, max_pixels=max_pixels)
        return pre.resize_crop(img), decoded_size(img)

    return decode


def decode_resize_batch(
    datas: Sequence[bytes],
    pre: Preprocessor,
    device: str | torch.device = "cuda",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fallback: Fallback | None = None,
) -> DecodedBatch:
    """Decode and resize/crop a batch of image files, JPEGs on ``device``, to the model's input.

    Args:
        datas: The complete contents of each file.
        pre: The model's preprocessing; its resize/crop runs on ``device``.
        device: Where JPEGs are decoded and the pixels land (``cuda``, ``cuda:1``; ``cpu``
            runs the same logic with libjpeg). See :func:`decode_device` for ``cuda``
            without a GPU.
        max_pixels: Largest width * height accepted, checked from the header before decode.
        fallback: How a file the device does not decode is decoded; default
            :func:`exact_fallback`. Wrap it to add a time limit. A :class:`DecodeError` it
            raises becomes the row's reason as it is, any other exception
            ``"preprocessing failed: ..."``.

    Returns:
        A :class:`DecodedBatch` with one row per file, in order.

    Example:
        >>> pre = Preprocessor({"input_size": (3, 32, 32), "interpolation": "bicubic",
        ...                     "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9})
        >>> buf = io.BytesIO(); Image.new("RGB", (64, 48)).save(buf, "JPEG")
        >>> out = decode_resize_batch([buf.getvalue(), b"junk"], pre, "cpu")
        >>> out.pixels.shape, out.errors[0], out.sizes[0], out.on_device
        (torch.Size([2, 32, 32, 3]), None, (64, 48), [True, False])
    """
    n = len(datas)
    _, out_h, out_w = pre.input_size
    dev, reason = decode_device(device)
    if reason is None and pre.tensor_unsupported is not None:
        reason = pre.tensor_unsupported
    if reason is not None:
        log.debug("decoding %d files on the CPU: %s", n, reason)  # the caller reports it once
    fallback = fallback or exact_fallback(pre, max_pixels)
    pixels = torch.zeros((n, out_h, out_w, 3), dtype=torch.uint8, device=dev)
    errors: list[str | None] = [None] * n
    sizes: list[tuple[int, int]] = [(-1, -1)] * n
    on_device = [False] * n

    plans = {} if reason is not None else _plans(datas, max_pixels)
    for chunk in _chunks(plans):
        decoded = _decode_jpegs([datas[i] for i in chunk], dev)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, img in zip(chunk, decoded, strict=True):
            if img is not None:
                img = _orient(img, plans[i][0])
                groups[tuple(img.shape[-2:])].append((i, img))
        del decoded
        for (h, w), items in groups.items():
            rows = [i for i, _ in items]
            try:
                pixels[rows] = pre.resize_crop_tensor(torch.stack([img for _, img in items]))
            except Exception as e:  # e.g. out of device memory: these rows go the CPU way
                log.warning("device resize of %d images failed (%s); CPU path", len(rows), e)
                continue
            for i in rows:
                sizes[i], on_device[i] = (w, h), True

    for i in range(n):
        if on_device[i]:
            continue
        try:
            arr, sizes[i] = fallback(datas[i])
            pixels[i] = torch.from_numpy(np.array(arr, dtype=np.uint8)).to(dev)  # a writable copy
        except DecodeError as e:
            errors[i] = str(e)
        except Exception as e:
            errors[i] = f"preprocessing failed: {type(e).__name__}: {e}"
        if errors[i] is not None:
            sizes[i] = (-1, -1)
    return DecodedBatch(pixels, errors, sizes, on_device, dev, reason)


def is_device_decodable(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether :func:`decode_resize_batch` sends ``data`` to the device decoder (from the
    header alone, ~50 us): a CPU decode actor can decode everything else itself and ship only
    JPEG bytes to the model actor."""
    return _device_plan(data, max_pixels) is not None


def _plans(datas: Sequence[bytes], max_pixels: int) -> dict[int, tuple[int, int]]:
    """``{row: (EXIF orientation, stored width * height)}`` for the files the device decodes."""
    plans = {}
    for i, data in enumerate(datas):
        plan = _device_plan(data, max_pixels)
        if plan is not None:
            plans[i] = plan
    return plans


def _device_plan(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """``(orientation, pixels)`` of a JPEG the device may decode, from its header only;
    None for a file that goes the CPU way (which names whatever is wrong with it)."""
    # A JPEG that does not end in its EOI marker is truncated (or carries trailing data):
    # libjpeg refuses the first, but a GPU decoder may return half a picture.
    if not bytes(data[-64:]).rstrip(b"\x00\r\n ").endswith(_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in DEVICE_FORMATS or img.mode not in DEVICE_MODES:
                    return None
                if img.width * img.height > max_pixels:
                    return None
                return exif_orientation(img), img.width * img.height
    except Exception:
        return None


def _chunks(plans: dict[int, tuple[int, int]]) -> list[list[int]]:
    """Rows in order, cut so that no chunk decodes more than ``MAX_CHUNK_PIXELS``."""
    chunks: list[list[int]] = []
    current: list[int] = []
    held = 0
    for i, (_, npix) in plans.items():
        if current and held + npix > MAX_CHUNK_PIXELS:
            chunks.append(current)
            current, held = [], 0
        current.append(i)
        held += npix
    if current:
        chunks.append(current)
    return chunks


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """``(3, H, W)`` ``uint8`` per JPEG on ``device``; None where the decoder refused it.

    One call for the whole list (nvJPEG's batched decode); a call that fails is repeated
    file by file, because one bad file fails the whole list.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    # frombuffer needs a writable buffer; the copy is small next to the decode.
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception:
        pass
    out: list[torch.Tensor | None] = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except Exception:
            out.append(None)
    return out


def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turns ``(..., H, W)`` pixels as EXIF orientation 1..8 says (``ImageOps.exif_transpose``)."""
    if orientation == 2:  # mirrored
        return img.flip(-1)
    if orientation == 3:  # upside down
        return img.flip(-2, -1)
    if orientation == 4:  # upside down, mirrored
        return img.flip(-2)
    if orientation == 5:  # transposed
        return img.transpose(-2, -1)
    if orientation == 6:  # on its left side: turn 90 degrees clockwise
        return img.rot90(-1, (-2, -1))
    if orientation == 7:  # transposed the other way
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # on its right side: turn 90 degrees counter-clockwise
        return img.rot90(1, (-2, -1))
    return img
