"""The embed job's configuration: YAML file + ``--set`` overrides -> a frozen pydantic model.

Every section rejects unknown keys, so a typo (``pool: clss``, ``batchsize: 8``) fails at
load time with a message naming the key, instead of being silently ignored.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitflow import columns
from vitflow.errors import ConfigError
from vitflow.jobfile import echo, field_annotation, parse_value, read_job_file
from vitflow.pooling import POOL_NAMES, describe_pools

# The pool names a job may write, from the one registry in vitflow.pooling (a Literal, so the
# JSON Schema lists them as an enum and a typo is refused naming every allowed value).
PoolName = Literal[POOL_NAMES]  # type: ignore[valid-type]
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".avif",
    ".heic",
    ".heif",
)
_FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Section):
    """Object-storage settings. Credentials never go here: they come from the standard
    environment variables (AWS_ACCESS_KEY_ID, ...), AWS config files or instance roles."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, R2, ...); default AWS or AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(None, description="Bucket region; default AWS_DEFAULT_REGION.")
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets.")
    client_retries: int | None = Field(
        None,
        ge=1,
        description="Attempts per request inside the S3 client (botocore); null = its default. "
        "vitflow retries a failed read 4 more times with backoff on top.",
    )
    read_in_flight: int = Field(
        16,
        ge=1,
        description="Reads in flight per decode block, so object-store latency is hidden.",
    )
    retry_seconds: float = Field(
        120.0,
        gt=0,
        description="How long vitflow keeps retrying (with backoff) while the store cannot be "
        "reached, for reads and writes alike; past it the run stops, resumably, in one "
        "sentence. A single unreadable file is retried 4 times and becomes an error row.",
    )

    def options_for(self, uri: str) -> dict[str, Any]:
        """fsspec storage options for ``uri`` (empty for local paths and other protocols)."""
        if uri.split("://", 1)[0] not in ("s3", "s3a") or "://" not in uri:
            return {}
        opts: dict[str, Any] = {}
        if self.anonymous:
            opts["anon"] = True
        # An endpoint from the driver's environment travels with the job (it is not a
        # secret): workers on a cluster do not share the driver's environment variables.
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        config: dict[str, Any] = {"max_pool_connections": max(10, self.read_in_flight)}
        if self.client_retries:
            config["retries"] = {"max_attempts": self.client_retries, "mode": "standard"}
        opts["config_kwargs"] = config
        return opts


class SourceConfig(_Section):
    uri: str = Field(description="Folder (searched recursively) or fsspec URL of the images.")
    labels: Literal["folder", "none"] = Field(
        "folder", description="folder: label = the image's parent folder name; none: no label."
    )
    split: Literal["auto"] | None = Field(
        "auto",
        description="auto: a path part named train/validation/val/test is the split; null: none.",
    )
    within: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Read this folder as the folder of this name inside a larger collection: "
        "ids and labels come from <within>/<path>, and the split is <within> (`vitflow matrix` "
        "sets it for each split, so a split's rows are the whole dataset's). For a list of "
        "files: every row's split is <within> and its id is made from <within>/<path as "
        "written>, so two lists of one dataset never share an id.",
    )
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, description="File name endings (case-insensitive) that are listed."
    )
    max_pixels: int = Field(
        89_478_485,
        gt=0,
        description="Images with more pixels are error rows (decompression-bomb guard).",
    )
    max_file_bytes: int = Field(
        1 << 31,
        gt=0,
        description="Larger files are error rows and are never read (a stray 30 GB TIFF must "
        "not take down the decode workers).",
    )
    decode_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="A file whose decode + resize takes longer is cut off as an error row.",
    )
    follow_symlinks: bool = Field(
        False,
        description="false: a file symlink leading outside the source becomes an error row "
        "(never read) and folder symlinks are counted, not walked; true: follow both (a folder "
        "link back to a folder above it is not entered). Links inside the source are always read.",
    )

    @field_validator("extensions")
    @classmethod
    def _lower_dotted(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in v)


class MaeLossConfig(_Section):
    """Each image's masked-autoencoder reconstruction loss, as a ``mae_loss`` column: how well
    an MAE "understands" the image (higher: further from what it was trained on)."""

    mask_ratio: float = Field(
        0.75, gt=0.0, lt=1.0, description="Share of patches hidden from the encoder."
    )
    seed: int = Field(
        0, description="Seeds each image's mask (a pure function of seed and image id)."
    )
    norm_pix_loss: bool = Field(
        True,
        description="Targets are each patch normalised by its own mean and variance, as the "
        "paper's checkpoints were trained; false for the official 'visualize' checkpoints.",
    )
    decoder_heads: int = Field(
        16, ge=1, description="Attention heads of the decoder (16 in every official checkpoint)."
    )


