"""The per-worker training loop that Ray Train runs on every rank.

Each worker re-validates the job from a plain dict, builds backbone + projection head,
wraps them in DDP (gloo on CPU, NCCL on GPU), draws its own disjoint share of each step's
batch, and on rank 0 logs metrics, runs the kNN monitor and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from vitflow.backbone import create_model, data_config, match_state_dict, read_checkpoint
from vitflow.heads import ProjectionHead
from vitflow.training.config import TrainConfig
from vitflow.training.data import ImageStore, list_class_folders, simclr_indices, stack_views
from vitflow.training.knn import knn_accuracy
from vitflow.training.losses import NTXentLoss, SIMO2Loss
from vitflow.training.report import MetricsLogger
from vitflow.training.sampler import ClassBalancedBatchSampler
from vitflow.training.transforms import EvalTransform, SimCLRTransform, SIMO2Transform

STATE_FILE = "state.pt"


class ContrastiveModel(nn.Module):
    """timm backbone (no classifier) + projection head; ``forward`` returns projections."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, S, S) -> (B, num_features) -> (B, E)


def build_model(cfg: TrainConfig) -> ContrastiveModel:
    """Backbone from the embed job's model code (same names, kwargs and checkpoint rules)."""
    backbone = create_model(cfg.model)
    if cfg.model.checkpoint:
        ckpt = read_checkpoint(cfg.model.checkpoint)
        backbone.load_state_dict(match_state_dict(backbone, ckpt.state_dict, cfg.model.checkpoint))
    head = ProjectionHead(backbone.num_features, cfg.model.embedding_dim, cfg.model.head_hidden_dim)
    return ContrastiveModel(backbone, head)


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
):
    backbone.eval()
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([transform(store.get(p)) for p in paths[i : i + batch]]).to(device)
        out.append(backbone(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def knn_monitor(cfg, backbone, store, folders, device) -> float:
    """Top-1 weighted kNN accuracy of held-out images against (a sample of) the train images."""
    if not folders.holdout_paths:
        return float("nan")
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.monitor.max_images, len(folders.train_paths))
    pick = np.sort(rng.choice(len(folders.train_paths), size=n, replace=False))
    mean, std = mean_std(backbone)
    tf = EvalTransform(cfg.data.image_size, mean, std)
    was_training = backbone.training
    train_x = embed_images(backbone, store, [folders.train_paths[i] for i in pick], tf, device)
    hold_x = embed_images(backbone, store, folders.holdout_paths, tf, device)
    backbone.train(was_training)
    train_y = [folders.train_labels[i] for i in pick]
    return knn_accuracy(train_x, train_y, hold_x, folders.holdout_labels, k=cfg.monitor.knn_k)


def train_worker(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``): ``{"job": TrainConfig dict,
    "resume": checkpoint path or None}``."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    threads = int(os.environ.get("VITFLOW_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    folders = list_class_folders(cfg.data.uri, cfg.data.holdout_fraction, cfg.seed)
    store = ImageStore(cfg.data.cache_images)
    model = build_model(cfg)
    mean, std = mean_std(model.backbone)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume"):
        ckpt = ray.train.Checkpoint(config["resume"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    ddp = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    nodes = _gather_node_ids(ray.get_runtime_context().get_node_id(), world)
    torch.manual_seed(cfg.seed * 1000 + rank * 7919 + start)  # augmentation stream per rank
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
        loss_fn = SIMO2Loss(orth_lean=cfg.simo2.orth_lean)
        tf = SIMO2Transform(cfg.data.image_size, mean, std)
        classes_here = (cfg.simo2.classes_per_batch or len(folders.classes)) // world
    else:
        loss_fn = NTXentLoss(temperature=cfg.simclr.temperature)
        tf = SimCLRTransform(cfg.data.image_size, mean, std)
    logger = None
    if rank == 0:
        logger = MetricsLogger(
            cfg.output.uri,
            tracking=cfg.tracking,
            run_name=os.path.basename(cfg.output.uri.rstrip("/")),
            params=cfg.model_dump(mode="json"),
        )
        logger.log(start, workers=world, worker_nodes=nodes)
        if start == 0 and cfg.monitor.knn_every:
            logger.log(0, knn_top1=knn_monitor(cfg, model.backbone, store, folders, device))
    ddp.train()
    t_last, imgs = time.perf_counter(), 0
    for step in range(start, cfg.optim.steps):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        metrics = {}
        if cfg.method == "simo2":
            idx = sampler.batch(step)
            x = stack_views([store.get(folders.train_paths[i]) for i in idx], tf).to(device)
            out = loss_fn(nn.functional.normalize(ddp(x), dim=-1), num_classes=classes_here)
            loss = out.loss
            metrics = {
                "loss_same": out.same.item(),
                "loss_means": out.means.item(),
                "loss_diff": out.diff.item(),
            }
            imgs += len(idx)
        else:
            idx = simclr_indices(
                len(folders.train_paths), cfg.simclr.batch_size, step, cfg.seed, rank, world
            )
            views = [tf(store.get(folders.train_paths[i])) for i in idx]
            x = torch.cat(
                [torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])]
            ).to(device)
            z = ddp(x)
            loss = loss_fn(z[: len(idx)], z[len(idx) :])
            imgs += 2 * len(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if rank == 0 and (done % cfg.output.log_every == 0 or done == cfg.optim.steps):
            now = time.perf_counter()
            logger.log(
                done, loss=loss.item(), lr=lr, images_per_s=imgs * world / (now - t_last), **metrics
            )
            t_last, imgs = now, 0
        if (
            rank == 0
            and cfg.monitor.knn_every
            and (done % cfg.monitor.knn_every == 0 or done == cfg.optim.steps)
        ):
            logger.log(done, knn_top1=knn_monitor(cfg, model.backbone, store, folders, device))
            ddp.train()
        if done % cfg.output.checkpoint_every == 0 or done == cfg.optim.steps:
            _report(model, optimizer, done, cfg, rank, loss.item())
    if logger is not None:
        logger.close()


def _gather_node_ids(node_id: str, world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (logged, so a run shows where it ran)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [node_id]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, node_id)
    return out


def _report(model, optimizer, step: int, cfg: TrainConfig, rank: int, loss: float) -> None:
    """Every rank reports (Ray Train v2 needs all); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"step": step, "loss": loss}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "sampler": {"seed": cfg.seed, "step": step},
                "config": cfg.model_dump(mode="json"),
            },
            os.path.join(d, STATE_FILE),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
