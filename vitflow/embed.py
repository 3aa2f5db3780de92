"""``run_embed``: the embed job as a plain function (the CLI, notebooks and tests call it).

Everything that can be wrong with the job (config, model name, layer indices, pooling that
does not fit the model, checkpoint keys, source, existing output) is checked by
:func:`prepare_embed` on the driver before Ray runs any work. Then Ray Data streams the
listing through read+decode tasks and model actors into parquet shards, and the driver
checks that every listed file came out exactly once before writing ``_manifest.json``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from vitflow import columns
from vitflow.backbone import Backbone, backbone_bytes, create_backbone
from vitflow.config import EmbedConfig
from vitflow.errors import ConfigError, OutputExistsError, VitflowError
from vitflow.features import FeatureExtractor, FeaturePlan
from vitflow.manifest import build_manifest, write_manifest
from vitflow.preprocess import Preprocessor
from vitflow.runtime import ActorPlan, largest_node_cpus, plan_actors, ray_session
from vitflow.sources import Listing, list_images, open_fs
from vitflow.stages import EmbedStats, EmbedWorker, decode_batch

log = logging.getLogger(__name__)


@dataclass
class EmbedPlan:
    """A job checked against its model, source and output; ready to run."""

    cfg: EmbedConfig
    backbone: Backbone
    features: list[FeaturePlan]
    listing: Listing
    output_fs: Any
    output_path: str

    @property
    def dims(self) -> dict[str, int]:
        return {p.name: p.dim for p in self.features}


@dataclass
class EmbedResult:
    """What a finished run produced."""

    output_uri: str
    listed: int
    ok: int
    error: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False)

    @property
    def images_per_second(self) -> float:
        return self.listed / self.seconds if self.seconds > 0 else 0.0


def prepare_embed(cfg: EmbedConfig, *, overwrite: bool = False) -> EmbedPlan:
    """Validate the job end to end without Ray: model, features, source listing, output."""
    backbone = create_backbone(cfg.model)
    pre = Preprocessor(backbone.data_config)
    extractor = FeatureExtractor(
        backbone.model, cfg.features, pre.input_size, cfg.model.extractor, head=backbone.head
    )
    out_fs, out_path = open_fs(cfg.output.uri)
    src_fs, src_path = open_fs(cfg.source.uri)
    if type(out_fs) is type(src_fs) and _nested(out_path, src_path):
        raise ConfigError(
            f"output.uri {cfg.output.uri!r} and source.uri {cfg.source.uri!r} overlap; "
            "write the embeddings to a folder outside the images (and not above them)"
        )
    listing = list_images(cfg.source)
    if out_fs.exists(out_path) and out_fs.ls(out_path):
        if not overwrite:
            raise OutputExistsError(
                f"output {cfg.output.uri!r} already holds data; pass --overwrite to replace it "
                "or choose another output.uri"
            )
    return EmbedPlan(cfg, backbone, extractor.plans, listing, out_fs, out_path)


def _nested(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _input_blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    # Small blocks keep the stream fine-grained (decode of block k+1 overlaps the forward of
    # block k); larger ones for big corpora keep the task count reasonable.
    rows = batch_size * (1 if table.num_rows < 10_000 else 4)
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def run_embed(
    cfg: EmbedConfig,
    *,
    overwrite: bool = False,
    address: str | None = None,
    plan: EmbedPlan | None = None,
) -> EmbedResult:
    """Embed every image of ``cfg.source`` and write parquet shards + ``_manifest.json``.

    Args:
        cfg: the job.
        overwrite: replace an existing output instead of refusing.
        address: Ray cluster address to attach to; default: the Ray already initialised in
            this process, else a local one sized to the machine.
        plan: a result of :func:`prepare_embed` to reuse (it is computed otherwise).

    Example:
        >>> from vitflow.config import load_config
        >>> cfg = load_config(base={"source": {"uri": "images"}, "model": {"name": "resnet18"},
        ...                         "output": {"uri": "embeddings"}})
        >>> result = run_embed(cfg)  # doctest: +SKIP
        >>> result.ok + result.error == result.listed  # doctest: +SKIP
        True
    """
    started = time.time()
    plan = plan or prepare_embed(cfg, overwrite=overwrite)
    if overwrite and plan.output_fs.exists(plan.output_path):
        plan.output_fs.rm(plan.output_path, recursive=True)
    with ray_session(address) as ray:
        actors = plan_actors(ray.cluster_resources(), largest_node_cpus(), cfg.compute)
        log.info("actor plan: %s", actors)
        stats = _execute(ray, plan, actors)
    seconds = time.time() - started
    counts = _verify_output(plan)
    manifest = build_manifest(
        cfg,
        plan.backbone,
        plan.features,
        counts=counts,
        seconds=seconds,
        stats=stats,
        actors=actors.__dict__,
    )
    write_manifest(plan.output_fs, plan.output_path, manifest)
    return EmbedResult(
        cfg.output.uri, counts["listed"], counts["ok"], counts["error"], seconds, manifest
    )


def _execute(ray, plan: EmbedPlan, actors: ActorPlan) -> dict:
    cfg = plan.cfg
    stats_name = f"vitflow-embed-stats-{uuid.uuid4().hex[:12]}"
    stats = ray.remote(num_cpus=0)(EmbedStats).options(name=stats_name).remote()
    weights = ray.put(backbone_bytes(plan.backbone))
    try:
        ds = ray.data.from_arrow(_input_blocks(plan.listing.table, cfg.compute.batch_size))
        ds = ds.map_batches(
            decode_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=cfg.compute.decode_num_cpus,
            fn_kwargs={
                "data_config_json": json.dumps(plan.backbone.data_config),
                "max_pixels": cfg.source.max_pixels,
            },
        )
        ds = ds.map_batches(
            EmbedWorker,
            batch_size=cfg.compute.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            fn_constructor_kwargs={
                "job": cfg.model_dump(mode="json"),
                "weights": [weights],
                "device": actors.device,
                "torch_threads": actors.torch_threads,
                "stats_actor": stats_name,
            },
        )
        ds.write_parquet(
            plan.output_path,
            filesystem=_arrow_fs(plan.output_fs),
            min_rows_per_file=cfg.output.rows_per_file,
        )
        return ray.get(stats.get.remote())
    finally:
        ray.kill(stats)


def _arrow_fs(fs):
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


def _verify_output(plan: EmbedPlan) -> dict[str, int]:
    """Count ok/error rows and check each listed id appears exactly once."""
    dataset = pads.dataset(plan.output_path, format="parquet", filesystem=_arrow_fs(plan.output_fs))
    table = dataset.to_table(columns=[columns.ID, columns.STATUS])
    ids = table.column(columns.ID).to_pylist()
    listed = set(plan.listing.table.column(columns.ID).to_pylist())
    written = set(ids)
    if len(ids) != len(written) or written != listed:
        raise VitflowError(
            f"output check failed: {len(listed)} files listed, {len(ids)} rows written "
            f"({len(ids) - len(written)} duplicated, {len(listed - written)} missing); "
            "the output is incomplete, rerun with --overwrite"
        )
    ok = sum(1 for s in table.column(columns.STATUS).to_pylist() if s == columns.STATUS_OK)
    return {"listed": len(listed), "ok": ok, "error": len(ids) - ok}
