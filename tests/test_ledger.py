"""The listing's ledger on disk: read back in order in exact pieces, sorted out of core like
Arrow sorts in memory, removed with its last reference; an embed run's remaining rows and the
listing's fingerprint computed from it in pieces."""

from __future__ import annotations

import gc
import hashlib
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from vitflow import columns
from vitflow.embed import PartRows, _hash_values
from vitflow.ledger import MEMORY_LIMIT_ENV, ROW_GROUP, SPILL_ENV, Ledger, LedgerWriter

N = 2 * ROW_GROUP + 1234  # more than one row group, and a ragged end


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    return pa.table(
        {
            columns.ID: pa.array([f"id{i:07d}" for i in order]),
            "relpath": pa.array([f"d{i % 97:02d}/{i:07d}.jpg" for i in order]),
            "size": pa.array(order.astype(np.int64)),
        }
    )


@pytest.mark.parametrize("batch_rows", [1, 1000, ROW_GROUP + 7, 10 * N])
def test_batches_have_exactly_the_rows_asked_for_in_order(batch_rows):
    table = _rows(N if batch_rows > 1 else 300)
    ledger = Ledger.from_table(table)
    pieces = list(ledger.batches(batch_rows=batch_rows))
    sizes = [p.num_rows for p in pieces]
    assert all(s == batch_rows for s in sizes[:-1]) and 0 < sizes[-1] <= batch_rows
    assert pa.concat_tables(pieces).equals(table)
    assert ledger.read(["size"]).column(0).equals(table["size"])


def test_a_sorted_ledger_equals_arrows_sort_with_a_small_memory_limit(monkeypatch, tmp_path):
    monkeypatch.setenv(SPILL_ENV, str(tmp_path))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "32MB")
    table = _rows(N, seed=1)
    writer = LedgerWriter(table.schema, sort_by="relpath")
    for start in range(0, N, 10_000):  # arrives in pieces, out of order
        writer.write(table.slice(start, 10_000))
    ledger = writer.close()
    expected = table.take(pc.sort_indices(table, sort_keys=[("relpath", "ascending")]))
    assert ledger.num_rows == N
    assert ledger.read().equals(expected)
    assert os.path.dirname(ledger.path).startswith(str(tmp_path))


def test_the_spill_folder_goes_with_the_ledger():
    ledger = Ledger.from_table(_rows(10))
    folder = ledger.folder
    assert os.path.isdir(folder)
    del ledger
    gc.collect()
    assert not os.path.exists(folder)


def test_an_empty_ledger_reads_as_empty():
    ledger = LedgerWriter(_rows(1).schema).close()
    assert ledger.num_rows == 0 and list(ledger.batches()) == []
    assert ledger.read().num_rows == 0 and ledger.read().schema == _rows(1).schema


