"""The train job's configuration (``vitflow train JOB.yaml``): same rules as the embed job —
unknown keys rejected, ``--set`` overrides, the worker re-validates it from a plain dict."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vitflow.config import ModelConfig, StorageConfig, _Section


class TrainDataConfig(_Section):
    uri: str = Field(description="Folder (or fsspec URL) with one subfolder per class.")
    image_size: int = Field(64, ge=8, description="Training crop size (square).")
    holdout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.9,
        description="Share of each class held out for the kNN monitor when the folder has no "
        "val/validation/test split.",
    )
    cache_images: int = Field(
        20_000,
        ge=0,
        description="Keep up to this many decoded images in memory per training worker "
        "(shared out among its loader processes; bounded by cache_mb too). A corpus larger "
        "than the cache streams.",
    )
    cache_mb: int = Field(
        1024,
        ge=0,
        description="Most memory of decoded pixels cached per training worker (MiB), shared "
        "out among its loader processes (rank 0 keeps one more cache of these bounds for the "
        "kNN monitor).",
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="Processes that read, decode and augment batches beside each training "
        "worker (torch DataLoader workers); null = scaling.cpus_per_worker - 1, 0 = in the "
        "training process.",
    )
    max_error_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Stop (resumably) when more than this share of the training images drawn "
        "could not be read or decoded; each is replaced by another image of its class and "
        "counted in metrics.jsonl (skipped_images, bad_images). null = off.",
    )


class TrainModelConfig(ModelConfig):
    name: str | None = Field(
        None,
        description="timm backbone name, e.g. resnet18 or vit_small_patch16_224. May be left "
        "out when model.checkpoint is a vitflow-exported backbone (it names its architecture).",
    )
    embedding_dim: int = Field(16, ge=2, description="Projection head output width.")
    head_hidden_dim: int = Field(512, ge=0, description="Head hidden width; 0 = linear head.")

    @model_validator(mode="after")
    def _no_mae_loss(self) -> TrainModelConfig:
        if self.mae_loss is not None:
            raise ValueError("model.mae_loss is an embed option; training does not compute it")
        return self


class SIMO2Config(_Section):
    samples_per_class: int = Field(16, ge=2, description="Images of each class in a batch.")
    classes_per_batch: int | None = Field(
        8, ge=2, description="Classes in each global batch; null = all classes."
    )
    orth_lean: float = Field(
        1 / 137, ge=0.0, le=0.5, description="Target t of the orthogonality terms."
    )
    replacement: Literal["auto", "never"] = Field(
        "auto",
        description="auto: a class with fewer images than samples_per_class is sampled with "
        "replacement (a warning names it); never: refuse such classes.",
    )


class SimCLRConfig(_Section):
    temperature: float = Field(0.5, gt=0.0, description="NT-Xent temperature.")
    batch_size: int = Field(256, ge=2, description="Global batch (images; two views each).")


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay.")
    steps: int = Field(1000, ge=1, description="Optimizer steps in the whole run.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, then cosine decay to 0.")


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    cpus_per_worker: float | None = Field(
        None,
        gt=0.0,
        description="CPUs reserved per worker; its DataLoader processes (data.loader_workers) "
        "run within them. null: 1 for a CPU worker; for a GPU worker, its node's CPUs per GPU "
        "less one (the fewest over the cluster's GPU nodes), so each GPU gets the cores that "
        "feed it.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills nodes, SPREAD spreads them."
    )


class TrainComputeConfig(_Section):
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast dtype of the forward pass (the loss and the weights stay fp32). "
        "fp16 scales the loss (GradScaler) and needs scaling.use_gpu; bf16 runs on CPU too.",
    )
    channels_last: bool = Field(False, description="Run the model in channels_last memory format.")
    compile: bool = Field(False, description="torch.compile the model in each training worker.")


class TrainOutputConfig(_Section):
    uri: str = Field(
        description="Run folder: checkpoints, metrics.jsonl, plots, exported backbone."
    )
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl lines.")


class MonitorConfig(_Section):
    knn_every: int = Field(100, ge=0, description="Steps between kNN checks; 0 = off.")
    knn_k: int = Field(20, ge=1, description="Neighbours of the weighted kNN classifier.")
    max_images: int = Field(2000, ge=10, description="Cap on train images embedded per check.")


class TrainConfig(_Section):
    """One pretraining job. Load with ``load_config(path, schema=TrainConfig)``."""

    kind: Literal["train"] = Field(
        "train",
        description="What the job is: train, run by `vitflow train` (and by `vitflow submit`). "
        "A file without it runs as a train job (deprecated).",
    )
    method: Literal["simclr", "simo2"] = Field("simo2", description="Training objective.")
    data: TrainDataConfig
    model: TrainModelConfig
    simo2: SIMO2Config = Field(default_factory=SIMO2Config)
    simclr: SimCLRConfig = Field(default_factory=SimCLRConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    compute: TrainComputeConfig = Field(default_factory=TrainComputeConfig)
    output: TrainOutputConfig
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="Object-storage settings for data.uri and model.checkpoint (s3://...).",
    )
    tracking: Literal["none", "mlflow"] = Field("none", description="Also log to MLflow.")
    seed: int = Field(
        0,
        ge=0,
        description="Seeds the random init of backbone and head (unless they come from a "
        "checkpoint or the hub), the batches and their augmentation.",
    )

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        w = self.scaling.num_workers
        if self.method == "simclr" and self.simclr.batch_size % w:
            raise ValueError(
                f"simclr.batch_size {self.simclr.batch_size} is not divisible by "
                f"scaling.num_workers {w}; use a multiple of {w}"
            )
        cpb = self.simo2.classes_per_batch
        if self.method == "simo2" and cpb is not None and cpb % w:
            raise ValueError(
                f"simo2.classes_per_batch {cpb} is not divisible by scaling.num_workers {w} "
                "(each worker takes whole classes); use a multiple of the worker count"
            )
        if self.compute.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "compute.precision fp16 is for GPUs (scaling.use_gpu: true), where its loss "
                "scaling keeps small gradients alive; on CPU use bf16"
            )
        return self
