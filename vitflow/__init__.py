"""vitflow: image collections to embeddings at any scale (Ray Data + timm layer hooks).

Public entry points::

    from vitflow import load_config, run_embed, load_embeddings, load_dense
    from vitflow import evaluate, fit_transform, export_embeddings, sample_embeddings
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("vitflow")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = [
    "__version__",
    "evaluate",
    "export_embeddings",
    "fit_transform",
    "load_config",
    "load_dense",
    "load_embeddings",
    "load_index",
    "prepare_embed",
    "run_embed",
    "run_reindex",
    "sample_embeddings",
]

# Analysis entry points (torch-free; scikit-learn only where a function needs it).
_ANALYSIS = {
    "evaluate": "vitflow.analysis.evaluate",
    "fit_transform": "vitflow.analysis.transforms",
    "export_embeddings": "vitflow.analysis.export",
    "sample_embeddings": "vitflow.analysis.sample",
}


def __getattr__(name: str):
    # Lazy: `import vitflow` stays fast (no torch/ray) for the CLI's --help and for readers.
    if name in ("load_config",):
        from vitflow.config import load_config

        return load_config
    if name in ("run_embed", "prepare_embed"):
        from vitflow import embed

        return getattr(embed, name)
    if name == "run_reindex":
        from vitflow.reindex import run_reindex

        return run_reindex
    if name == "load_index":
        from vitflow.index_table import load_index

        return load_index
    if name in ("load_embeddings", "load_dense"):
        from vitflow import loading

        return getattr(loading, name)
    if name in _ANALYSIS:
        from importlib import import_module

        return getattr(import_module(_ANALYSIS[name]), name)
    raise AttributeError(f"module 'vitflow' has no attribute {name!r}")
