"""The Delta index sink: data files for one commit, written where rows are embedded.

Every model actor writes each embedded batch as one data file into the table's folder
(:class:`DeltaFileWriter`), invisible to readers until a commit names it, and returns a
receipt with the file's add action. The driver collects the actions (:class:`DeltaSink`);
``vitflow reindex`` commits them, with the copy-on-write removes, in one transaction. A file
whose receipt never arrived (an actor killed after writing it) is an orphan no commit names.
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa

from vitflow import columns

FILE_COLUMN = "__file"  # a receipt's add action, as JSON (the same for every row of a file)


class DeltaFileWriter:
    """Writes each batch as one Delta data file (in a model actor).

    Args:
        uri, storage_options: the table (deltalake storage options).
        run_id: the reindex run, naming its files.
        file_schema: the columns of a data file (index schema without metadata).
    """

    def __init__(self, uri: str, storage_options: dict, run_id: str, file_schema: pa.Schema):
        from vitflow.index_table import FileStager

        self.stager = FileStager(uri, storage_options, run_id, writer_id=uuid.uuid4().hex[:8])
        self.schema = file_schema

    def write(self, batch: pa.Table) -> pa.Table:
        rows = pa.table([batch[f.name].cast(f.type) for f in self.schema], schema=self.schema)
        add = self.stager.write(rows)
        action = json.dumps(
            {
                "path": add.path,
                "size": add.size,
                "modification_time": add.modification_time,
                "stats": add.stats,
            }
        )
        receipt = batch.select([columns.ID, columns.STATUS])
        return receipt.append_column(FILE_COLUMN, pa.array([action] * batch.num_rows))


class DeltaSink:
    """Collects the data files the actors wrote, for :func:`vitflow.reindex.commit_reindex`."""

    def __init__(self, uri: str, storage_options: dict, run_id: str, file_schema: pa.Schema):
        self.args = {
            "uri": uri,
            "storage_options": storage_options,
            "run_id": run_id,
            "file_schema": file_schema,
        }
        self.files: dict[str, dict] = {}

    def writer(self) -> tuple[type, dict]:
        return DeltaFileWriter, dict(self.args)

    def start(self, ray) -> None:
        pass

    def receive(self, receipt: pa.Table) -> None:
        for action in set(receipt.column(FILE_COLUMN).to_pylist()):
            info = json.loads(action)
            self.files[info["path"]] = info

    def finish(self) -> dict:
        return {"data_files": len(self.files)}

    def abort(self) -> None:
        """Nothing to wait for: data files are written in the actors, and a file no commit
        references is never read."""

    def add_actions(self) -> list:
        """The files written, as deltalake ``AddAction`` objects for the commit."""
        from deltalake.transaction import AddAction

        return [
            AddAction(i["path"], i["size"], {}, i["modification_time"], True, i["stats"])
            for i in sorted(self.files.values(), key=lambda i: i["path"])
        ]
