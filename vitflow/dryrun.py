"""``vitflow embed --dry-run``: what a job would do, checked end to end, with no work started.

Everything here comes from :func:`vitflow.embed.prepare_embed` (model built and probed,
feature widths measured, source listed, output rules checked) plus the actor plan for the
machine the job would start its local Ray on. No Ray is started and nothing is written.
"""

from __future__ import annotations

import math
from collections import Counter

import pyarrow.compute as pc

from vitflow import columns
from vitflow.runtime import ActorPlan, local_resources, plan_actors

_TOP = 8  # labels shown by name; the rest are counted


def _counts(counter: Counter | dict, top: int = _TOP) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    shown = ", ".join(f"{k if k is not None else '(none)'} {v}" for k, v in items[:top])
    more = len(items) - top
    return shown + (f", ... {more} more" if more > 0 else "")


def weights_line(model_cfg, checkpoint_sha256: str | None) -> str:
    """How the run's weights were chosen, as the summary and the dry run say it."""
    source = model_cfg.weights_source
    if source == "checkpoint":
        sha = f" (sha256 {checkpoint_sha256[:12]})" if checkpoint_sha256 else ""
        return f"checkpoint {model_cfg.checkpoint}{sha}"
    if source == "hub":
        return "hub (timm's pretrained weights)"
    return "random (seeded random init: the vectors carry no meaning)"


def _describe_feature(p) -> str:
    if p.source == "head":
        return f"{p.name} [{p.dim}] = projection head {p.normalize}"
    if p.dense:
        h, w, d = p.shape
        shift = f", pixel shift {p.shift['pixels']} {p.shift['neighbourhood']}" if p.shift else ""
        shift += f", PCA to {p.pca} components fitted on a sample" if p.pca else ""
        return (
            f"{p.name} = dense map {h}x{w}x{d} float16 (stride {p.stride}{shift}) of layers "
            f"{list(p.indices)} {p.aggregate} {p.normalize}"
        )
    return f"{p.name} [{p.dim}] = layers {list(p.indices)} {p.pool} {p.aggregate} {p.normalize}"


def describe_plan(plan, actors: ActorPlan, where: str) -> str:
    """The dry run's report for an :class:`~vitflow.embed.EmbedPlan`."""
    cfg, listing = plan.cfg, plan.listing
    labels: Counter[str | None] = Counter()
    splits: Counter[str | None] = Counter()
    for piece in listing.ledger.batches([columns.LABEL, columns.SPLIT]):
        for counter, name in ((labels, columns.LABEL), (splits, columns.SPLIT)):
            for vc in pc.value_counts(piece.column(name)).to_pylist():
                counter[vc["values"]] += vc["counts"]
    dc = plan.backbone.data_config
    n_params = sum(p.numel() for p in plan.backbone.model.parameters())
    parts = math.ceil(len(listing) / cfg.output.rows_per_file)
    lines = [
        "vitflow embed --dry-run: checked, nothing started",
        f"  source    : {cfg.source.uri}",
        f"  listed    : {len(listing)} files ({_counts(listing.by_extension, 20)})",
        f"  skipped   : {listing.skipped.describe()}",
        f"  labels    : {len(set(labels) - {None})} ({_counts(labels)})",
        f"  splits    : {_counts(splits)}",
        f"  model     : {plan.backbone.name} | {n_params / 1e6:.1f}M parameters | input "
        f"{'x'.join(map(str, dc['input_size']))}, {dc.get('interpolation')}, crop_pct "
        f"{dc.get('crop_pct')}",
        f"  weights   : {weights_line(cfg.model, plan.backbone.checkpoint_sha256)}",
        "  features  : " + "; ".join(_describe_feature(p) for p in plan.features),
        f"  actors    : {actors.num_actors} x {actors.device} (num_cpus {actors.num_cpus:g}, "
        f"num_gpus {actors.num_gpus:g}, torch threads {actors.torch_threads}), "
        f"batch {actors.batch_size}, {cfg.compute.precision}; {actors.decode_tasks} decode "
        f"actors, {actors.decode_num_cpus:g} CPU each, decode on {actors.decode} — {where}",
        f"  output    : {cfg.output.uri}: {parts} part(s) of up to {cfg.output.rows_per_file} "
        f"rows (part-00000.parquet ...) + {columns.MANIFEST_NAME}",
    ]
    return "\n".join(lines)


def plan_here(
    compute, address: str | None, model_params: int | None = None
) -> tuple[ActorPlan, str]:
    """The actor plan on this machine's resources, without starting Ray."""
    res = local_resources(compute.local_num_cpus)
    where = f"planned for this machine ({res['CPU']:g} CPUs, {res['GPU']:g} GPUs)" + (
        "; on the cluster the pool is sized from its resources at run time" if address else ""
    )
    return plan_actors(res, res["CPU"], compute, model_params), where
