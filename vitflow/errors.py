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


class StorageUnavailable(VitflowError):
    """Object storage (or a network filesystem) stayed unreachable past the retry budget. The
    run stops with everything finished so far kept; ``--resume`` continues it."""


class DiskFull(VitflowError):
    """No space left where the output is written; ``--resume`` after freeing space finishes."""


class OutputLocked(VitflowError):
    """Another run holds the output (or index) this run would write."""


def job_error_in(e: BaseException) -> VitflowError | None:
    """The vitflow job error inside an exception that crossed Ray (a task's or actor's error
    arrives wrapped, sometimes only as text), or None when there is none."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, VitflowError) and type(x).__module__.startswith("vitflow"):
            return x
        # Ray re-raises a remote error as a class made on the fly (RayTaskError(DiskFull)),
        # whose text is the whole remote traceback: the original is its .cause.
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    text = str(e)
    for cls in _job_error_classes():
        marker = f"{cls.__name__}: "
        if marker in text:
            return cls(text.split(marker, 1)[1].splitlines()[0].strip())
    return None


def _job_error_classes() -> list[type[VitflowError]]:
    out, todo = [], [VitflowError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("vitflow"):  # not Ray's on-the-fly wrapper classes
            out.append(cls)
        todo += cls.__subclasses__()
    return sorted(out, key=lambda c: -len(c.__mro__))  # most specific first
