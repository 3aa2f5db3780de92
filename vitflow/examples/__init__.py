"""The example job files that ship with vitflow, and ``vitflow init``'s way to copy one out.

The YAML files live in this package (``vitflow/examples/*.yaml``), so they are there after a
plain ``pip install``; the repository's ``jobs/*.yaml`` are links to them. The default,
``embed``, is a fully commented embed job to fill in. Nothing here imports torch, Ray or
pydantic: listing and writing examples is instant.

    >>> from vitflow.examples import list_examples, write_example
    >>> "demo" in list_examples()
    True
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from vitflow.errors import ConfigError, OutputExistsError

__all__ = ["DEFAULT_EXAMPLE", "example_text", "list_examples", "write_example"]

#: What ``vitflow init`` writes when no example is named: a commented embed job.
DEFAULT_EXAMPLE = "embed"
_SUFFIX = ".yaml"


def list_examples() -> list[str]:
    """Names of the shipped example jobs (file names without ``.yaml``), sorted."""
    return sorted(
        p.name[: -len(_SUFFIX)]
        for p in resources.files(__name__).iterdir()
        if p.name.endswith(_SUFFIX)
    )


def example_text(name: str = DEFAULT_EXAMPLE) -> str:
    """The text of one example job.

    Args:
        name: an entry of :func:`list_examples`; a trailing ``.yaml`` is accepted.

    Raises:
        ConfigError: no example has that name (the message lists them).
    """
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    names = list_examples()
    if stem not in names:
        raise ConfigError(f"no example job named {name!r}; the examples are: {', '.join(names)}")
    return resources.files(__name__).joinpath(stem + _SUFFIX).read_text(encoding="utf-8")


def write_example(name: str = DEFAULT_EXAMPLE, path: str | os.PathLike[str] = "job.yaml") -> Path:
    """Write an example job to ``path`` and return that path. Never overwrites anything.

    Args:
        name: an entry of :func:`list_examples` (default: the commented embed job).
        path: the file to create; its folder must exist.

    Raises:
        ConfigError: unknown example name, or ``path`` is a folder or in a missing folder.
        OutputExistsError: ``path`` already exists (a file, folder or link).
    """
    text = example_text(name)
    dest = Path(path)
    if dest.is_dir():
        raise OutputExistsError(
            f"{dest} is a folder; give the job file's name, e.g. {dest / 'job.yaml'}"
        )
    try:
        # "x": create, or fail if anything (even a dangling link) is there; no check-then-write race.
        with open(dest, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise OutputExistsError(
            f"{dest} already exists and vitflow init never overwrites a file; give another "
            "path or remove it first"
        ) from None
    except FileNotFoundError:
        raise ConfigError(f"cannot write {dest}: the folder {dest.parent} does not exist") from None
    return dest
