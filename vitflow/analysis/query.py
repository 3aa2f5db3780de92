"""Embed a query image exactly as the job that wrote an output did, without Ray.

The job is read back from the output: an embed output's manifest holds the whole validated
job (``manifest["config"]``); a reindexed Delta index stores only what its vectors depend on
(weights hash, model, features, preprocessing), not where the weights live, so its job file
is passed in. Either way the rebuilt model is checked against the output's stored vector
identity (:func:`vitflow.identity.vector_identity`): a checkpoint that changed since, or a
job file with another feature spec, is refused in one sentence instead of giving vectors
that are not comparable.

The computation is the job's own pieces, not a copy of them: the decode stage
(:func:`vitflow.stages.decode_batch`: read, EXIF, RGB, the model's resize/crop to ``uint8``),
:class:`vitflow.preprocess.Preprocessor` for ToTensor + Normalize on the batch, and
:class:`vitflow.features.FeatureExtractor` for every feature set from one forward pass
(what :class:`vitflow.stages.EmbedWorker` runs inside a model actor). Torch is imported
here only, so readers of the output never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vitflow import columns
from vitflow.errors import VitflowError


@dataclass
class QueryEmbedder:
    """A job's model, ready to embed files as that job did (see :func:`query_embedder`).

    Attributes:
        cfg: the job (:class:`vitflow.config.EmbedConfig`).
        dims: feature name -> width.
    """

    cfg: Any
    backbone: Any
    pre: Any
    extractor: Any
    device: Any
    dims: dict[str, int]

    def embed(
        self, paths: list[str], storage_options: dict | None = None
    ) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """Embed image files (local paths or fsspec URLs).

        Returns:
            ``({feature: (n, dim) float32}, errors)``: a file that cannot be read or decoded
            gets a NaN row and its reason in ``errors`` (None for the others), as an error
            row of the job would.
        """
        import torch

        from vitflow.decode_task import decode_batch

        cfg = self.cfg
        batch = {columns.PATH: np.asarray(paths, dtype=object)}
        out = decode_batch(
            batch,
            resize=self.pre.resize_spec(),
            max_pixels=cfg.source.max_pixels,
            storage_options=storage_options,
            decode_timeout_s=cfg.source.decode_timeout_s,
            max_file_bytes=cfg.source.max_file_bytes,
            jpeg_draft=cfg.compute.jpeg_draft,
        )
        ok = out[columns.STATUS] == columns.STATUS_OK
        vectors = {k: np.full((len(paths), d), np.nan, np.float32) for k, d in self.dims.items()}
        if ok.any():
            x = self.pre.to_tensor(out[columns.PIXELS][ok], self.device)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.compute.precision)
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None),
            ):
                got = self.extractor(x)
            for k, v in got.items():
                vectors[k][ok] = v.float().cpu().numpy()
        errors = [None if good else str(e) for good, e in zip(ok, out[columns.ERROR], strict=True)]
        return vectors, errors


def query_embedder(
    uri: str,
    *,
    job: str | None = None,
    storage_options: dict | None = None,
    device: str | None = None,
) -> QueryEmbedder:
    """The model of the job that wrote ``uri``, checked against the output's vector identity.

    Args:
        uri: an embed output (its manifest names the job) or a reindexed Delta index.
        job: a job file to use instead of the stored job; needed for a Delta index, whose
            table does not store where the weights are. Its vectors' identity must equal the
            output's.
        storage_options: fsspec options for reading the output.
        device: ``cpu`` or ``cuda`` (default: CUDA when the job allows it and torch sees it).

    Raises:
        VitflowError: no job to rebuild, or a model/feature spec/preprocessing that differs
            from the output's (named).

    Example:
        >>> q = query_embedder("embeddings")  # doctest: +SKIP
        >>> vectors, errors = q.embed(["query.jpg"])  # doctest: +SKIP
    """
    import torch

    from vitflow.backbone import backbone_bytes, create_backbone
    from vitflow.config import EmbedConfig, load_config
    from vitflow.features import FeatureExtractor
    from vitflow.identity import describe_change, vector_identity
    from vitflow.preprocess import Preprocessor

    stored_config, stored_identity, where = _stored_job(uri, storage_options)
    if job is not None:
        cfg = load_config(job)
        where = f"the job {job!r}"
    elif stored_config is not None:
        cfg = EmbedConfig.model_validate(stored_config)
    else:
        raise VitflowError(
            f"{uri!r} is a reindexed index, which does not store where its weights are; pass "
            "the reindex job file with --job JOB.yaml"
        )
    so = cfg.storage.options_for(cfg.model.checkpoint or "")
    try:
        bb = create_backbone(cfg.model, storage_options=so)
    except FileNotFoundError as e:
        raise VitflowError(
            f"the checkpoint {cfg.model.checkpoint!r} that {uri!r} was embedded with is gone "
            f"({e}); pass a job file whose model.checkpoint points at it with --job"
        ) from e
    if any(f.dense and f.pca for f in cfg.features):
        # The dense maps' PCA is part of the weights the output was embedded with.
        from vitflow.embed import stored_dense_pca
        from vitflow.storage import open_fs

        bb.dense_pca = stored_dense_pca(*open_fs(uri, storage_options))
    if stored_identity is not None:
        now = vector_identity(cfg, backbone_bytes(bb))
        if now != stored_identity:
            raise VitflowError(
                f"{where} would not embed as {uri!r} was embedded: "
                f"{describe_change(stored_identity, now)} differ(s); its vectors would not be "
                "comparable with the output's"
            )
    if device is None:
        device = "cuda" if cfg.compute.device != "cpu" and torch.cuda.is_available() else "cpu"
    pre = Preprocessor(bb.data_config)
    extractor = FeatureExtractor(
        bb.model, cfg.features, pre.input_size, cfg.model.extractor, head=bb.head, pca=bb.dense_pca
    )
    extractor.to(torch.device(device))
    return QueryEmbedder(cfg, bb, pre, extractor, torch.device(device), dict(extractor.dims))


def _stored_job(uri: str, storage_options: dict | None):
    """``(config or None, identity or None, description)`` of the job behind ``uri``."""
    from vitflow.analysis.source import open_source

    src = open_source(uri, storage_options)
    if src.kind == "delta":
        from vitflow.index_table import delta_storage_options, open_table, stored_job

        dt = open_table(uri, delta_storage_options(uri, storage_options))
        _, job = stored_job(dt)
        identity = {k: v for k, v in job.items() if k != "format"} or None
        return None, identity, f"the job of {uri!r}"
    from vitflow.loading import _manifest

    manifest = _manifest(src.fs, src.path.rstrip("/")) or {}
    identity = (manifest.get("identity") or {}).get("vectors")
    return manifest.get("config"), identity, f"the job in {uri!r}'s manifest"
