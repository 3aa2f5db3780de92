"""Reading checkpoint files safely: what a file is, and whether it is whole.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only, so a
checkpoint file can never run code. A checkpoint is read only when it is a regular file (or
object) of known size that is exactly as long as its own structure declares: the safetensors
header gives every tensor's offsets, torch's zip archive ends with its end record. Those
checks read a bounded prefix or suffix; the rest is read only once they pass, so no limit on
the file's size is needed beyond the size it declares (a larger limit would only refuse the
largest real models).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes

from vitflow.errors import ModelError

log = logging.getLogger(__name__)

# Wrapper keys under which training scripts (timm, Lightning, DeiT, MAE) nest the weights.
_NESTED_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_MAX_KEYS_SHOWN = 8

# safetensors' own limit on its JSON header (MAX_HEADER_SIZE in the safetensors crate).
_MAX_SAFETENSORS_HEADER = 100_000_000
# A zip archive ends with a 22-byte end record plus a comment of at most 65535 bytes.
_ZIP_END, _ZIP_TAIL = 22, 22 + 0xFFFF
# torch.save writes one ~100-byte central-directory entry per tensor: 64 MiB is ~600,000
# tensors, and bounds the Python objects zipfile builds from it.
_MAX_ZIP_DIRECTORY = 64 << 20
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_FIX = "copy or save it again"
_CHUNK = 1 << 20


@dataclass
class Checkpoint:
    """A state dict read from disk or object storage, with the file's sha256."""

    state_dict: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, str]


def read_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict from a path or URL.

    Devices, FIFOs, sockets and directories are refused before a byte is read, and so is a
    file longer or shorter than its own header declares (trailing data, truncation). The
    sha256 is that of the file's bytes; a local file is hashed in chunks and loaded without
    a second copy in memory.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            return _read_local(uri, path)
        return _read_remote(uri, fs, path)
    except FileNotFoundError as e:
        raise ModelError(f"checkpoint {uri!r} does not exist; fix model.checkpoint") from e
    except OSError as e:
        raise ModelError(f"checkpoint {uri!r} cannot be read: {e}") from e


