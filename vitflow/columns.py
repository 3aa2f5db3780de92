"""Column names of the embeddings table: the one place they are spelled out."""

from __future__ import annotations

ID = "id"
PATH = "path"
LABEL = "label"
SPLIT = "split"
STATUS = "status"
ERROR = "error"
WIDTH = "width"
HEIGHT = "height"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Columns every row carries, in output order; one vector column per feature set follows.
META_COLUMNS = (ID, PATH, LABEL, SPLIT, STATUS, ERROR, WIDTH, HEIGHT)
# Per-image scores a job may add after the vectors (model.mae_loss).
MAE_LOSS = "mae_loss"

# Internal column carrying preprocessed pixels from decode actors to the model actors;
# never written to the output.
PIXELS = "__pixels"
# Internal column carrying a file's bytes to the model actor when it decodes on its GPU.
RAW_BYTES = "__bytes"

# Internal listing column: why a listed file is an error row before anything reads it (a
# file name that is not UTF-8, a symlink leaving the source); null for the others. The
# decode stage turns it into status "error" without opening the file; never written out.
LIST_ERROR = "__list_error"

MANIFEST_NAME = "_manifest.json"
