"""The example job specs ship inside the package (vitflow/examples/*.yaml, for `vitflow init`)
and jobs/*.yaml links to each of them. Every one opens with a comment saying what it is for,
names its kind, and is a valid job config (unknown keys or bad values would be refused when a
user runs it); the commented embed job that `vitflow init` writes by default documents every
key. What a file runs as is asked of the code that decides (`vitflow submit`'s planning and
the CLI commands), never re-derived here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from tests.conftest import TINY
from vitflow import examples, jobkind
from vitflow.cli import app
from vitflow.config import EmbedConfig, load_config, read_yaml
from vitflow.errors import ConfigError, OutputExistsError
from vitflow.submit import job_for_submission

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "vitflow" / "examples"
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
EXAMPLES = sorted(PACKAGED.glob("*.yaml"))
# What each shipped job is meant to run as: a new example must be added here on purpose.
RUNS_AS = {
    "demo": "embed",
    "embed": "embed",
    "flowers-dinov2": "embed",
    "matrix-demo": "matrix",
    "reindex-nightly": "reindex",
    "simclr-digits": "train",
    "simo2-cifar": "train",
    "simo2-digits": "train",
}


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
def test_job_spec_is_valid_documented_and_runs_as_its_kind(path, capsys):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should open with a comment saying what it is for"
    assert examples.example_text(path.stem) == text
    assert yaml.safe_load(text)["kind"] == RUNS_AS[path.stem], "every example names its kind"
    # What `vitflow submit` would run (it validates the job against that command's config).
    command, job = job_for_submission(path)
    assert command == RUNS_AS[path.stem]
    assert job["kind"] == command
    assert "note:" not in capsys.readouterr().err  # a file with kind: is not deprecated


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_command_refuses_jobs_of_another_kind_naming_the_right_one(path):
    kind = RUNS_AS[path.stem]
    for command in ("embed", "reindex", "train"):
        if command == kind:
            continue
        r = _cli(command, path)
        assert r.exit_code == 1, r.output
        err = r.stderr.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert f"(kind: {kind}), which `vitflow {command}` does not run" in err
        assert f"run it with `vitflow {kind} {path}`" in err


def test_submit_refuses_a_command_that_contradicts_the_kind():
    with pytest.raises(ConfigError, match="leave out --command"):
        job_for_submission(PACKAGED / "reindex-nightly.yaml", command="embed")
    with pytest.raises(ConfigError, match="contradicts"):
        job_for_submission(PACKAGED / "demo.yaml", overrides=["kind=reindex"])
    with pytest.raises(ConfigError, match="--resume applies to embed and matrix jobs"):
        job_for_submission(PACKAGED / "reindex-nightly.yaml", extra_args=["--resume"])
    # A matrix job resumes too: submit passes --resume on.
    command, _ = job_for_submission(PACKAGED / "matrix-demo.yaml", extra_args=["--resume"])
    assert command == "matrix"


def test_an_unknown_kind_is_refused_everywhere(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((PACKAGED / "demo.yaml").read_text().replace("kind: embed", "kind: eval"))
    with pytest.raises(ConfigError, match="kind: 'eval' is not a job kind; use one of embed"):
        job_for_submission(job)
    r = _cli("embed", job)
    assert r.exit_code == 1 and "is not a job kind" in r.stderr


# --- files from before kind: existed --------------------------------------------------------


def _without_kind(tmp_path, example: str, name: str = "old.yaml"):
    text = (PACKAGED / f"{example}.yaml").read_text()
    assert f"\nkind: {RUNS_AS[example]}\n" in text
    path = tmp_path / name
    path.write_text(text.replace(f"\nkind: {RUNS_AS[example]}\n", "\n"))
    assert "kind" not in read_yaml(path)
    return path


@pytest.fixture
def fresh_note(monkeypatch):
    """The deprecation note is said once per process: start each test as a new process."""
    monkeypatch.setattr(jobkind, "_noted", False)


def test_old_files_keep_their_old_meaning_with_one_note(tmp_path, capsys, fresh_note):
    old_train = _without_kind(tmp_path, "simo2-digits", "train.yaml")
    old_embed = _without_kind(tmp_path, "demo", "embed.yaml")
    old_reindex = _without_kind(tmp_path, "reindex-nightly", "reindex.yaml")
    # submit's rule before kind: a file with method: trains, any other embeds ...
    assert job_for_submission(old_train) == ("train", {**read_yaml(old_train), "kind": "train"})
    first = capsys.readouterr().err
    assert first.count("note:") == 1
    assert f"{old_train} has no `kind:`" in first and "add `kind: train`" in first
    assert job_for_submission(old_embed)[0] == "embed"
    # ... and --command still says what a file without kind: is.
    assert job_for_submission(old_reindex, command="reindex")[0] == "reindex"
    assert job_for_submission(old_reindex)[0] == "embed"  # the old guess, which kind: ends
    assert capsys.readouterr().err == "", "the note is said once per process"


def test_cli_runs_an_old_file_as_the_command_given_with_a_note(tmp_path, fresh_note):
    name, kw = TINY["vit"]
    old = tmp_path / "old.yaml"
    old.write_text(
        yaml.safe_dump(
            {
                "source": {"uri": str(tmp_path / "missing")},
                "model": {"name": name, "kwargs": kw, "weights": "random"},
                "output": {"uri": str(tmp_path / "out")},
            }
        )
    )
    r = _cli("embed", old, "--dry-run")
    assert r.exit_code == 1, r.output
    note, error = r.stderr.strip().splitlines()
    assert note.startswith(f"note: {old} has no `kind:`") and "add `kind: embed`" in note
    assert error.startswith("error: source") and "does not exist" in error
    # An invalid old file gets its error alone: a job error stays one sentence.
    old.write_text(old.read_text() + "bogus: 1\n")
    r = _cli("reindex", old)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: invalid job config: unknown key 'bogus'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_set_kind_cannot_turn_a_job_into_another():
    r = _cli("reindex", PACKAGED / "reindex-nightly.yaml", "--set", "kind=embed")
    assert r.exit_code == 1
    assert "--set kind=embed asks `vitflow reindex` to run an embed job" in r.stderr


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
    assert cfg.kind == "embed"
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
