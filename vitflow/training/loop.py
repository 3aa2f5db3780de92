"""The per-worker training loop that Ray Train runs on every rank.

Each worker re-validates the job from a plain dict, builds backbone + projection head,
wraps them in DDP (gloo on CPU, NCCL on GPU), has its own disjoint share of each step's
batch read, decoded and augmented by DataLoader processes beside it
(:mod:`vitflow.training.ingest`), runs the forward pass under ``compute.precision``
autocast, and on rank 0 logs metrics, runs the kNN monitor and writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from vitflow.backbone import data_config
from vitflow.training.config import TrainConfig
from vitflow.training.data import (
    ImageStore,
    UnreadableImage,
    list_class_folders,
    simclr_indices,
)
from vitflow.training.ingest import BadImageTally, StepBatches, step_loader
from vitflow.training.knn import knn_accuracy
from vitflow.training.losses import NTXentLoss, SIMO2Loss
from vitflow.training.model import build_model
from vitflow.training.report import MetricsLogger
from vitflow.training.sampler import ClassBalancedBatchSampler
from vitflow.training.transforms import EvalTransform, SimCLRTransform, SIMO2Transform

STATE_FILE = "state.pt"

log = logging.getLogger(__name__)


def mean_std(backbone: nn.Module) -> tuple[tuple, tuple]:
    dc = data_config(backbone)
    return tuple(dc["mean"]), tuple(dc["std"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0 (SimCLR's schedule)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def embed_images(
    backbone: nn.Module, store: ImageStore, paths: list[str], transform, device, batch: int = 128
) -> tuple[np.ndarray, list[int]]:
    """Pooled backbone features of ``paths``; images that cannot be read or decoded are left
    out. Returns ``(features (N_ok, D), positions in paths of the rows)``."""
    backbone.eval()
    out, kept = [], []
    for i in range(0, len(paths), batch):
        got = store.get_many(paths[i : i + batch])
        ok = [j for j, img in enumerate(got) if not isinstance(img, UnreadableImage)]
        if not ok:
            continue
        x = torch.stack([transform(got[j]) for j in ok]).to(device)
        out.append(backbone(x).float().cpu())
        kept += [i + j for j in ok]
    feats = torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)
    return feats, kept


def knn_monitor(cfg, backbone, store, folders, device) -> float:
    """Top-1 weighted kNN accuracy of held-out images against (a sample of) the train images;
    images that cannot be read or decoded take part on neither side."""
    if not folders.holdout_paths:
        return float("nan")
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.monitor.max_images, len(folders.train_paths))
    pick = np.sort(rng.choice(len(folders.train_paths), size=n, replace=False))
    mean, std = mean_std(backbone)
    tf = EvalTransform(cfg.data.image_size, mean, std)
    was_training = backbone.training
    train_paths = [folders.train_paths[i] for i in pick]
    train_x, train_ok = embed_images(backbone, store, train_paths, tf, device)
    hold_x, hold_ok = embed_images(backbone, store, folders.holdout_paths, tf, device)
    backbone.train(was_training)
    if not train_ok or not hold_ok:
        return float("nan")
    train_y = [folders.train_labels[pick[i]] for i in train_ok]
    hold_y = [folders.holdout_labels[i] for i in hold_ok]
    return knn_accuracy(train_x, train_y, hold_x, hold_y, k=cfg.monitor.knn_k)


def loader_workers(cfg: TrainConfig) -> int:
    """DataLoader processes per training worker: the rest of its CPU reservation by default."""
    if cfg.data.loader_workers is not None:
        return cfg.data.loader_workers
    return max(0, int(cfg.scaling.cpus_per_worker or 1) - 1)


def make_ingest(cfg: TrainConfig, folders, mean, std, rank: int, world: int) -> StepBatches:
    """This rank's :class:`StepBatches`: which images each step holds, and their views."""
    n_proc = max(1, loader_workers(cfg))
    store = ImageStore(
        cfg.data.cache_images // n_proc,
        cfg.data.cache_mb * 2**20 // n_proc,
        storage_options=cfg.storage.options_for(cfg.data.uri),
        read_in_flight=cfg.storage.read_in_flight,
    )
    if cfg.method == "simo2":
        sampler = ClassBalancedBatchSampler(
            folders.train_labels,
            cfg.simo2.classes_per_batch,
            cfg.simo2.samples_per_class,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            replacement=cfg.simo2.replacement,
        )
        plan, rows = sampler.batch, sampler.classes_per_batch // world * sampler.samples_per_class
        tf = SIMO2Transform(cfg.data.image_size, mean, std)
    else:
        n, gb = len(folders.train_paths), cfg.simclr.batch_size
        plan = partial(simclr_indices, n, gb, seed=cfg.seed, rank=rank, world=world)
        rows = gb // world
        tf = SimCLRTransform(cfg.data.image_size, mean, std)
    return StepBatches(
        folders.train_paths,
        folders.train_labels,
        plan,
        offset=rank * rows,
        transform=tf,
        seed=cfg.seed,
        same_class=cfg.method == "simo2",
        store=store,
    )


