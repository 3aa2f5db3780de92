"""The output location of a job that writes embeddings: where it may be, and who holds it.

Torch-free, so the CLI can take an output's lock (and refuse a second run on it) within a
second of starting, before any model is built.
"""

from __future__ import annotations

from vitflow.config import EmbedConfig
from vitflow.errors import ConfigError
from vitflow.locking import RunLock
from vitflow.storage import open_fs, overlap


def output_lock(cfg: EmbedConfig, command: str = "embed") -> RunLock:
    """The lock that keeps other runs off ``cfg.output.uri`` while this one writes it (see
    :mod:`vitflow.locking`); re-entrant within one process. The location is checked first,
    so no lock file is ever made inside the source or in a bucket that does not exist."""
    fs, path = check_output_location(cfg)
    return RunLock(fs, path, command=command, uri=cfg.output.uri)


def check_output_location(cfg: EmbedConfig, *, bucket: bool = True):
    """``(fs, path)`` of the output after checking it is not the source (nor inside or above
    it) and, for object stores, that its bucket exists."""
    opts = cfg.storage.options_for(cfg.output.uri)
    out_fs, out_path = open_fs(cfg.output.uri, opts)
    if overlap(cfg.output.uri, cfg.source.uri, opts):
        raise ConfigError(
            f"output.uri {cfg.output.uri!r} and source.uri {cfg.source.uri!r} are the same "
            "place or one lies inside the other (compared after resolving '..', relative paths "
            "and symlinks); write the embeddings to a folder outside the images and not above them"
        )
    if bucket and "://" in cfg.output.uri:
        _check_bucket(out_fs, out_path, cfg.output.uri)
    return out_fs, out_path


def _check_bucket(fs, path: str, uri: str) -> None:
    # s3fs's makedirs would create a mistyped bucket; refuse instead.
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except Exception as e:
        raise ConfigError(f"cannot reach the bucket of output.uri {uri!r}: {e}") from e
    if not ok:
        raise ConfigError(
            f"the bucket {bucket!r} of output.uri {uri!r} does not exist; create it or fix the URI"
        )
