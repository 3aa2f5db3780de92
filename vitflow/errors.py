"""Exceptions that the CLI turns into one readable sentence and exit code 1."""

from __future__ import annotations


class VitflowError(Exception):
    """Base class: a problem with the user's job (config, model, data), not a bug.

    The message is a full sentence that names the fix; the CLI prints it as is.
    """


class ConfigError(VitflowError):
    """The job config is invalid (unknown key, bad value, inconsistent fields)."""


class ModelError(VitflowError):
    """The model cannot be built or loaded, or the feature spec does not fit it."""


class OutputExistsError(VitflowError):
    """The output location already holds data and ``--overwrite`` was not given."""
