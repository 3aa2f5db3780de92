"""Job kinds: what a job file runs as, named at its top (``kind: embed | reindex | train``).

Each kind is run by the command of the same name; ``vitflow submit`` picks the command from
the file, and each command refuses a file of another kind in one sentence that names the
right command. Files written before ``kind:`` existed keep working: the command given runs
them (``submit`` without ``--command`` keeps its old rule: a file with ``method:`` trains,
any other embeds), with a note on stderr, once per process, asking to add ``kind:``.

    >>> job_kind({"kind": "reindex", "source": {"uri": "s3://b/imgs"}})
    'reindex'

Nothing here imports pydantic, torch or Ray; :func:`schema_for` imports the config class.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from vitflow.errors import ConfigError
from vitflow.jobfile import echo

#: Every job kind, each run by ``vitflow KIND``.
JOB_KINDS = ("embed", "reindex", "train", "matrix")

_noted = False  # the missing-kind note is said once per process, not per file read


def job_kind(data: Mapping[str, Any], command: str | None = None, *, path: object = None) -> str:
    """What a job file's mapping runs as.

    Args:
        data: the job file's mapping (``kind:`` may be absent in files written before it).
        command: the command about to run it (``embed``, ``reindex``, ``train``), or None
            when the file alone decides (``vitflow submit`` without ``--command``).
        path: the file, named in messages.

    Raises:
        ConfigError: ``kind:`` is not a job kind, or names another command than ``command``.
    """
    kind = data.get("kind")
    if kind is None:  # a file from before kind: existed (see note_missing_kind)
        return command or ("train" if "method" in data else "embed")
    if kind not in JOB_KINDS:
        raise ConfigError(
            f"kind: {echo(kind)} is not a job kind; use one of {', '.join(JOB_KINDS)}"
        )
    if command is not None:
        require_kind(kind, command, path)
    return kind


def require_kind(kind: str, command: str, path: object = None) -> None:
    """Refuse to run a job of ``kind`` with ``vitflow command``, naming the right command."""
    if kind != command:
        where = path if path is not None else "the job"
        raise ConfigError(
            f"{where} is {a_kind(kind)} job (kind: {kind}), which `vitflow {command}` does not "
            f"run; run it with `vitflow {kind} {path if path is not None else 'JOB.yaml'}`"
        )


def a_kind(kind: str) -> str:
    """``an embed``, ``a reindex``: the kind with its article, for messages."""
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def note_missing_kind(path: object, kind: str) -> None:
    """Tell the user, once per process, on stderr, that a job file without ``kind:`` is
    deprecated. Callers say it once the job is valid, so a job error stays one sentence."""
    global _noted
    if _noted:
        return
    _noted = True
    print(
        f"note: {path} has no `kind:` line, so it runs as {a_kind(kind)} job; add `kind: {kind}` "
        "at its top (job files without one are deprecated)",
        file=sys.stderr,
    )


def schema_for(kind: str) -> type:
    """The config class of a job kind: ``EmbedConfig`` (embed, reindex), ``TrainConfig`` or
    ``MatrixConfig``."""
    if kind == "train":
        from vitflow.training.config import TrainConfig

        return TrainConfig
    if kind == "matrix":
        from vitflow.matrix import MatrixConfig

        return MatrixConfig
    from vitflow.config import EmbedConfig

    return EmbedConfig