class ModelConfig(_Section):
    name: str | None = Field(
        None,
        description="Any timm model name, e.g. vit_small_patch14_dinov2.lvd142m. May be left "
        "out when model.checkpoint is a vitflow-exported backbone (it names its architecture).",
    )
    weights: Literal["hub", "random"] | None = Field(
        None,
        description="Where the weights come from when model.checkpoint is not set. hub: timm's "
        "pretrained weights, from the Hugging Face hub or a copy of its cache on this machine "
        "(HF_HUB_OFFLINE=1); random: seeded random init, for smoke tests and benchmarks (the "
        "vectors mean nothing). Embed and reindex refuse to run without one of the three.",
    )
    checkpoint: str | None = Field(
        None,
        description="Local path or URL of a .safetensors or .pth state dict to load (official "
        "layouts such as Meta's DINOv2, MAE and OpenAI CLIP are converted by timm's filter).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (e.g. img_size, depth).",
    )
    extractor: Literal["auto", "intermediates", "hooks"] = Field(
        "auto",
        description="auto: timm forward_intermediates when the model has it, else forward hooks.",
    )
    mae_loss: MaeLossConfig | None = Field(
        None,
        description="Also write each image's MAE reconstruction loss (column mae_loss). Needs "
        "model.checkpoint with the MAE decoder's weights beside the encoder's (the official MAE "
        "checkpoints' decoder_* keys); timm's MAE weights are encoder-only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_alias(cls, data: Any) -> Any:
        # `pretrained: true` was the first spelling of `weights: hub`; old job files keep working.
        if isinstance(data, dict) and "pretrained" in data:
            data = dict(data)
            pretrained = data.pop("pretrained")
            if pretrained not in (True, False, None):
                raise ValueError(f"model.pretrained must be true or false, got {echo(pretrained)}")
            if pretrained:
                if data.get("weights") not in (None, "hub"):
                    raise ValueError(
                        f"model.pretrained: true contradicts model.weights: {data['weights']}; "
                        "keep only model.weights"
                    )
                data["weights"] = "hub"
        return data

    @model_validator(mode="after")
    def _name_or_checkpoint(self) -> ModelConfig:
        if not self.name and not self.checkpoint:
            raise ValueError("give model.name (a timm model name) or model.checkpoint")
        if self.checkpoint and self.weights is not None:
            raise ValueError(
                f"model.weights: {self.weights} and model.checkpoint both say where the weights "
                "come from; keep one of them"
            )
        if self.mae_loss is not None and not self.checkpoint:
            raise ValueError(
                "model.mae_loss needs model.checkpoint: a file with the MAE decoder's weights "
                "beside the encoder's (an official MAE checkpoint); timm's hub weights for MAE "
                "models are encoder-only"
            )
        return self

    @property
    def weights_source(self) -> str | None:
        """``checkpoint`` | ``hub`` | ``random``, or None when the job has not said."""
        return "checkpoint" if self.checkpoint else self.weights


class ShiftConfig(_Section):
    """Pixel-shift upscaling of a dense map (vitflow.dense): the image shifted by each offset
    in each direction (wrap-around), each shifted copy's map placed back at pixel resolution
    with its shift undone, all averaged with the unshifted map's."""

    pixels: list[int] = Field(
        min_length=1, description="Shift offsets in pixels, e.g. [7, 4, 2] for DINOv2's 14 px."
    )
    neighbourhood: Literal["von_neumann", "moore"] = Field(
        "von_neumann", description="von_neumann: 4 directions per offset; moore: 8."
    )
    stride: int | None = Field(
        None,
        ge=1,
        description="Output stride in pixels; null: the greatest common divisor of the patch "
        "size and the offsets. It must divide both.",
    )

    @field_validator("pixels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(p < 1 for p in v):
            raise ValueError(f"shift pixels must be positive, got {v}")
        return v


class FeatureConfig(_Section):
    name: str = Field("emb", description="Output column name of this feature set.")
    source: Literal["backbone", "head"] = Field(
        "backbone",
        description="backbone: pooled block outputs; head: the projection head of a vitflow-"
        "trained checkpoint applied to the backbone's pooled output (layers/pool unused).",
    )
    layers: int | list[int] = Field(
        default_factory=lambda: [-1],
        description="int k = the last k blocks; list = block indices (negatives from the end).",
    )
    pool: PoolName = Field("mean", description=describe_pools())
    aggregate: Literal["concat", "mean"] = Field("concat", description="Across the layers.")
    norm: bool = Field(False, description="Apply the model's final norm to each intermediate.")
    normalize: Literal["l2", "none"] = Field(
        "l2", description="Applied last (for a dense map: to each cell's vector)."
    )
    dense: bool = Field(
        False,
        description="The layers' patch-token map, (H/p, W/p, D) per image, stored float16, "
        "instead of a pooled vector (pool is not used).",
    )
    shift: ShiftConfig | None = Field(
        None, description="Pixel-shift upscaling of the dense map to a finer stride."
    )
    pca: int | None = Field(
        None,
        ge=1,
        description="Dense maps only: keep this many principal components of each cell, from "
        "a PCA fitted on pca_sample images before the run (stored with the output).",
    )
    pca_sample: int = Field(
        64, ge=1, description="Images the dense map's PCA is fitted on (seeded sample)."
    )

    @model_validator(mode="after")
    def _dense_rules(self) -> FeatureConfig:
        if self.shift is not None and not self.dense:
            raise ValueError(f"feature {self.name!r}: shift upscales a dense map; set dense: true")
        if self.pca is not None and not self.dense:
            raise ValueError(
                f"feature {self.name!r}: pca reduces a dense map's cells; for vectors fit one "
                "after the run (vitflow fit --pca)"
            )
        if self.dense and self.source == "head":
            raise ValueError(
                f"feature {self.name!r}: a projection head gives no map; dense needs source: backbone"
            )
        return self

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not _FEATURE_NAME.match(v):
            raise ValueError(
                f"feature name must be a plain identifier (letters, digits, _), got {v!r}"
            )
        if v in (*columns.META_COLUMNS, columns.MAE_LOSS):
            raise ValueError(f"feature name {v!r} clashes with the built-in column of that name")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"layers as an int is 'the last k blocks' and must be >= 1, got {v}")
        if isinstance(v, list):
            if not v:
                raise ValueError("layers list is empty; use e.g. [-1] for the last block")
            if len(set(v)) != len(v):
                raise ValueError(f"layers list has repeated indices: {v}")
        return v


class OutputConfig(_Section):
    uri: str = Field(description="Folder or fsspec URL the parquet shards are written under.")
    rows_per_file: int = Field(
        10_000,
        gt=0,
        description="Rows per parquet part (consecutive listed files); also the unit a "
        "resumed run never recomputes.",
    )


class ComputeConfig(_Section):
    batch_size: int | None = Field(
        None,
        gt=0,
        description="Images per model forward pass; null = 32 on CPU, and on GPU by model size "
        "(256 below 100M parameters, 128 below 400M, else 64).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per actor where the cluster has GPUs, else CPU."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype for the forward pass (fp16 needs CUDA)."
    )
    num_actors: int | None = Field(
        None, gt=0, description="Model replicas; null = sized from the cluster's resources."
    )
    actor_num_cpus: float | None = Field(
        None, gt=0, description="CPUs reserved per model actor; null = sized from the cluster."
    )
    num_gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per model actor; null = 1 where GPUs exist, else 0."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads in a CPU actor; null = sized from the node."
    )
    decode_num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per read+decode actor; null = one decode actor per core "
        "beside the model actors (fractions on CPU-only nodes, 1 with GPUs).",
    )
    decode_batch_size: int | None = Field(
        None,
        gt=0,
        description="Images per decode block; null = min(batch_size, 64). Small blocks reach "
        "the model within seconds and keep decode and the model overlapped.",
    )
    decode: Literal["cpu", "gpu", "auto"] = Field(
        "cpu",
        description="Where images are decoded. cpu: CPU actors, exactly timm's eval transform. "
        "gpu: JPEGs decoded in batches on the model actor's GPU (nvJPEG via torchvision) and "
        "resized there, other files on the CPU in the actor; pixels differ slightly from the "
        "exact path. auto: gpu when the actors have CUDA.",
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode large JPEGs at 1/2-1/8 scale in the DCT domain, never below what the "
        "model's resize reads: 2-8x faster for camera photos; pixels differ slightly from "
        "timm's exact transform (see README).",
    )
    batches_in_flight: int | None = Field(
        None,
        ge=1,
        le=4,
        description="Batches a model actor works on at once: while one runs its forward, the "
        "next one's pixels go to the device (or are decoded there with decode: gpu). null = 2 "
        "on GPU actors, 1 on CPU. Each holds its batch in device memory.",
    )
    channels_last: bool = Field(False, description="Run the model in channels_last memory format.")
    compile: bool = Field(False, description="torch.compile the model in each actor.")
    local_num_cpus: int | None = Field(
        None,
        gt=0,
        description="CPUs of the local Ray vitflow starts when no cluster is given; null = "
        "Ray's own detection, which respects a container's CPU limit.",
    )
    max_error_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Abort (resumably) when more than this share of files fail; null = off.",
    )


