"""Reading job files and ``--set`` values safely.

Job files are YAML, read with the YAML 1.2 core schema rather than PyYAML's YAML 1.1 one:
``no``, ``on`` and ``2024-01-01`` stay strings, ``010`` is ten. Only ``true``/``false``,
``null``/``~``, numbers, lists and mappings get types of their own. ``--set`` goes one step
further: a field whose type is a string (``output.uri``, ``model.name``) always gets the text
as written, and only fields that want numbers, booleans or lists have the value parsed.

A job file is small, plain text: it is refused past :data:`MAX_JOB_BYTES`, when it is not
UTF-8, and when it uses YAML aliases (``*name``), which job files never need and which can
expand a kilobyte into gigabytes.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vitflow.errors import ConfigError

MAX_JOB_BYTES = 4 << 20  # a job file is a few KB; anything this large is a mistake
MAX_ECHO_CHARS = 200  # longest value an error message repeats back


def echo(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_ECHO_CHARS` so a huge value never floods a message."""
    text = repr(value)
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return text[:MAX_ECHO_CHARS] + f"... ({len(text)} characters)"


# --- YAML 1.2 core schema on PyYAML -----------------------------------------------------------

_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class _CoreLoader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core resolvers, and aliases refused."""

    yaml_implicit_resolvers: dict = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: job files may "
                "not use aliases (&name / *name); write the value out where it is needed"
            )
        return super().compose_node(parent, index)


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _construct_float(loader, node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
):
    _CoreLoader.add_implicit_resolver(_tag, _regexp, _first)
_CoreLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_CoreLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with the core schema; ``where`` names the source in errors."""
    try:
        return yaml.load(text, Loader=_CoreLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(e)}") from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML job file, after the size, encoding and alias checks."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > MAX_JOB_BYTES:
        raise ConfigError(
            f"config file {str(p)!r} is {size} bytes; a job file is at most "
            f"{MAX_JOB_BYTES >> 20} MiB. Is this the right file?"
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    data = parse_yaml(text, f"config file {str(p)!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


# --- --set values, typed by the field they set ------------------------------------------------


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a Union/Optional annotation (itself when it is not a union)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


def field_annotation(schema: type, parts: list[str]) -> Any:
    """The type annotation a dotted path reaches in a pydantic ``schema``, or ``Any``."""
    from pydantic import BaseModel

    current: Any = schema
    for part in parts:
        nxt = None
        for option in _options(current):
            origin = typing.get_origin(option)
            if isinstance(option, type) and issubclass(option, BaseModel):
                field = option.model_fields.get(part)
                nxt = field.annotation if field is not None else None
            elif origin in (list, tuple) and part.isdigit():
                nxt = typing.get_args(option)[0]
            if nxt is not None:
                break
        if nxt is None:
            return Any
        current = nxt
    return current


def parse_value(raw: str, annotation: Any = Any) -> Any:
    """A ``--set`` value for a field of type ``annotation``.

    A field that takes only text (``str``, a set of names, optionally ``None``) gets ``raw``
    as written (``null`` or nothing is None where the field allows it). Any other field gets
    the YAML 1.2 core reading: ``16`` an int, ``true`` a bool, ``[0, -1]`` a list.
    """
    options = _options(annotation)
    nullable = type(None) in options
    rest = [o for o in options if o is not type(None)]
    if rest and all(_is_text(o) for o in rest):
        return None if nullable and _NULL.match(raw.strip()) else raw
    return parse_yaml(raw, f"the --set value {echo(raw)}")