def _read_local(uri: str, path: str) -> Checkpoint:
    # stat follows links (a link to a regular file is that file) and opens nothing, so a
    # FIFO cannot block and a device is never read.
    _require_regular_file(uri, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(fd)
        _require_regular_file(uri, before.st_mode)  # replaced between stat and open
        os.set_blocking(fd, True)
        kind, metadata = _check_file(uri, f, before.st_size)
        sha = _sha256(uri, f, before.st_size)
        if kind == "safetensors":
            state = _load_safetensors_file(uri, _same_file(fd, path))
        else:
            state = _torch_load(uri, f, before.st_size, kind)
        after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise _changed(uri)
    return Checkpoint(state_dict=_unwrap(state, uri), sha256=sha, metadata=metadata)


def _read_remote(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> Checkpoint:
    info = fs.info(path)
    if info.get("type") != "file":
        raise ModelError(
            f"checkpoint {uri!r} is a {info.get('type') or 'special entry'}, not a file; set "
            "model.checkpoint (--checkpoint) to a .safetensors or .pth weights file"
        )
    size = info.get("size")
    if not isinstance(size, int) or size < 0:
        raise ModelError(
            f"checkpoint {uri!r} has no known size (its server does not say), and vitflow "
            "reads only checkpoints whose size it knows; copy it to a local disk or object "
            "storage and set model.checkpoint to the copy"
        )
    with fs.open(path, "rb") as f:
        _check_file(uri, f, size)  # ranged reads of the header or the zip's end
        raw = _read_at(uri, f, 0, size)
    # The bytes loaded are the bytes checked, whatever happened to the object in between.
    kind, metadata = _check_file(uri, io.BytesIO(raw), size)
    sha = hashlib.sha256(raw).hexdigest()
    if kind == "safetensors":
        try:
            state = load_safetensors_bytes(raw)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise _not_safetensors(uri, _first_line(e)) from e
    else:
        state = _torch_load(uri, io.BytesIO(raw), size, kind)
    return Checkpoint(state_dict=_unwrap(state, uri), sha256=sha, metadata=metadata)


_FILE_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
)


def _require_regular_file(uri: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
    raise ModelError(
        f"checkpoint {uri!r} is a {kind}, not a regular file, so vitflow does not read it; "
        "set model.checkpoint (--checkpoint) to a .safetensors or .pth weights file"
    )


def _check_file(uri: str, f: BinaryIO, size: int) -> tuple[str, dict[str, str]]:
    """Check that ``f`` (``size`` bytes) ends where its own structure says, reading only a
    bounded prefix or suffix. Returns its kind (``safetensors``, ``zip`` or ``pickle``, the
    legacy torch format) and, for safetensors, its metadata."""
    if size == 0:
        raise ModelError(f"checkpoint {uri!r} is empty (0 bytes); {_FIX}")
    if uri.endswith(".safetensors"):
        return "safetensors", _check_safetensors(uri, f, size)
    magic = _read_at(uri, f, 0, min(size, 4))
    if magic == b"PK\x03\x04":  # torch.load's own test for its zip format
        _check_zip(uri, f, size)
        return "zip", {}
    if magic[:2] in _PICKLE_PROTOCOLS:
        # Legacy torch.save: pickles, then each storage's bytes after a length written in
        # the file; torch checks each length against the pickle's, and what it reads is
        # bounded by the file. Trailing data is found once it is loaded (_torch_load).
        return "pickle", {}
    hint = (
        "; if it is a safetensors file, name it .safetensors"
        if size > 8 and _read_at(uri, f, 8, 1) == b"{"
        else "; set model.checkpoint to a .safetensors or .pth weights file"
    )
    raise ModelError(
        f"checkpoint {uri!r} is not a torch checkpoint: it starts with {magic!r}, neither a "
        f"zip archive (torch.save) nor a pickle (torch.save before torch 1.6){hint}"
    )


def _check_safetensors(uri: str, f: BinaryIO, size: int) -> dict[str, str]:
    """8 bytes of header length, a JSON header naming every tensor's data offsets, then the
    data: the file's size is known once the header is read."""
    if size < 8:
        raise _not_safetensors(uri, f"it is {size} bytes, less than the 8 every one starts with")
    (n,) = struct.unpack("<Q", _read_at(uri, f, 0, 8))
    if n > _MAX_SAFETENSORS_HEADER:
        raise _not_safetensors(
            uri,
            f"its first 8 bytes declare a {n}-byte header, more than the "
            f"{_MAX_SAFETENSORS_HEADER} safetensors allows, so it is corrupt or not safetensors",
        )
    if 8 + n > size:
        raise _not_safetensors(
            uri,
            f"its first 8 bytes declare a {n}-byte header, but the whole file is {size} "
            "bytes, so it is truncated (or not safetensors at all)",
        )
    data_end, metadata = _parse_safetensors_header(uri, _read_at(uri, f, 8, n))
    declared = 8 + n + data_end
    if size < declared:
        raise ModelError(
            f"checkpoint {uri!r} is truncated: its safetensors header declares {declared} "
            f"bytes, the file has {size} ({declared - size} missing); {_FIX}"
        )
    if size > declared:
        raise ModelError(
            f"checkpoint {uri!r} has {size - declared} bytes of trailing data after the "
            f"{declared} bytes its safetensors header declares; {_FIX}"
        )
    return metadata


def _parse_safetensors_header(uri: str, header: bytes) -> tuple[int, dict[str, str]]:
    """The end of the data section a safetensors header declares, and its metadata."""
    try:
        entries = json.loads(header)
    except (ValueError, RecursionError) as e:  # a UnicodeDecodeError is a ValueError
        raise _not_safetensors(uri, "its header is not JSON") from e
    if not isinstance(entries, dict):
        raise _not_safetensors(uri, "its header is not a JSON object")
    metadata = entries.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _not_safetensors(uri, "its __metadata__ is not a map of strings to strings")
    end = 0
    for entry in entries.values():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _not_safetensors(uri, "a tensor in its header has no valid data_offsets")
        end = max(end, offsets[1])
    return end, metadata


def _not_safetensors(uri: str, why: str) -> ModelError:
    return ModelError(f"checkpoint {uri!r} is not a valid safetensors file: {why}; {_FIX}")


def _check_zip(uri: str, f: BinaryIO, size: int) -> None:
    """torch.save's zip archive: its end record (and zip64 end record, which torch always
    writes) must end the file, its central directory must end where they start, and every
    record must be stored uncompressed, as torch.save writes them, so no record unpacks to
    more than the file holds."""
    tail_at = max(0, size - _ZIP_TAIL)
    tail = _read_at(uri, f, tail_at, size - tail_at)
    end = _zip_end_record(uri, tail)
    _, disk, cd_disk, _, _, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", tail, end)
    directory_end = tail_at + end
    if (
        end >= 20 and tail[end - 20 : end - 16] == b"PK\x06\x07"
    ):  # zip64 locator, then zip64 end record
        (record_at,) = struct.unpack_from("<Q", tail, end - 12)
        if record_at + 56 > directory_end - 20:
            raise _corrupt_zip(uri, "its zip64 end record is not where its locator says")
        record = _read_at(uri, f, record_at, 56)
        record_size, disk, cd_disk, cd_size, cd_offset = struct.unpack_from(
            "<Q4xII16xQQ", record, 4
        )
        if record[:4] != b"PK\x06\x06" or record_at + 12 + record_size != directory_end - 20:
            raise _corrupt_zip(uri, "its zip64 end record is not where its locator says")
        directory_end = record_at
    if disk or cd_disk:
        raise _corrupt_zip(uri, "it claims to span several disks")
    if cd_offset + cd_size != directory_end:
        raise _corrupt_zip(
            uri,
            f"its central directory would end at byte {cd_offset + cd_size}, its end record "
            f"starts at byte {directory_end}",
        )
    if cd_size > _MAX_ZIP_DIRECTORY:
        raise ModelError(
            f"checkpoint {uri!r} has a zip central directory of {cd_size} bytes, more than "
            f"the {_MAX_ZIP_DIRECTORY} vitflow reads (about 600,000 tensors); save it as "
            ".safetensors"
        )
    try:
        with zipfile.ZipFile(f) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as e:
        raise _corrupt_zip(uri, _first_line(e)) from e
    if any(r.filename.endswith("/constants.pkl") or "/code/" in r.filename for r in records):
        # Loading one means running its code, which weights_only exists to prevent.
        raise ModelError(
            f"checkpoint {uri!r} is a TorchScript archive (as OpenAI's CLIP .pt files are), "
            "which vitflow does not load. Save its state dict once, on a machine you trust: "
            "python -c \"import torch; torch.save(torch.jit.load('ViT-B-32.pt', "
            "map_location='cpu').state_dict(), 'ViT-B-32.pth')\" and set model.checkpoint to "
            "the .pth (see docs/weights.md)"
        )
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size:
            raise ModelError(
                f"checkpoint {uri!r} holds compressed zip records, which torch.save never "
                "writes and which could unpack to any size; save it again with torch.save"
            )
        if r.header_offset + r.compress_size > cd_offset:
            raise _corrupt_zip(uri, "a record runs into its central directory")


def _zip_end_record(uri: str, tail: bytes) -> int:
    """Where in ``tail`` (the file's last bytes) the end record that ends the file starts."""
    trailing = None
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        if len(tail) - at >= _ZIP_END:
            (comment,) = struct.unpack_from("<H", tail, at + 20)
            ends = at + _ZIP_END + comment
            if ends == len(tail):
                return at
            if trailing is None and ends < len(tail):
                trailing = len(tail) - ends  # the record zip readers (and torch) would take
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if trailing is not None:
        raise ModelError(
            f"checkpoint {uri!r} has {trailing} bytes of trailing data after the end of its "
            f"zip archive (torch.save's format); {_FIX}"
        )
    raise ModelError(
        f"checkpoint {uri!r} is a zip archive (torch.save's format) without the end record "
        f"that closes one: it is truncated, or data was appended after it; {_FIX}"
    )


def _corrupt_zip(uri: str, why: str) -> ModelError:
    return ModelError(f"checkpoint {uri!r} is a corrupt zip archive: {why}; {_FIX}")


def _read_at(uri: str, f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise _changed(uri)
    return data


def _changed(uri: str) -> ModelError:
    return ModelError(
        f"checkpoint {uri!r} changed while vitflow read it; run again once nothing writes to it"
    )


def _sha256(uri: str, f: BinaryIO, size: int) -> str:
    h, buf = hashlib.sha256(), memoryview(bytearray(_CHUNK))
    f.seek(0)
    left = size
    while left:
        n = f.readinto(buf[: min(left, _CHUNK)])
        if not n:
            raise _changed(uri)
        h.update(buf[:n])
        left -= n
    return h.hexdigest()


def _same_file(fd: int, path: str) -> str:
    """A path that opens the very file behind ``fd``, not whatever ``path`` names by now."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path


def _load_safetensors_file(uri: str, path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        # safe_open maps the file; clone() copies each tensor out of the mapping, so the
        # state dict is one copy in memory and stays valid if the file is replaced later.
        with safe_open(path, framework="pt") as st:
            return {k: st.get_tensor(k).clone() for k in st.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own SafetensorError
        raise _not_safetensors(uri, _first_line(e)) from e


def _torch_load(uri: str, f: BinaryIO, size: int, kind: str) -> Any:
    f.seek(0)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"checkpoint {uri!r} cannot be loaded with torch.load(weights_only=True): "
            f"{_first_line(e)}. Only plain state dicts (tensors in dicts) are accepted; "
            "re-save it as one or as .safetensors"
        ) from e
    if kind == "pickle" and f.tell() != size:
        raise ModelError(
            f"checkpoint {uri!r} has {size - f.tell()} bytes of trailing data after the end "
            f"of its torch pickle; {_FIX}"
        )
    return state


def _first_line(e: Exception) -> str:
    """The first sentence of a loader's error, in printable ASCII and at most 200 characters,
    since it may quote a name from the file."""
    text, mark = str(e), "WeightsUnpickler error:"
    at = text.find(mark)  # torch's reason, after a page of advice
    if at >= 0:
        text = f"{mark} {text[at + len(mark) :].strip()}"
    lines = text.strip().splitlines()
    line = (lines[0] if lines else "").split(". ")[0].rstrip(".")
    line = "".join(c if " " <= c <= "~" else "?" for c in line)
    return (line[:197] + "...") if len(line) > 200 else (line or type(e).__name__)


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (vitflow's own, from :func:`backbone_bytes`)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def _unwrap(state: Any, uri: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(state, dict) and not _is_tensor_dict(state):
            nested = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, dict) or not _is_tensor_dict(state):
        raise ModelError(
            f"checkpoint {uri!r} does not hold a state dict of tensors "
            f"(top-level keys: {list(state)[:_MAX_KEYS_SHOWN] if isinstance(state, dict) else type(state).__name__})"
        )
    return dict(state)


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