class EmbedConfig(_Section):
    """One embed or reindex job. Load it with :func:`load_config`."""

    kind: Literal["embed", "reindex"] = Field(
        "embed",
        description="What the job is, and so the command that runs it: embed (parquet parts, "
        "`vitflow embed`) or reindex (the incremental Delta index, `vitflow reindex`). "
        "`vitflow submit` runs the command of this name, and each command refuses a job of "
        "another kind. A file without it runs as the command given (deprecated).",
    )
    source: SourceConfig
    model: ModelConfig
    features: list[FeatureConfig] = Field(
        default_factory=lambda: [FeatureConfig()],
        description="Named feature sets, all computed from one forward pass.",
    )
    output: OutputConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("kind", mode="before")
    @classmethod
    def _not_a_train_job(cls, v: Any) -> Any:
        if v == "train":
            raise ValueError(
                "a train job (kind: train) is read as a training config; run it with "
                "`vitflow train JOB.yaml`"
            )
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> EmbedConfig:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(dupes)}")
        if not names:
            raise ValueError("features is empty; give at least one feature set")
        return self


def apply_override(
    data: dict[str, Any], assignment: str, schema: type[BaseModel] | None = None
) -> None:
    """Apply one ``dotted.path=value`` override to ``data`` in place.

    The value is typed by the field it sets in ``schema`` (default :class:`EmbedConfig`):
    text for string fields, the YAML 1.2 core reading for the rest (see
    :func:`vitflow.jobfile.parse_value`). List items are addressed by index
    (``features.0.pool=cls``); the index one past the end appends a new item.
    """
    if "=" not in assignment:
        raise ConfigError(
            f"--set expects key=value, got {echo(assignment)} (e.g. --set compute.batch_size=16)"
        )
    key, raw = assignment.split("=", 1)
    key = key.strip()
    annotation = field_annotation(schema or EmbedConfig, key.split("."))
    set_path(data, key, parse_value(raw.strip(), annotation))


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at the dotted ``key`` of a nested dict/list, creating sections on the way."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"config key {key!r} has an empty part")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        parent = ".".join(parts[:i]) or "config"
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(
                    f"{key}: {parent} is a list; address its items by index, not {part!r}"
                )
            idx = int(part)
            if idx > len(node):
                raise ConfigError(f"{key}: index {idx} is past the end of a list of {len(node)}")
            if idx == len(node):
                node.append({})
        elif isinstance(node, dict):
            idx = part
            if not last and node.get(part) is None:
                # Only `features` is a list section; absent, it starts as the one default
                # feature set, so `features.1.name=x` adds a second one as a user expects.
                node[part] = [{}] if ".".join(parts[: i + 1]) == "features" else {}
        else:
            raise ConfigError(f"{key}: {parent} is a value, not a section")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def describe_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One readable line per problem, naming the key and, for unknown keys, the allowed ones."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            section = _section_for(model, e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else ""
            lines.append(
                f"unknown key '{loc}'" + (f" (allowed here: {allowed})" if allowed else "")
            )
        elif e["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:
            got = e.get("input")
            got_s = f" (got {echo(got)})" if not isinstance(got, dict | list) else ""
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return "; ".join(lines)


def _section_for(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = cur.model_fields.get(part) if isinstance(cur, type) else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if cur is None:
            return None
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A job file's mapping (YAML 1.2 core, size/encoding/alias checked: see jobfile)."""
    return read_job_file(path)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    schema: type[BaseModel] | None = None,
) -> Any:
    """Build a job config from a YAML file (or a dict) and ``key=value`` overrides.

    Args:
        path: YAML job file, or None.
        overrides: ``dotted.key=value`` strings applied in order (values parsed as YAML).
        base: a dict used when there is no file.
        schema: the config class; default :class:`EmbedConfig` (``TrainConfig`` for training).

    Example:
        >>> cfg = load_config(base={"source": {"uri": "imgs"}, "model": {"name": "resnet18"},
        ...                         "output": {"uri": "out"}}, overrides=["compute.batch_size=8"])
        >>> cfg.compute.batch_size
        8
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    schema = schema or EmbedConfig
    for o in overrides:
        apply_override(data, o, schema)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid job config: " + describe_validation_error(e, schema)) from e
