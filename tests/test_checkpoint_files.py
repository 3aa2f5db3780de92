"""Hostile checkpoint files: what is not a regular file is refused before a byte is read, and
a file is read only when it is exactly as long as its own header declares (safetensors'
header, the end record of torch's zip archive), so trailing data, truncation and absurd sizes
are refused with one sentence, without reading them. Valid files still load, with the sha256
of their bytes, from a local path, through a link, and from object storage."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFile
from safetensors.torch import save_file

from vitflow.checkpoints import read_checkpoint
from vitflow.errors import ModelError


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3), "b": torch.arange(5)}


def _write(path: Path, state: dict[str, torch.Tensor], legacy: bool = False) -> bytes:
    if path.name.endswith(".safetensors"):
        save_file(state, path, metadata={"vitflow.architecture": "tiny"})
    else:
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _refused(path, match: str, **kw) -> str:
    with pytest.raises(ModelError, match=match) as e:
        read_checkpoint(str(path), **kw)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg
    return msg


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in b)


# Not regular files: refused from stat alone.


@pytest.mark.timeout(10)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_refused_before_reading():
    t = time.monotonic()
    msg = _refused("/dev/zero", r"^checkpoint '/dev/zero' is a character device, not a regular")
    assert "set model.checkpoint (--checkpoint) to a .safetensors or .pth" in msg
    assert time.monotonic() - t < 1


@contextlib.contextmanager
def _writer_for(fifo: Path):
    """Should the code under test open the FIFO for reading after all, a writer turns up,
    writes a few bytes and closes, so the test fails on its assertion instead of hanging."""
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            try:  # fails (ENXIO) while nobody has the FIFO open for reading
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
                continue
            with contextlib.suppress(OSError):
                os.write(fd, b"\0" * 16)
            os.close(fd)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_fifo_is_refused_without_opening_it(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with _writer_for(fifo):
        _refused(fifo, r"is a named pipe \(FIFO\), not a regular file")


@pytest.mark.timeout(10)
def test_directory_and_socket_are_refused(tmp_path):
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    _refused(folder, "is a directory, not a regular file")
    path = tmp_path / "w.pth"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        _refused(path, "is a socket, not a regular file")


def test_link_to_a_regular_file_loads(tmp_path):
    state = _state()
    raw = _write(tmp_path / "real.safetensors", state)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    ckpt = read_checkpoint(str(tmp_path / "link.safetensors"))
    _same_state(ckpt.state_dict, state)
    assert ckpt.sha256 == hashlib.sha256(raw).hexdigest()
    assert ckpt.metadata == {"vitflow.architecture": "tiny"}


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "legacy.pth"])
def test_valid_files_load_with_the_sha256_of_their_bytes(tmp_path, name):
    state = _state()
    raw = _write(tmp_path / name, state, legacy=name.startswith("legacy"))
    ckpt = read_checkpoint(str(tmp_path / name))
    _same_state(ckpt.state_dict, state)
    assert ckpt.sha256 == hashlib.sha256(raw).hexdigest()


# safetensors: the header declares the file's exact size.


def test_safetensors_with_trailing_data_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    raw = _write(path, _state())
    path.write_bytes(raw + b"garbage")
    _refused(
        path,
        rf"has 7 bytes of trailing data after the {len(raw)} bytes its safetensors header "
        r"declares; copy or save it again$",
    )


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    raw = _write(path, _state())
    path.write_bytes(raw[:-5])
    _refused(
        path,
        rf"is truncated: its safetensors header declares {len(raw)} bytes, the file has "
        rf"{len(raw) - 5} \(5 missing\)",
    )
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[: 8 + n // 2])  # cut inside the header
    _refused(path, rf"declare a {n}-byte header, but the whole file is {8 + n // 2} bytes")


@pytest.mark.timeout(10)
def test_absurd_safetensors_header_length_is_refused_unread(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{" + b" " * 1000)
    _refused(
        path,
        r"not a valid safetensors file: its first 8 bytes declare a 4611686018427387904-byte "
        r"header, more than the 100000000 safetensors allows",
    )


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b'["w"]', "its header is not a JSON object"),
        (b'{"w": {"dtype": "F32", "shape": [1]}}', "a tensor in its header has no valid"),
        (b'{"w": {"data_offsets": [8, 4]}}', "a tensor in its header has no valid"),
        (b'{"__metadata__": {"a": 1}}', "its __metadata__ is not a map of strings"),
        (b"\xff\xfe{}", "its header is not JSON"),
    ],
)
def test_safetensors_header_that_declares_no_size_is_refused(tmp_path, header, why):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    _refused(path, f"is not a valid safetensors file: {why}")


# torch's zip format: the end record must end the file and say where the directory is.


def test_zip_with_bytes_appended_is_refused_though_torch_would_load_it(tmp_path):
    path = tmp_path / "w.pth"
    raw = _write(path, _state())
    torch.load(io.BytesIO(raw + b"x" * 10), weights_only=True)  # miniz tolerates a little
    path.write_bytes(raw + b"x" * 10)
    _refused(path, r"has 10 bytes of trailing data after the end of its zip archive")
    path.write_bytes(raw + b"x" * 100_000)  # past where any zip reader looks for the end
    _refused(path, "without the end record that closes one: it is truncated, or data was")


@pytest.mark.parametrize("keep", [0.5, -1])
def test_truncated_zip_is_refused(tmp_path, keep):
    path = tmp_path / "w.pth"
    raw = _write(path, _state())
    path.write_bytes(raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep])
    _refused(path, "zip archive .* without the end record .*: it is truncated")


@pytest.mark.parametrize(
    ("zip64", "where"),
    [
        (True, "its zip64 end record is not where its locator says"),
        (False, r"its central directory would end at byte \d+, its end record starts at"),
    ],
)
def test_second_archive_appended_is_refused(tmp_path, zip64, where):
    """Two archives back to back: the last end record ends the file, but what it points at
    is counted from the start of the second archive, not of the file."""
    path = tmp_path / "w.pth"
    raw = _write(path, _state())
    raw = raw if zip64 else _rezip(raw, zipfile.ZIP_STORED)
    path.write_bytes(raw + raw)
    _refused(path, f"is a corrupt zip archive: {where}")


def _rezip(raw: bytes, compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", compression) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    return out.getvalue()


def test_zip_without_zip64_records_loads(tmp_path):
    """Python's zipfile writes no zip64 end record where torch.save always does; torch loads
    both, and so does vitflow."""
    state = _state()
    raw = _rezip(_write(tmp_path / "w.pth", state), zipfile.ZIP_STORED)
    assert b"PK\x06\x06" not in raw
    (tmp_path / "w.pth").write_bytes(raw)
    _same_state(read_checkpoint(str(tmp_path / "w.pth")).state_dict, state)


def test_compressed_zip_records_are_refused(tmp_path):
    """A deflated record can unpack to any size its directory claims (a zip bomb); torch.save
    never compresses, so such a file is refused before torch allocates anything."""
    path = tmp_path / "w.pth"
    path.write_bytes(_rezip(_write(path, _state()), zipfile.ZIP_DEFLATED))
    _refused(path, "holds compressed zip records, which torch.save never writes")


# Legacy pickles (torch.save before 1.6): torch checks each storage's length; vitflow checks
# that the file ends where the last storage does.


def test_legacy_pickle_with_trailing_data_or_truncated_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    raw = _write(path, _state(), legacy=True)
    path.write_bytes(raw + b"trailing!")
    _refused(path, "has 9 bytes of trailing data after the end of its torch pickle")
    path.write_bytes(raw[:-4])
    _refused(path, r"cannot be loaded with torch.load\(weights_only=True\)")


@pytest.mark.timeout(10)
def test_legacy_pickle_declaring_a_huge_storage_is_refused(tmp_path):
    """The pickle says 2**60 elements where the file holds 7: torch refuses the allocation
    or the length check, and nothing near that size is ever read."""
    path = tmp_path / "w.pth"
    raw = _write(path, {"a": torch.arange(7, dtype=torch.float32)}, legacy=True)
    small = b"cpuq\x06K\x07N"  # location, then numel as BININT1 7, in the storage's id
    assert raw.count(small) == 1
    path.write_bytes(raw.replace(small, b"cpuq\x06\x8a\x08" + struct.pack("<q", 2**60) + b"N"))
    _refused(path, r"cannot be loaded with torch.load\(weights_only=True\)")


def test_unknown_format_echoes_only_its_magic(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"<!DOCTYPE html><title>Sign in</title>secret-token-1234")
    msg = _refused(path, r"is not a torch checkpoint: it starts with b'<!DO', neither a zip")
    assert "secret" not in msg and "DOCTYPE" not in msg
    raw = _write(tmp_path / "w.safetensors", _state())
    path.write_bytes(raw)
    _refused(path, "if it is a safetensors file, name it .safetensors$")
    path.write_bytes(b"JUNK" + _write(tmp_path / "z.pth", _state()))  # torch refuses a prefix
    _refused(path, "it starts with b'JUNK'")


def test_names_quoted_from_a_refused_pickle_are_printable(tmp_path, monkeypatch):
    """torch's reason quotes the class a pickle names; a terminal escape in it is not passed
    on to the user's terminal."""
    evil = type("Evil\x1b[2J", (), {"__module__": __name__})
    monkeypatch.setattr(sys.modules[__name__], evil.__name__, evil, raising=False)
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1), "x": evil()}, path)
    msg = _refused(path, r"WeightsUnpickler error: Unsupported global: GLOBAL .*Evil\?\[2J")
    assert "\x1b" not in msg


