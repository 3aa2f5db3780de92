"""Compaction of staged pieces into a part, run as a Ray task and so retried by Ray when its
worker dies (a node lost mid-run): a retry must never shrink a part that is already whole."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from vitflow import columns
from vitflow.sinks.parquet import PART_COLUMN, STAGING, PieceWriter, compact_part, part_file

SCHEMA = pa.schema([(columns.ID, pa.string()), (columns.PATH, pa.string()), ("x", pa.int64())])


def batch(ids: list[int]) -> pa.Table:
    return pa.table(
        {
            columns.ID: [f"{i:016x}" for i in ids],
            columns.PATH: [f"/img/{i:04d}.jpg" for i in ids],
            "x": ids,
            columns.STATUS: ["ok"] * len(ids),
            PART_COLUMN: [0] * len(ids),
        }
    )


def test_a_retried_compaction_keeps_the_whole_part(tmp_path):
    fs = fsspec.filesystem("file")
    out = str(tmp_path / "out")
    writer = PieceWriter(fs, out, SCHEMA)
    for ids in ([0, 1, 2], [3, 4], [5, 6, 7]):
        writer.write(batch(ids))
    pieces = sorted((tmp_path / "out" / STAGING).iterdir())
    kept = [p.read_bytes() for p in pieces[1:]]
    assert compact_part(fs, out, 0) == 8
    # The first attempt wrote the part and died after deleting only the first piece; Ray
    # runs the task again on what is left.
    for p, data in zip(pieces[1:], kept, strict=True):
        p.write_bytes(data)
    assert compact_part(fs, out, 0) == 8
    part = pq.read_table(tmp_path / "out" / part_file(0))
    assert part.column("x").to_pylist() == list(range(8))
    assert not list((tmp_path / "out" / STAGING).iterdir())  # the pieces left are removed
    assert compact_part(fs, out, 0) == 0  # nothing staged: nothing to do


def test_a_compaction_racing_another_never_writes_part_of_a_part(tmp_path, monkeypatch):
    """Two compactions of one part at once (a failed run's late task and a resumed run's):
    the one that finds a piece gone mid-read knows the other wrote the whole part first."""
    from vitflow.sinks import parquet

    fs = fsspec.filesystem("file")
    out = str(tmp_path / "out")
    writer = PieceWriter(fs, out, SCHEMA)
    for ids in ([0, 1, 2], [3, 4], [5, 6, 7]):
        writer.write(batch(ids))
    real, raced = parquet._read_parquet, []

    def read_while_the_other_compacts(fs, path):
        table = real(fs, path)
        if not raced:  # after this one's first read, the other compaction runs to its end
            raced.append(True)
            monkeypatch.setattr(parquet, "_read_parquet", real)
            assert compact_part(fs, out, 0) == 8
        return table

    monkeypatch.setattr(parquet, "_read_parquet", read_while_the_other_compacts)
    assert compact_part(fs, out, 0) == 0
    assert pq.read_table(tmp_path / "out" / part_file(0)).column("x").to_pylist() == list(range(8))
