"""Public datasets as the image folders vitflow reads (``SPLIT/CLASS/NNNNN.png``).

    python -m vitflow.datasets cifar10 cifar-10-binary.tar.gz data/cifar10

CIFAR-10 is read from its *binary* release (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz,
162 MB): fixed-size records of one label byte and 3,072 pixel bytes, parsed with numpy. The
"python version" of the archive is pickled, and unpickling a downloaded file can run code, so
it is not read.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np

from vitflow.errors import ConfigError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_RECORD = 1 + 32 * 32 * 3  # label byte, then R, G and B planes of 32x32
_BATCHES = {f"data_batch_{i}.bin": "train" for i in range(1, 6)} | {"test_batch.bin": "test"}


def cifar10_records(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (N,), images (N, 32, 32, 3) uint8)`` of one CIFAR-10 binary batch file."""
    if len(data) % _RECORD:
        raise ConfigError(
            f"{name} is {len(data)} bytes, not a whole number of {_RECORD}-byte CIFAR-10 "
            "records; is it the binary release (cifar-10-binary.tar.gz)?"
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = rec[:, 0]
    if labels.max(initial=0) >= len(CIFAR10_CLASSES):
        raise ConfigError(f"{name} has label {labels.max()}; CIFAR-10 labels are 0..9")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return labels, np.ascontiguousarray(images)


def export_cifar10(archive: str | Path, out: str | Path) -> dict[str, int]:
    """Write CIFAR-10 from its binary tarball as ``out/{train,test}/CLASS/NNNNN.png``.

    Returns the number of images written per split. Existing files are not overwritten: an
    existing ``out`` that is not empty is refused.
    """
    from PIL import Image

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{str(out)!r} is not empty; export into a new folder")
    counts = {"train": 0, "test": 0}
    found = set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = Path(member.name).name
            split = _BATCHES.get(name)
            if split is None or not member.isfile():
                continue
            found.add(name)
            data = tar.extractfile(member).read()
            labels, images = cifar10_records(data, name)
            for label, img in zip(labels, images, strict=True):
                folder = out / split / CIFAR10_CLASSES[label]
                folder.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                (folder / f"{counts[split]:05d}.png").write_bytes(buf.getvalue())
                counts[split] += 1
    missing = sorted(set(_BATCHES) - found)
    if missing:
        raise ConfigError(
            f"{archive} lacks {', '.join(missing)}; download cifar-10-binary.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html"
        )
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    c = sub.add_parser("cifar10", help="CIFAR-10 binary tarball -> train/test class folders")
    c.add_argument("archive")
    c.add_argument("out")
    args = p.parse_args(argv)
    try:
        counts = export_cifar10(args.archive, args.out)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {counts['train']} train and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    main()