def test_file_changing_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    _write(path, _state())
    real_load = torch.load

    def load_while_written(f, **kw):
        with open(path, "ab") as w:
            w.write(b"more")
        return real_load(f, **kw)

    monkeypatch.setattr("vitflow.checkpoints.torch.load", load_while_written)
    _refused(path, "changed while vitflow read it; run again once nothing writes to it")


# Object storage: the size comes from fs.info, the header from a ranged read.


@pytest.fixture
def memory_fs(monkeypatch):
    """fsspec's memory filesystem, counting the bytes read from its files."""
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-{uuid.uuid4().hex[:8]}"
    read = {"bytes": 0}
    real_read = MemoryFile.read

    def counted(self, n=-1):
        data = real_read(self, n)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(MemoryFile, "read", counted)
    yield fs, root, read
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_object_storage_checks_before_reading_the_object(tmp_path, memory_fs, name):
    fs, root, read = memory_fs
    state = _state()
    raw = _write(tmp_path / name, state)
    fs.pipe(f"{root}/{name}", raw)
    ckpt = read_checkpoint(f"memory://{root}/{name}")
    _same_state(ckpt.state_dict, state)
    assert ckpt.sha256 == hashlib.sha256(raw).hexdigest()
    # 16 MiB of trailing data: refused from the header or the zip's last 64 KiB alone.
    fs.pipe(f"{root}/{name}", raw + b"\0" * (16 << 20))
    read["bytes"] = 0
    with pytest.raises(ModelError, match="trailing data|without the end record"):
        read_checkpoint(f"memory://{root}/{name}")
    assert read["bytes"] <= 70_000
    fs.pipe(f"{root}/dir/{name}", raw)
    with pytest.raises(ModelError, match=r"is a directory, not a file; set model.checkpoint"):
        read_checkpoint(f"memory://{root}/dir")


