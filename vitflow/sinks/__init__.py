"""Where embedded rows go: one module per output format, all behind one small protocol.

The engine (:mod:`vitflow.engine`) streams listing rows through decode actors and model
actors; a *sink* decides what happens to the embedded rows. It has two halves:

- a **writer** (``sink.writer() -> (class, kwargs)``), built once in every model actor:
  ``writer.write(table) -> receipt`` writes a batch where it was embedded and returns a
  small receipt table with at least ``id`` and ``status`` per row (plus the sink's own
  bookkeeping columns), so rows never pass through one process;
- the **driver half**: ``start(ray)`` before the stream, ``receive(receipt)`` for every
  receipt as it arrives, ``finish()`` after the last one (compact, collect, commit inputs),
  and ``abort()`` when the stream fails (wait for whatever it started, so a resumed run
  never meets a task of the failed one).

Sinks: :mod:`vitflow.sinks.parquet` (resumable parquet parts, ``vitflow embed``) and
:mod:`vitflow.sinks.delta` (data files for one Delta commit, ``vitflow reindex``). A new
format (Lance, webdataset) is one new module here and its tests.
"""

from __future__ import annotations

from vitflow.sinks.parquet import (
    PART_COLUMN,
    RUN_STATE,
    STAGING,
    PartsSink,
    PieceWriter,
    clean_staging,
    compact_part,
    finished_parts,
    is_output_file,
    output_files,
    part_file,
    part_files,
    remove_output,
    staged_ids,
)

__all__ = [
    "PART_COLUMN",
    "RUN_STATE",
    "STAGING",
    "PartsSink",
    "PieceWriter",
    "clean_staging",
    "compact_part",
    "finished_parts",
    "is_output_file",
    "output_files",
    "part_file",
    "part_files",
    "remove_output",
    "staged_ids",
]
