"""The example job specs ship inside the package (vitflow/examples/*.yaml, for `vitflow init`)
and jobs/*.yaml links to each of them. Every one opens with a comment saying what it is for
and is a valid job config (unknown keys or bad values would be refused when a user runs it);
the commented embed job that `vitflow init` writes by default documents every key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from vitflow import examples
from vitflow.config import EmbedConfig, load_config
from vitflow.errors import ConfigError, OutputExistsError
from vitflow.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "vitflow" / "examples"
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
EXAMPLES = sorted(PACKAGED.glob("*.yaml"))


def test_there_are_job_specs():
    assert len(EXAMPLES) >= 6
    assert examples.list_examples() == [p.stem for p in EXAMPLES]
    assert examples.DEFAULT_EXAMPLE in examples.list_examples()


def test_every_example_has_a_relative_link_in_jobs():
    # Docs and tests say jobs/demo.yaml: each jobs/ entry is a relative link to the packaged
    # file (one copy of the text), and every packaged example has one.
    assert [p.name for p in JOBS] == [p.name for p in EXAMPLES]
    for link in JOBS:
        assert link.is_symlink(), f"jobs/{link.name} should be a link to vitflow/examples/"
        target = os.readlink(link)
        assert target == f"../vitflow/examples/{link.name}", target
        assert link.resolve() == (PACKAGED / link.name).resolve()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_job_spec_is_valid_and_documented(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should open with a comment saying what it is for"
    schema = TrainConfig if "method" in yaml.safe_load(text) else EmbedConfig
    load_config(path, schema=schema)
    assert examples.example_text(path.stem) == text


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every field of ``model``'s sections (features items included)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        sub = getattr(ann, "__args__", (ann,))[0] if name == "features" else ann
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _fields(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_init_example_documents_every_embed_key():
    """Each key of each section appears in the template with a comment (set, or commented out
    where the user must choose: the weights), so a newcomer sees every knob in one file."""
    text = examples.example_text()
    cfg = load_config(PACKAGED / f"{examples.DEFAULT_EXAMPLE}.yaml", schema=EmbedConfig)
    assert cfg.source.uri == "./images"
    assert cfg.model.weights_source is None, "the user chooses where the weights come from"
    lines = text.splitlines() + [""]
    missing = []
    for dotted in _fields(EmbedConfig):
        key = dotted.rsplit(".", 1)[-1]
        pat = re.compile(rf"^\s*(#\s*)?(- )?{key}:(.*)$")
        # the key, set or commented out, with its explanation on the line or the next one
        if not any(
            (m := pat.match(line)) and ("#" in m.group(3) or nxt.lstrip().startswith("#"))
            for line, nxt in zip(lines, lines[1:], strict=False)
        ):
            missing.append(dotted)
    assert not missing, f"keys the init example does not show with a comment: {missing}"
    for way in ("weights: hub", "weights: random", "checkpoint:"):
        assert f"# {way}" in text


def test_write_example_never_overwrites(tmp_path):
    dest = examples.write_example(path=tmp_path / "job.yaml")
    assert dest == tmp_path / "job.yaml"
    assert dest.read_text() == examples.example_text(examples.DEFAULT_EXAMPLE)
    dest.write_text("mine\n")
    with pytest.raises(OutputExistsError, match="already exists"):
        examples.write_example(path=dest)
    with pytest.raises(OutputExistsError, match="already exists"):
        examples.write_example("demo", dest)
    assert dest.read_text() == "mine\n"
    dangling = tmp_path / "link.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    with pytest.raises(OutputExistsError):
        examples.write_example(path=dangling)
    assert not (tmp_path / "nowhere.yaml").exists()
    with pytest.raises(OutputExistsError, match="is a folder"):
        examples.write_example(path=tmp_path)


def test_write_example_by_name_and_errors(tmp_path):
    assert (
        examples.write_example("demo.yaml", tmp_path / "d.yaml").read_text()
        == (PACKAGED / "demo.yaml").read_text()
    )
    with pytest.raises(ConfigError, match="no example job named 'nope'.*demo"):
        examples.write_example("nope", tmp_path / "n.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        examples.write_example(path=tmp_path / "missing" / "job.yaml")
    assert not (tmp_path / "n.yaml").exists()
