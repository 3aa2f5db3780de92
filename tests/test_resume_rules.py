"""What ``--resume`` accepts and refuses, and the job identity it compares, without Ray.

A resume finishes an interrupted run only when the vectors it would add are made exactly as
the ones already written: same weights (whatever the order of the safetensors header), same
features, same source settings, same precision. Anything else, including an output holding
data no vitflow run left behind, is refused before work starts.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from tests.conftest import TINY
from vitflow import embed
from vitflow.backbone import weights_fingerprint
from vitflow.config import load_config
from vitflow.embed import prepare_embed, run_embed
from vitflow.errors import ConfigError, OutputExistsError
from vitflow.synthetic import make_image_folder

NAME, KW = TINY["vit"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "images"
    make_image_folder(root, per_class=2, splits=None)
    return root


def job(images, out, **compute):
    return load_config(
        base={
            "source": {"uri": str(images)},
            "model": {"name": NAME, "kwargs": KW, "weights": "random"},
            "features": [{"name": "emb", "layers": 2, "pool": "mean"}],
            "output": {"uri": str(out), "rows_per_file": 4},
            "compute": compute,
        }
    )


def test_resume_of_an_output_holding_foreign_data_is_refused(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    with pytest.raises(OutputExistsError, match="holds data that no vitflow run left to resume"):
        prepare_embed(job(images, out), resume=True)
    assert (out / "notes.txt").read_text() == "someone else's file"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_of_an_empty_or_missing_output_is_a_fresh_run(images, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "missing"):
        assert prepare_embed(job(images, out), resume=True).listing is not None


class Interrupted(Exception):
    """Stands in for a kill after the run has recorded what it is doing."""


def test_resume_after_changing_precision_is_refused(images, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise Interrupted

    # The run goes as far as it does before Ray starts (its state on disk), then stops.
    monkeypatch.setattr(embed, "stream", killed)
    with pytest.raises(Interrupted):
        run_embed(job(images, out, precision="fp32"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="cannot resume"):
        prepare_embed(job(images, out, precision="bf16"), resume=True)
    # The same job resumes: it is the precision alone that was refused.
    assert prepare_embed(job(images, out, precision="fp32"), resume=True).listing is not None
    # A run state written by an older vitflow (another way of hashing the listing) cannot be
    # checked: it is refused with the fix, not blamed on changed files.
    state = out / embed.RUN_STATE
    old = json.loads(state.read_text())
    del old["fingerprint_version"]
    state.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="started by an older vitflow.*--overwrite"):
        prepare_embed(job(images, out, precision="fp32"), resume=True)


def test_precision_is_part_of_the_job_fingerprint(images, tmp_path):
    fp32 = prepare_embed(job(images, tmp_path / "a", precision="fp32"))
    bf16 = prepare_embed(job(images, tmp_path / "b", precision="bf16"))
    again = prepare_embed(job(images, tmp_path / "c", precision="fp32"))
    assert fp32.fingerprint == again.fingerprint != bf16.fingerprint


# --- weights_fingerprint: the weights, not the bytes of their header ---------------------------


def safetensors_bytes(tensors: dict[str, np.ndarray], order: list[str]) -> bytes:
    """A safetensors file written by hand: 8-byte header length, JSON header with the keys
    in ``order``, then the tensors' data in the order of ``tensors``."""
    header, offset, data = {}, 0, b""
    for name, t in tensors.items():
        raw = t.astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        data += raw
    ordered = {"__metadata__": {"format": "pt"}, **{k: header[k] for k in order}}
    text = json.dumps(ordered).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


def test_weights_fingerprint_ignores_the_header_key_order():
    tensors = {
        "blocks.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "blocks.0.bias": np.array([0.5, -1.0], dtype=np.float32),
        "norm.weight": np.ones(3, dtype=np.float32),
    }
    a = safetensors_bytes(tensors, ["blocks.0.weight", "blocks.0.bias", "norm.weight"])
    b = safetensors_bytes(tensors, ["norm.weight", "blocks.0.bias", "blocks.0.weight"])
    assert a != b  # different bytes ...
    la, lb = load_safetensors(a), load_safetensors(b)
    assert la.keys() == lb.keys() == tensors.keys()
    for k in tensors:  # ... of the same tensors
        np.testing.assert_array_equal(la[k], tensors[k])
        np.testing.assert_array_equal(lb[k], tensors[k])
    assert weights_fingerprint(a) == weights_fingerprint(b)


def test_weights_fingerprint_changes_with_any_weight():
    tensors = {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    base = weights_fingerprint(safetensors_bytes(tensors, ["w", "b"]))
    changed = {**tensors, "b": np.array([0.0, 1e-6], dtype=np.float32)}
    assert weights_fingerprint(safetensors_bytes(changed, ["w", "b"])) != base
    renamed = {"w2": tensors["w"], "b": tensors["b"]}
    assert weights_fingerprint(safetensors_bytes(renamed, ["w2", "b"])) != base
