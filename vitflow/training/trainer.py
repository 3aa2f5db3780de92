"""``run_train``: the pretraining job as a plain function, and ``export_backbone``.

The driver checks the job (classes, sampler feasibility, model) before Ray starts, runs a
Ray Train ``TorchTrainer`` whose checkpoints land in ``output.uri``, resumes from the newest
checkpoint there when the same command is rerun, and at the end exports the backbone (with
its projection head and preprocessing) plus the loss-curve and projection plots.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import torch

from vitflow.backbone import Backbone, backbone_bytes
from vitflow.errors import ConfigError, VitflowError
from vitflow.runtime import ray_session
from vitflow.storage import open_fs
from vitflow.training.config import TrainConfig
from vitflow.training.data import ImageStore, list_class_folders
from vitflow.training.loop import STATE_FILE, embed_images, mean_std, train_worker
from vitflow.training.model import build_model, resolve_architecture
from vitflow.training.report import plot_loss_curves, plot_projection, read_metrics
from vitflow.training.sampler import ClassBalancedBatchSampler
from vitflow.training.transforms import EvalTransform, eval_data_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    backbone_path: str
    resumed_from_step: int


def sized_for_cluster(cfg: TrainConfig, nodes: list[dict]) -> TrainConfig:
    """``cfg`` with ``scaling.cpus_per_worker`` filled in where the job left it out: 1 for a
    CPU worker; for a GPU worker, the CPUs per GPU of the GPU nodes (the fewest of them),
    less one left to Ray and the driver, at least 1. ``nodes``: ``ray.nodes()``."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg
    cpus = 1.0
    if cfg.scaling.use_gpu:
        shares = [
            (n["Resources"].get("CPU", 0) - 1) // n["Resources"]["GPU"]
            for n in nodes
            if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) >= 1
        ]
        cpus = float(max(1, min(shares))) if shares else 1.0
    scaling = cfg.scaling.model_copy(update={"cpus_per_worker": cpus})
    log.info("scaling.cpus_per_worker: %g (from the cluster)", cpus)
    return cfg.model_copy(update={"scaling": scaling})