def test_part_rows_leave_out_finished_parts_and_staged_rows():
    table = _rows(1000, seed=2)
    per_part, done = 64, {0, 3, 15}
    staged = set(table[columns.ID].slice(200, 10).to_pylist())  # part 3 (done) and part 4
    rows = PartRows(Ledger.from_table(table), per_part, done, staged)
    # The reference, row by row: part = position // rows_per_file.
    want = [
        {**r, "__part": i // per_part}
        for i, r in enumerate(table.to_pylist())
        if i // per_part not in done and r[columns.ID] not in staged
    ]
    got = pa.concat_tables(rows.batches(batch_rows=50))
    assert rows.num_rows == len(want) == got.num_rows
    assert got.to_pylist() == want
    assert [b.num_rows for b in rows.batches(batch_rows=50)][:-1] == [50] * (len(want) // 50)
    fresh = PartRows(Ledger.from_table(table), per_part, set(), set())
    assert fresh.num_rows == 1000


def _digests(col: pa.ChunkedArray) -> tuple[bytes, bytes]:
    lengths, values = hashlib.sha256(), hashlib.sha256()
    _hash_values(lengths, values, col)
    return lengths.digest(), values.digest()


def test_the_listing_hash_does_not_depend_on_how_a_column_is_cut():
    values = ["a", None, "bcd", "", "ef", "g" * 40]
    whole = pa.chunked_array([values])
    cut = pa.chunked_array([values[:2], values[2:3], values[3:]])
    sliced = pa.chunked_array([pa.array(["x", *values]).slice(1)])
    assert _digests(whole) == _digests(cut) == _digests(sliced)
    # ...but does on the values: a byte moved from one string to the next changes it.
    assert _digests(pa.chunked_array([["ab", "c"]])) != _digests(pa.chunked_array([["a", "bc"]]))
    nums = pa.array([1, None, 3], pa.int64())
    assert _digests(pa.chunked_array([nums])) == _digests(pa.chunked_array([nums[:1], nums[1:]]))


def test_a_key_of_its_own_sorts_the_ledger_and_is_left_out():
    """A folder's ledger is sorted by each name's raw bytes, a key the ledger does not keep."""
    names = [b"b\xff.jpg", b"a.jpg", b"b.jpg", b"\xc3\xa9.jpg", b"B.jpg"]
    schema = pa.schema([("name", pa.string())])
    writer = LedgerWriter(schema, sort_by=pa.field("__raw", pa.binary()))
    writer.write(
        pa.table({"name": [n.decode("utf-8", "backslashreplace") for n in names], "__raw": names})
    )
    ledger = writer.close()
    assert ledger.schema == schema and ledger.read().schema == schema
    want = [n.decode("utf-8", "backslashreplace") for n in sorted(names)]
    assert ledger.column("name").to_pylist() == want


def test_without_duckdb_a_listing_is_sorted_and_checked_in_memory(monkeypatch, tmp_path):
    """An install made with --no-deps may lack DuckDB: a list is then sorted in memory, to the
    same ledger, a file named twice is still refused, and the reindex diff names the fix."""
    from vitflow.config import SourceConfig
    from vitflow.errors import ConfigError
    from vitflow.index_table import diff_listing
    from vitflow.sources import list_images

    names = [f"{c}/{i}.jpg" for i in range(300) for c in "zab"]
    (tmp_path / "files.txt").write_text("\n".join(names[::-1]))
    (tmp_path / "twice.txt").write_text("a.jpg\nb.jpg\na.jpg\n")
    with_duckdb = list_images(SourceConfig(uri=str(tmp_path / "files.txt"))).table
    monkeypatch.setitem(sys.modules, "duckdb", None)  # `import duckdb` fails from here
    without = list_images(SourceConfig(uri=str(tmp_path / "files.txt"))).table
    assert without.equals(with_duckdb)
    assert without["relpath"].to_pylist() == sorted(names)
    with pytest.raises(ConfigError, match="names 'a.jpg' more than once"):
        list_images(SourceConfig(uri=str(tmp_path / "twice.txt")))
    ledger = Ledger.from_table(with_duckdb)
    with pytest.raises(ConfigError, match=r"pip install 'duckdb"):
        diff_listing(ledger, ledger)


def test_spill_folders_whose_process_is_gone_are_swept(monkeypatch, tmp_path):
    """A driver killed with SIGKILL leaves its spill folder; the next ledger removes it. A
    folder whose lock a live process holds stays, and so does one without a lock file."""
    import subprocess

    from vitflow.ledger import spill_folder

    monkeypatch.setenv(SPILL_ENV, str(tmp_path))
    dead, live, bare = (tmp_path / f"vitflow-ledger-{n}" for n in ("dead", "live", "bare"))
    for d in (dead, live, bare):
        d.mkdir()
        (d / "ledger.parquet").write_bytes(b"x")
    (dead / ".owner").touch()  # its process is gone: nobody holds the lock
    (live / ".owner").touch()
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(live / ".owner")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = spill_folder()
        assert not dead.exists() and live.exists() and bare.exists()
        holder.kill()
        holder.wait(timeout=30)
        spill_folder()
        assert not live.exists() and bare.exists() and os.path.isdir(mine)  # ours is held
    finally:
        holder.kill()
        holder.wait(timeout=30)