def test_s3_checkpoint_loads_and_trailing_data_is_refused(tmp_path, s3_bucket):
    fs, bucket, endpoint = s3_bucket
    opts = {"endpoint_url": endpoint}
    state = _state()
    raw = _write(tmp_path / "w.safetensors", state)
    fs.pipe(f"{bucket}/w.safetensors", raw)
    ckpt = read_checkpoint(f"s3://{bucket}/w.safetensors", opts)
    _same_state(ckpt.state_dict, state)
    assert ckpt.sha256 == hashlib.sha256(raw).hexdigest()
    fs.pipe(f"{bucket}/bad.safetensors", raw + b"x" * 3)
    with pytest.raises(ModelError, match="has 3 bytes of trailing data"):
        read_checkpoint(f"s3://{bucket}/bad.safetensors", opts)


# The CLI: one sentence, exit code 1.


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_refuses_dev_zero_in_one_line(tmp_path):
    from vitflow.synthetic import make_image_folder

    make_image_folder(tmp_path / "images", per_class=1, splits=("train",))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitflow.cli",
            "embed",
            "--input",
            str(tmp_path / "images"),
            "--output",
            str(tmp_path / "never"),
            "--model",
            "resnet18",
            "--checkpoint",
            "/dev/zero",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        timeout=150,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: checkpoint '/dev/zero' is a character device")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()
