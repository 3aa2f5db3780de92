"""Every example job spec in jobs/ opens with a comment saying what it is for and is a valid
job config (unknown keys or bad values would be refused when a user runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitflow.config import EmbedConfig, load_config
from vitflow.training.config import TrainConfig

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))


def test_there_are_job_specs():
    assert len(JOBS) >= 5


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_spec_is_valid_and_documented(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should open with a comment saying what it is for"
    schema = TrainConfig if "method" in yaml.safe_load(text) else EmbedConfig
    load_config(path, schema=schema)
