"""Sending vitflow jobs to a running Ray cluster through the Ray Jobs API.

The command that runs a job comes from its ``kind:`` (see :mod:`vitflow.jobkind`). The job
config travels in the runtime environment's working directory (with the ``--set``
overrides applied and validated here first, so a typo fails on your laptop, not on the
cluster); the vitflow package itself travels as a ``py_modules`` entry unless the cluster
image already has it. Token authentication: the token is read the way Ray reads it
(``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``)
and sent as a bearer header; it is never printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vitflow.errors import ConfigError, VitflowError
from vitflow.jobkind import JOB_KINDS, a_kind, job_kind, note_missing_kind, schema_for

JOB_FILE = "vitflow-job.yaml"
AGENT_WAIT_S = 180


def read_token() -> str | None:
    """The cluster token from the environment or token file, as Ray itself looks it up."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def client(address: str):
    """A ``JobSubmissionClient`` that authenticates with the cluster token, if there is one."""
    from ray.job_submission import JobSubmissionClient

    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        raise VitflowError(_explain(e, address, token)) from None


def _explain(e: Exception, address: str, token: str | None) -> str:
    text = str(e)
    if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "uthentication")):
        how = (
            "set RAY_AUTH_TOKEN to the cluster's token, or put it in ~/.ray/auth_token "
            "(or a file named by RAY_AUTH_TOKEN_PATH)"
        )
        if token:
            return f"the Ray cluster at {address} rejected the token (403); {how}"
        return f"the Ray cluster at {address} requires a token and none was found; {how}"
    return f"cannot reach the Ray Jobs API at {address}: {text.splitlines()[0] if text else type(e).__name__}"


def job_for_submission(
    config: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    command: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> tuple[str, dict[str, Any]]:
    """What :func:`submit` sends: the command that runs the job (from its ``kind:``) and the
    job's mapping with the overrides applied, validated here. Nothing is contacted.

    Example:
        >>> command, job = job_for_submission("jobs/reindex-nightly.yaml")  # doctest: +SKIP
        >>> command, job["kind"]  # doctest: +SKIP
        ('reindex', 'reindex')
    """
    from vitflow.config import apply_override, load_config, read_yaml

    if command is not None and command not in JOB_KINDS:
        raise ConfigError(f"unknown command {command!r}; use one of {', '.join(JOB_KINDS)}")
    data = read_yaml(config)
    # The file's kind decides; --command only stands in for it in a file without one.
    kind = job_kind(data, None if "kind" in data else command, path=config)
    if command not in (None, kind):
        raise ConfigError(
            f"{config} is {a_kind(kind)} job (kind: {kind}), but --command is {command}; leave "
            "out --command, submit runs the job's own kind"
        )
    command = kind
    legacy = "kind" not in data
    # The cluster reads the kind from the file it gets, so it never guesses again.
    data["kind"] = command
    schema = schema_for(command)
    for o in overrides:
        apply_override(data, o, schema)
    for flag, fits in (("--resume", ("embed", "matrix")), ("--rebuild", ("reindex",))):
        if flag in extra_args and command not in fits:
            raise ConfigError(
                f"{flag} applies to {' and '.join(fits)} jobs, but this is a {command} job"
            )
    cfg = load_config(base=data, schema=schema)
    if cfg.kind != command:  # a --set kind=... that contradicts the file
        raise ConfigError(
            f"--set kind={cfg.kind} contradicts {config}, which is {a_kind(command)} job; "
            "change kind: in the file instead"
        )
    if legacy:
        note_missing_kind(config, command)
    return command, data


def submit(
    config: str | Path,
    *,
    address: str,
    overrides: list[str] | tuple[str, ...] = (),
    command: str | None = None,
    ship_package: bool = True,
    extra_args: list[str] | tuple[str, ...] = (),
) -> str:
    """Validate the job locally, then submit it; returns the Ray job id.

    The command comes from the job's ``kind:`` (see :mod:`vitflow.jobkind`)."""
    command, data = job_for_submission(
        config, overrides=overrides, command=command, extra_args=extra_args
    )
    workdir = tempfile.mkdtemp(prefix="vitflow-submit-")
    # JSON is YAML 1.2 that quotes every string: the cluster reads back exactly these values
    # (PyYAML's YAML 1.1 dump would leave strings like 1e3 unquoted, read there as numbers).
    Path(workdir, JOB_FILE).write_text(json.dumps(data, indent=2))
    runtime_env: dict[str, Any] = {"working_dir": workdir}
    if ship_package:
        import vitflow

        runtime_env["py_modules"] = [str(Path(vitflow.__file__).parent)]
    entrypoint = " ".join(["python", "-m", "vitflow.cli", command, JOB_FILE, *extra_args])
    c = client(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                metadata={"vitflow_command": command},
            )
        except Exception as e:
            # A cluster that just started answers 500 until its job agent is up.
            if "No available agent" in str(e) and time.time() < deadline:
                time.sleep(2)
                continue
            raise VitflowError(_explain(e, address, read_token())) from None


def follow(address: str, job_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status name."""
    import asyncio

    c = client(address)

    async def _tail():
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception:  # log streaming is best effort; the status below is authoritative
        pass
    while True:
        status = _call(address, f"status of {job_id}", c.get_job_status, job_id)
        if status.is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(1)


def _call(address: str, what: str, fn, *args):
    """Run a Jobs API call; any failure becomes one readable VitflowError."""
    try:
        return fn(*args)
    except VitflowError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitflowError(f"{what} failed at {address}: {text}") from None


def list_jobs(address: str) -> list[dict[str, Any]]:
    rows = []
    for j in _call(address, "listing jobs", lambda: client(address).list_jobs()):
        rows.append(
            {
                "job_id": j.submission_id or j.job_id,
                "status": str(j.status.value if hasattr(j.status, "value") else j.status),
                "entrypoint": j.entrypoint,
            }
        )
    return rows


def job_status(address: str, job_id: str) -> str:
    s = _call(address, f"status of {job_id}", lambda: client(address).get_job_status(job_id))
    return str(s.value if hasattr(s, "value") else s)


def job_logs(address: str, job_id: str) -> str:
    return _call(address, f"logs of {job_id}", lambda: client(address).get_job_logs(job_id))


def stop_job(address: str, job_id: str) -> bool:
    return _call(address, f"stopping {job_id}", lambda: client(address).stop_job(job_id))
