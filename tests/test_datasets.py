"""The CIFAR-10 exporter reads the binary release exactly (no pickle), built here in its
documented record layout: one label byte, then the R, G and B planes of 32x32."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitflow.datasets import CIFAR10_CLASSES, export_cifar10, main
from vitflow.errors import ConfigError


def batch(rng, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, -1)  # channel-major, as the format says
    return np.concatenate([labels[:, None], planes], axis=1).tobytes(), labels, images


def archive(tmp_path, names, rng):
    path = tmp_path / "cifar-10-binary.tar.gz"
    made = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data, labels, images = batch(rng, 3)
            made[name] = (labels, images)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, made


def test_export_writes_every_image_in_its_class_folder(tmp_path):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    path, made = archive(tmp_path, names, np.random.default_rng(0))
    counts = export_cifar10(path, tmp_path / "out")
    assert counts == {"train": 15, "test": 3}
    labels, images = made["test_batch.bin"]
    for i, (label, img) in enumerate(zip(labels, images, strict=True)):
        png = tmp_path / "out" / "test" / CIFAR10_CLASSES[label] / f"{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(png)), img)
    assert sum(1 for _ in (tmp_path / "out" / "train").rglob("*.png")) == 15


def test_an_incomplete_or_foreign_archive_is_refused(tmp_path):
    path, _ = archive(tmp_path, ["data_batch_1.bin"], np.random.default_rng(1))
    with pytest.raises(ConfigError, match="lacks data_batch_2.bin"):
        export_cifar10(path, tmp_path / "out")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("data_batch_1.bin")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0123456789"))
    with pytest.raises(SystemExit, match="not a whole number of 3073-byte"):
        main(["cifar10", str(bad), str(tmp_path / "out2")])