def check_train_job(cfg: TrainConfig) -> None:
    """Everything that can be wrong with the data or model, raised before Ray starts."""
    folders = list_class_folders(
        cfg.data.uri, cfg.data.holdout_fraction, cfg.seed, cfg.storage.options_for(cfg.data.uri)
    )
    n_classes = len(folders.classes)
    if cfg.method == "simo2":
        cpb = cfg.simo2.classes_per_batch
        if cpb is not None and cpb > n_classes:
            raise ConfigError(
                f"simo2.classes_per_batch is {cpb} but {cfg.data.uri!r} has {n_classes} classes; "
                f"set it to at most {n_classes} (or null for all classes)"
            )
        if cpb is None and n_classes % cfg.scaling.num_workers:
            raise ConfigError(
                f"simo2.classes_per_batch is null (all {n_classes} classes), which does not split "
                f"over {cfg.scaling.num_workers} workers; set classes_per_batch to a multiple of it"
            )
        try:
            ClassBalancedBatchSampler(
                folders.train_labels,
                cpb,
                cfg.simo2.samples_per_class,
                world_size=cfg.scaling.num_workers,
                seed=cfg.seed,
                replacement=cfg.simo2.replacement,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
    elif cfg.simclr.batch_size > len(folders.train_paths):
        raise ConfigError(
            f"simclr.batch_size {cfg.simclr.batch_size} is larger than the "
            f"{len(folders.train_paths)} training images; lower it"
        )
    build_model(cfg)  # unknown timm name, bad kwargs, bad checkpoint


def _latest_checkpoint(run_uri: str) -> tuple[str | None, int]:
    """Newest complete checkpoint folder Ray Train wrote under the run folder, and its step.

    A folder whose state cannot be read (the process died while it was being copied) is
    skipped for the one before it, so a crash at any moment leaves a resumable run.
    """
    fs, root = open_fs(run_uri)
    if not fs.exists(root):
        return None, 0
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    for path in sorted(fs.glob(posixpath.join(root, "checkpoint_*", STATE_FILE)), reverse=True):
        try:
            with fs.open(path, "rb") as f:
                step = int(torch.load(f, map_location="cpu", weights_only=True)["step"])
        except Exception as e:  # partial or corrupt: fall back to the previous checkpoint
            log.warning("skipping unreadable checkpoint %s: %s", path, e)
            continue
        folder = posixpath.dirname(path)
        return (folder if proto in ("file", "local") else f"{proto}://{folder}"), step
    return None, 0


def require_train_extra(cfg: TrainConfig) -> None:
    """Refuse before Ray starts when the ``[train]`` extra is missing: its plots and kNN
    monitor would otherwise fail only after the last training step."""
    needed = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
    if cfg.tracking == "mlflow":
        needed["mlflow"] = "mlflow-skinny"
    missing = [dist for mod, dist in needed.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise VitflowError(
            f"vitflow train needs {' and '.join(missing)}, which a plain install leaves out: "
            "pip install 'vitflow[train]'"
        )


def run_train(cfg: TrainConfig, *, address: str | None = None) -> TrainResult:
    """Pretrain a backbone with SimCLR or SIMO2 on Ray Train, then export it.

    Rerunning the same job after a crash resumes from the newest checkpoint in
    ``output.uri`` and finishes at the same final step.

    Example:
        >>> from vitflow.config import load_config
        >>> cfg = load_config("jobs/simo2-digits.yaml", schema=TrainConfig)  # doctest: +SKIP
        >>> run_train(cfg).backbone_path  # doctest: +SKIP
    """
    require_train_extra(cfg)
    cfg = resolve_architecture(cfg)  # an exported backbone names its architecture
    check_train_job(cfg)
    run_uri = cfg.output.uri.rstrip("/")
    if "://" not in run_uri:
        run_uri = os.path.abspath(run_uri)
    resume_path, resume_step = _latest_checkpoint(run_uri)
    with ray_session(address) as ray:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg = sized_for_cluster(cfg, ray.nodes())

        if resume_path:
            log.warning("resuming from %s (step %d)", resume_path, resume_step)
        parent, name = run_uri.rsplit("/", 1)
        trainer = TorchTrainer(
            train_worker,
            # Ray Train v2 restores a run with the same name by itself; the explicit path is
            # the fallback when its snapshot is missing (e.g. a run folder copied elsewhere).
            train_loop_config={"job": cfg.model_dump(mode="json"), "resume": resume_path},
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                placement_strategy=cfg.scaling.placement_strategy,
                resources_per_worker={
                    "CPU": cfg.scaling.cpus_per_worker,
                    **({"GPU": 1} if cfg.scaling.use_gpu else {}),
                },
            ),
            run_config=RunConfig(
                name=name,
                storage_path=parent,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
                failure_config=FailureConfig(max_failures=2),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray Train v2 raises TrainingFailedError itself
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VitflowError(
                f"training failed: {first}; checkpoints so far are kept, rerun the same "
                "command to resume"
            ) from e
        if result.error:
            raise VitflowError(f"training failed: {result.error}")
    backbone_path = export_backbone(run_uri)
    _plots(cfg, run_uri, backbone_path)
    return TrainResult(run_uri, cfg.optim.steps, backbone_path, resume_step)


def export_backbone(run_uri: str) -> str:
    """Write the newest checkpoint's backbone + projection head as
    ``RUN/<arch>-<method>-backbone.safetensors``, naming its architecture and preprocessing."""
    path, step = _latest_checkpoint(run_uri)
    if path is None:
        raise VitflowError(f"no checkpoint under {run_uri!r}; is it a vitflow train run folder?")
    fs, folder = open_fs(path)
    with fs.open(posixpath.join(folder, STATE_FILE), "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    cfg = TrainConfig.model_validate(state["config"])
    # The trained weights replace whatever checkpoint the run started from.
    no_init = cfg.model.model_copy(update={"checkpoint": None, "weights": None})
    model = build_model(cfg.model_copy(update={"model": no_init}))
    model.load_state_dict(state["model"])
    mean, std = mean_std(model.backbone)
    bb = Backbone(
        model=model.backbone.eval(),
        data_config=eval_data_config(cfg.data.image_size, mean, std),
        head=model.head.eval(),
        name=cfg.model.name,
        kwargs=dict(cfg.model.kwargs),
    )
    raw = backbone_bytes(bb, {"vitflow.method": cfg.method, "vitflow.step": str(step)})
    out = posixpath.join(
        run_uri, f"{cfg.model.name.split('.')[0]}-{cfg.method}-backbone.safetensors"
    )
    ofs, opath = open_fs(out)
    with ofs.open(opath, "wb") as f:
        f.write(raw)
    log.info("exported %s (step %d)", out, step)
    return out


def _plots(cfg: TrainConfig, run_uri: str, backbone_path: str) -> None:
    """Loss curves and a PCA/t-SNE view of held-out embeddings, as PNGs in the run folder."""
    if "://" in run_uri:
        return  # plots are written locally only
    plot_loss_curves(read_metrics(run_uri), os.path.join(run_uri, "loss_curves.png"))
    from vitflow.backbone import create_backbone
    from vitflow.config import ModelConfig

    bb = create_backbone(ModelConfig(checkpoint=backbone_path))
    folders = list_class_folders(
        cfg.data.uri, cfg.data.holdout_fraction, cfg.seed, cfg.storage.options_for(cfg.data.uri)
    )
    paths = folders.holdout_paths or folders.train_paths[: cfg.monitor.max_images]
    labels = folders.holdout_labels or folders.train_labels[: cfg.monitor.max_images]
    dc = bb.data_config
    tf = EvalTransform(dc["input_size"][1], dc["mean"], dc["std"])
    store = ImageStore(len(paths), storage_options=cfg.storage.options_for(cfg.data.uri))
    x, kept = embed_images(bb.model, store, paths, tf, torch.device("cpu"))
    names = [folders.classes[labels[i]] for i in kept]
    plot_projection(
        np.asarray(x),
        names,
        os.path.join(run_uri, "embedding_projection.png"),
        title=f"{cfg.method} {cfg.model.name}: held-out embeddings",
    )