def autocast_for(cfg: TrainConfig, device: torch.device):
    """The forward pass's autocast context (a no-op for fp32)."""
    p = cfg.compute.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_worker(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``): ``{"job": TrainConfig dict,
    "resume": checkpoint path or None}``."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    threads = int(os.environ.get("VITFLOW_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume"):
        ckpt = ray.train.Checkpoint(config["resume"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    train_loop(
        cfg,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        state=state,
        wrap_model=ray.train.torch.prepare_model,
        report=_ray_report,
        node_id=ray.get_runtime_context().get_node_id(),
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the training process's own draws (dropout, drop-path) at ``step``."""
    return int(np.random.SeedSequence([seed, 1, rank, step]).generate_state(1)[0])


def train_loop(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    state: dict | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    report: Callable[[dict, dict | None], None] | None = None,
    node_id: str = "local",
) -> None:
    """One rank's training, from ``state`` (a checkpoint's) or from the start.

    :func:`train_worker` runs it under Ray Train; a test runs it as a plain function.

    Args:
        cfg: the job.
        rank: this rank; world: the number of ranks (a process group must exist when > 1).
        device: where the model runs (default CPU).
        state: a checkpoint's ``state.pt`` contents to resume from.
        wrap_model: wraps the model (on ``device`` already) in DDP, Ray's
            ``prepare_model``; default: no wrapper (one rank).
        report: called by every rank at each checkpoint step with ``(metrics, state)``;
            ``state`` (the checkpoint to keep) on rank 0 only, None elsewhere.
        node_id: where this rank runs, for the log.
    """
    device = device or torch.device("cpu")
    folders = list_class_folders(
        cfg.data.uri, cfg.data.holdout_fraction, cfg.seed, cfg.storage.options_for(cfg.data.uri)
    )
    # Seeded: identical initial weights on every rank. On the device before the optimizer
    # exists, so a resumed optimizer state lands beside the parameters.
    model = build_model(cfg).to(device)
    if cfg.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = mean_std(model.backbone)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.compute.precision == "fp16")
    tally = BadImageTally(cfg.data.max_error_fraction)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "ingest" in state:
            tally.load_state_dict(state["ingest"])
    ddp = wrap_model(model) if wrap_model is not None else model
    forward = torch.compile(ddp) if cfg.compute.compile else ddp
    nodes = _gather_node_ids(node_id, world)
    ingest = make_ingest(cfg, folders, mean, std, rank, world)
    workers = loader_workers(cfg)
    loader = step_loader(
        ingest, start, cfg.optim.steps, workers=workers, pin_memory=device.type == "cuda"
    )
    if cfg.method == "simo2":
        loss_fn = SIMO2Loss(orth_lean=cfg.simo2.orth_lean)
        classes_here = (cfg.simo2.classes_per_batch or len(folders.classes)) // world
    else:
        loss_fn = NTXentLoss(temperature=cfg.simclr.temperature)
    logger, monitor_store = None, None
    if rank == 0:
        logger = MetricsLogger(
            cfg.output.uri,
            tracking=cfg.tracking,
            run_name=os.path.basename(cfg.output.uri.rstrip("/")),
            params=cfg.model_dump(mode="json"),
        )
        logger.log(
            start,
            workers=world,
            worker_nodes=nodes,
            loader_workers=workers,
            precision=cfg.compute.precision,
            **({"init": model.init} if start == 0 else {}),
        )
        n_monitor = min(cfg.monitor.max_images, len(folders.train_paths)) + len(
            folders.holdout_paths
        )
        monitor_store = ImageStore(
            n_monitor,
            cfg.data.cache_mb * 2**20,
            storage_options=cfg.storage.options_for(cfg.data.uri),
            read_in_flight=cfg.storage.read_in_flight,
        )
        if start == 0 and cfg.monitor.knn_every:
            logger.log(0, knn_top1=knn_monitor(cfg, model.backbone, monitor_store, folders, device))
    ddp.train()
    autocast = autocast_for(cfg, device)
    t_last, imgs = time.perf_counter(), 0
    for batch in loader:
        step = batch.step
        # Dropout and drop-path draw from here (CPU and CUDA generators), seeded per step,
        # so a resumed run draws what the uninterrupted one drew; augmentation has streams
        # of its own.
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        tally.add(batch)
        x = batch.x.to(device, non_blocking=True)
        if cfg.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            z = forward(x)
        z = z.float()  # the loss in fp32: its sums and ratios lose too much in half precision
        terms = {}
        if cfg.method == "simo2":
            out = loss_fn(nn.functional.normalize(z, dim=-1), num_classes=classes_here)
            loss = out.loss
            terms = {"loss_same": out.same, "loss_means": out.means, "loss_diff": out.diff}
        else:
            half = z.shape[0] // 2
            loss = loss_fn(z[:half], z[half:])
        imgs += x.shape[0]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        done = step + 1
        last = done == cfg.optim.steps
        log_now = done % cfg.output.log_every == 0 or last
        ckpt_now = done % cfg.output.checkpoint_every == 0 or last
        if log_now or ckpt_now:
            new_bad = tally.sync()  # every rank, same steps; raises past the error budget
            if rank == 0:
                _warn_bad(new_bad)
        if rank == 0 and log_now:
            now = time.perf_counter()
            logger.log(
                done,
                loss=loss.item(),
                lr=lr,
                images_per_s=imgs * world / (now - t_last),
                skipped_images=tally.skipped,
                bad_images=len(tally.bad),
                # .item() waits for the device: only on the steps that log.
                **{k: v.item() for k, v in terms.items()},
            )
            t_last, imgs = now, 0
        if rank == 0 and cfg.monitor.knn_every and (done % cfg.monitor.knn_every == 0 or last):
            knn = knn_monitor(cfg, model.backbone, monitor_store, folders, device)
            logger.log(done, knn_top1=knn)
            ddp.train()
        if ckpt_now:
            extra = {"ingest": tally.state_dict()}
            if scaler.is_enabled():
                extra["scaler"] = scaler.state_dict()
            if report is not None:
                saved = None
                if rank == 0:
                    saved = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": done,
                        "sampler": {"seed": cfg.seed, "step": done},
                        "config": cfg.model_dump(mode="json"),
                        **extra,
                    }
                report({"step": done, "loss": loss.item()}, saved)
    if logger is not None:
        logger.close()


def _warn_bad(new: dict[str, str], shown: int = 10) -> None:
    for path, why in list(new.items())[:shown]:
        log.warning("training image skipped (another drawn in its place): %s: %s", path, why)
    if len(new) > shown:
        log.warning("... and %d more training images skipped", len(new) - shown)


def _gather_node_ids(node_id: str, world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (logged, so a run shows where it ran)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [node_id]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, node_id)
    return out


def _ray_report(metrics: dict, state: dict | None) -> None:
    """Every rank reports (Ray Train v2 needs all); rank 0 attaches the checkpoint. The
    weights are saved as they are trained, in fp32, whatever compute.precision."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
