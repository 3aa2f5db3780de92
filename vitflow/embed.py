"""``run_embed``: the embed job as a plain function (the CLI, notebooks and tests call it).

Everything that can be wrong with the job (config, model name, layer indices, pooling that
does not fit the model, checkpoint keys, source, existing output) is checked by
:func:`prepare_embed` on the driver before Ray runs any work. Then the engine
(:mod:`vitflow.engine`) streams the listing through read+decode actors and model actors,
which stage what they embed as parquet pieces (:mod:`vitflow.sinks.parquet`); parts are
compacted as they complete, and the driver checks, part by part, that every listed file
came out exactly once before writing ``_manifest.json``. ``resume=True`` continues an
interrupted run from the parts and staged batches it left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vitflow import columns
from vitflow.backbone import Backbone, backbone_bytes, create_backbone
from vitflow.config import EmbedConfig
from vitflow.engine import (
    StreamOutput,
    StreamResult,
    decode_settings,
    input_settings,
    stream,
    stream_shared,
)
from vitflow.errors import ConfigError, OutputExistsError, VitflowError
from vitflow.features import FeatureExtractor, FeaturePlan
from vitflow.identity import fingerprint, vector_identity
from vitflow.ledger import Ledger, rebatch
from vitflow.locking import LOCK_NAME, RunLock
from vitflow.manifest import build_manifest, write_manifest
from vitflow.outputs import check_output_location, output_lock
from vitflow.preprocess import Preprocessor
from vitflow.retry import retrying
from vitflow.runtime import ray_starting
from vitflow.sinks import (
    PART_COLUMN,
    RUN_STATE,
    PartsSink,
    clean_staging,
    finished_parts,
    output_files,
    part_file,
    remove_output,
    staged_ids,
)
from vitflow.sources import Listing, list_images
from vitflow.stages import output_schema
from vitflow.storage import (
    list_names,
    remove_file,
    write_atomic,
)

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
    weights: bytes = field(repr=False, default=b"")
    fingerprint: str = ""
    listing_seconds: float = 0.0

    @property
    def dims(self) -> dict[str, int]:
        return {p.name: p.dim for p in self.features}

    @property
    def dense(self) -> tuple[str, ...]:
        """The dense feature sets (float16 maps)."""
        return tuple(p.name for p in self.features if p.dense)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.backbone.model.parameters())


@dataclass
class EmbedResult:
    """What a finished run produced."""

    output_uri: str
    listed: int
    ok: int
    error: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False)
    resumed_parts: int = 0

    @property
    def images_per_second(self) -> float:
        return self.listed / self.seconds if self.seconds > 0 else 0.0


# How job_fingerprint hashes (2: the listing's columns as length and value digests, read from
# the ledger in pieces). A run state of another version cannot be compared, only refused.
FINGERPRINT_VERSION = 2


def job_fingerprint(cfg: EmbedConfig, weights: bytes, listing: Listing) -> str:
    """What must not change between an interrupted run and its resume: the vectors' identity
    (:func:`vitflow.identity.vector_identity`), the source settings that decide what is
    listed, the part layout, and the listed files themselves."""
    h = hashlib.sha256(fingerprint(vector_identity(cfg, weights)).encode())
    stable = {
        # `within` only where set: outputs begun before it existed resume as they were.
        "source": cfg.source.model_dump(
            mode="json", exclude=set() if cfg.source.within else {"within"}
        ),
        "rows_per_file": cfg.output.rows_per_file,
    }
    h.update(json.dumps(stable, sort_keys=True).encode())
    for col in (columns.ID, "size", "mtime"):
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for piece in listing.ledger.batches([col]):
            _hash_values(lengths, values, piece.column(0))
        h.update(lengths.digest() + values.digest())
    return h.hexdigest()


def _hash_values(lengths, values, col: pa.ChunkedArray) -> None:
    """Feed a column to two hashes straight from its Arrow buffers (no Python object per
    row): each string's length to ``lengths`` and its bytes to ``values`` (numbers go to
    ``values``), so the digests are the same however the column is cut into pieces."""
    for arr in col.chunks:
        if pa.types.is_string(arr.type):
            arr = pc.fill_null(arr, "\x00null")
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[
                arr.offset : arr.offset + len(arr) + 1
            ]
            data = arr.buffers()[2]
            lengths.update(np.diff(offsets).astype(np.int32).tobytes())
            values.update(memoryview(data)[offsets[0] : offsets[-1]] if data is not None else b"")
        else:
            values.update(pc.fill_null(arr, -1).to_numpy(zero_copy_only=False).tobytes())


def run_state(plan: EmbedPlan) -> bytes:
    """What an unfinished run leaves in ``RUN_STATE`` for ``--resume`` to check."""
    state = {"fingerprint": plan.fingerprint, "fingerprint_version": FINGERPRINT_VERSION}
    return json.dumps(state).encode()


def prepare_embed(
    cfg: EmbedConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    check_output: bool = True,
    fit_pca: bool = True,
    listing: Listing | None = None,
    dense_pca: dict[str, dict[str, Any]] | None = None,
) -> EmbedPlan:
    """Validate the job end to end without Ray: model, features, source listing, output.

    ``check_output=False`` skips the existing-output rules (reindex owns its output);
    ``fit_pca=False`` leaves dense maps' PCAs unfitted (``--dry-run``: the plan then shows
    the maps' full width); ``listing``: the job's source listed already (several models
    over one source share one listing, so they embed exactly the same files); ``dense_pca``:
    the PCA to project dense maps with instead of fitting one (a matrix job's splits of one
    dataset share the PCA fitted on its first split; an interrupted run keeps its own)."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; pick one")
    require_weights(cfg)
    so = cfg.storage
    backbone = create_backbone(
        cfg.model, storage_options=so.options_for(cfg.model.checkpoint or "")
    )
    pre = Preprocessor(backbone.data_config)
    extractor = FeatureExtractor(
        backbone.model, cfg.features, pre.input_size, cfg.model.extractor, head=backbone.head
    )
    out_fs, out_path = check_output_location(cfg, bucket=check_output)
    t_list = time.perf_counter()
    listing = listing or list_images(cfg.source, so.options_for(cfg.source.uri))
    listing_seconds = time.perf_counter() - t_list
    has_data = any(
        posixpath.basename(p.rstrip("/")) != LOCK_NAME for p in list_names(out_fs, out_path)
    )
    if check_output and has_data and not (overwrite or resume):  # before any PCA is fitted
        raise OutputExistsError(
            f"output {cfg.output.uri!r} already holds data; pass --overwrite to replace it, "
            "--resume to finish an interrupted run, or choose another output.uri"
        )
    if fit_pca and any(p.pca for p in extractor.plans):
        # Dense maps stored as principal components: the PCA is part of the weights the
        # actors get (and of the vectors' identity); a resumed run keeps the one it began with.
        stored = stored_dense_pca(out_fs, out_path) if resume else None
        backbone.dense_pca = stored or dense_pca or fit_dense_pca(cfg, extractor, pre, listing)
        extractor = FeatureExtractor(
            backbone.model,
            cfg.features,
            pre.input_size,
            cfg.model.extractor,
            head=backbone.head,
            pca=backbone.dense_pca,
        )
    cfg = _parts_for_dense(cfg, extractor.plans)
    weights = backbone_bytes(backbone)
    plan = EmbedPlan(cfg, backbone, extractor.plans, listing, out_fs, out_path, weights)
    plan.fingerprint = job_fingerprint(cfg, weights, listing)
    plan.listing_seconds = listing_seconds
    if not check_output:
        return plan
    if resume:
        _check_resumable(plan)
    elif has_data:
        _, foreign = output_files(out_fs, out_path)
        if foreign:
            raise OutputExistsError(
                f"output {cfg.output.uri!r} holds files vitflow did not write (e.g. "
                f"{foreign[0]!r}, {len(foreign)} in all); --overwrite only replaces a previous "
                "vitflow output, so nothing was deleted. Choose a new or empty output.uri"
            )
    return plan


# A part is compacted in memory (its staged pieces read, sorted, written): dense maps are
# large (a ViT-S/16 map at 224 px is 150 KB in float16), so parts of them are kept this small.
MAX_DENSE_PART_BYTES = 512 * 2**20
# A batch's dense maps on the device, float32, with pixel shift's running sum and the copy
# being placed beside the map (x 3): the default batch of a dense job keeps within this.
MAX_DENSE_BATCH_BYTES = 2 * 2**30
MAX_DENSE_BATCH = 32  # the CPU default; GPU defaults (up to 256) are for vectors


def _parts_for_dense(cfg: EmbedConfig, plans: list[FeaturePlan]) -> EmbedConfig:
    """``cfg`` fitted to its dense maps: ``output.rows_per_file`` such that a part's maps
    stay within :data:`MAX_DENSE_PART_BYTES` (lowered when the job left it at its default,
    refused with the value that fits when the job set it higher), and a batch size, where
    the job set none, that keeps a batch's maps within :data:`MAX_DENSE_BATCH_BYTES`."""
    dense = [p for p in plans if p.dense]
    if not dense:
        return cfg
    row_bytes = sum(2 * p.dim for p in dense)
    fits = max(1, MAX_DENSE_PART_BYTES // row_bytes)
    output, compute = cfg.output, cfg.compute
    if output.rows_per_file > fits:
        if "rows_per_file" in output.model_fields_set:
            raise ConfigError(
                f"output.rows_per_file is {output.rows_per_file}, but each row's dense maps "
                f"take {row_bytes / 2**20:.2f} MiB and a part is compacted in memory: set "
                f"output.rows_per_file to {fits} or less"
            )
        log.info("dense maps: %d rows per part (%.2f MiB per row)", fits, row_bytes / 2**20)
        output = output.model_copy(update={"rows_per_file": fits})
    if compute.batch_size is None:
        # On the device a map has all its channels (a PCA projects it after).
        per_image = sum(
            4 * p.shape[0] * p.shape[1] * (p.map_channels or p.shape[2]) * (3 if p.shift else 1)
            for p in dense
        )
        batch = max(1, min(MAX_DENSE_BATCH, MAX_DENSE_BATCH_BYTES // per_image))
        compute = compute.model_copy(update={"batch_size": batch})
    return cfg.model_copy(update={"output": output, "compute": compute})


DENSE_PCA_FILE = "_dense/pca.safetensors"
MAX_PCA_CELLS = 200_000  # map cells the PCA is fitted on (sampled from the images' cells)


def fit_dense_pca(
    cfg: EmbedConfig, extractor: FeatureExtractor, pre: Preprocessor, listing: Listing
) -> dict[str, dict[str, Any]]:
    """Fit each dense feature set's PCA (``pca`` components) on the cells of ``pca_sample``
    images drawn from the listing with a fixed seed, decoded and embedded here on the driver
    exactly as the actors do (the map at the patch stride, each cell normalised; pixel
    shifts average maps in the same space, so they are left out of the fit). Images go 16
    at a time, and each keeps at most its share of :data:`MAX_PCA_CELLS` cells.

    Returns ``{feature: {"components": (k, D), "mean": (D,)}}`` as float32 tensors."""
    import importlib.util

    import torch

    if importlib.util.find_spec("sklearn") is None:
        raise ConfigError(
            "features.pca fits with scikit-learn, which a plain install leaves out: "
            "pip install 'vitflow[analysis]'"
        )
    from sklearn.decomposition import PCA

    from vitflow.decode_task import decode_batch

    wanted = [p for p in extractor.plans if p.pca]
    n = len(listing)
    take = min(n, max(f.pca_sample for f in cfg.features if f.pca))
    chosen = np.sort(np.random.default_rng(0).choice(n, size=take, replace=False))
    pieces, start = [], 0
    for piece in listing.ledger.batches():
        rows = chosen[(chosen >= start) & (chosen < start + piece.num_rows)] - start
        if len(rows):
            pieces.append(piece.take(pa.array(rows, pa.int64())))
        start += piece.num_rows
    sample = pa.concat_tables(pieces) if pieces else listing.ledger.schema.empty_table()
    per_image = max(1, MAX_PCA_CELLS // max(1, take))
    rng = np.random.default_rng(0)
    cells: dict[str, list] = {p.name: [] for p in wanted}
    decoded_ok = 0
    for lo in range(0, sample.num_rows, 16):
        chunk = sample.slice(lo, 16)
        decoded = decode_batch(
            {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in chunk.column_names},
            resize=pre.resize_spec(),
            **decode_settings(cfg, listing.local_root),
        )
        ok = decoded[columns.STATUS] == columns.STATUS_OK
        if not ok.any():
            continue
        decoded_ok += int(ok.sum())
        x = pre.to_tensor(np.ascontiguousarray(decoded[columns.PIXELS][ok]))
        for p in wanted:
            got = (
                extractor.dense_cells(p.name, x).numpy().reshape(int(ok.sum()), -1, p.map_channels)
            )
            for image in got:
                keep = rng.choice(len(image), size=min(per_image, len(image)), replace=False)
                cells[p.name].append(image[np.sort(keep)])
    if not decoded_ok:
        raise ConfigError(
            f"none of the {take} images drawn to fit the dense maps' PCA decoded; fix the "
            "source (see `vitflow embed --dry-run`) or drop features.pca"
        )
    out = {}
    for p in wanted:
        data = np.concatenate(cells[p.name])
        if p.pca > min(data.shape):
            raise ConfigError(
                f"feature {p.name!r}: pca {p.pca} is more than its cells can give "
                f"({data.shape[1]} channels, {data.shape[0]} cells in the sample); lower it"
            )
        fitted = PCA(n_components=p.pca, random_state=0).fit(data)
        out[p.name] = {
            "components": torch.from_numpy(fitted.components_.astype(np.float32)),
            "mean": torch.from_numpy(fitted.mean_.astype(np.float32)),
            "explained": torch.from_numpy(fitted.explained_variance_ratio_.astype(np.float32)),
            "images": torch.tensor([decoded_ok], dtype=torch.int64),
        }
    log.info("dense PCA fitted on %d images", decoded_ok)
    return out


def stored_dense_pca(fs, out: str) -> dict[str, dict[str, Any]] | None:
    """The PCA an interrupted run of this output fitted (``_dense/pca.safetensors``)."""
    from safetensors.torch import load

    path = posixpath.join(out, DENSE_PCA_FILE)
    try:
        raw = retrying(lambda: fs.cat_file(path), what=f"read {path}")
    except FileNotFoundError:
        return None
    pca: dict[str, dict[str, Any]] = {}
    for key, t in load(raw).items():
        feature, part = key.rsplit(".", 1)
        pca.setdefault(feature, {})[part] = t
    return pca


def _write_dense_pca(plan: EmbedPlan) -> None:
    from safetensors.torch import save

    tensors = {
        f"{feature}.{part}": t.contiguous()
        for feature, fitted in (plan.backbone.dense_pca or {}).items()
        for part, t in fitted.items()
    }
    if tensors:
        path = posixpath.join(plan.output_path, DENSE_PCA_FILE)
        write_atomic(plan.output_fs, path, save(tensors), retry_s=plan.cfg.storage.retry_seconds)


def require_weights(cfg: EmbedConfig) -> None:
    """Refuse a job whose product is vectors but that never said where its weights come from:
    random vectors that look like embeddings are worse than no run."""
    if cfg.model.weights_source is None:
        raise ConfigError(
            f"no weights given for {cfg.model.name!r}: a job that writes embeddings needs one of "
            "model.checkpoint: FILE (.safetensors or .pth, local or s3://; --checkpoint FILE), "
            "model.weights: hub (timm's pretrained weights from the Hugging Face hub or a copy "
            "of its cache; --pretrained), or model.weights: random (seeded random init, for "
            "smoke tests; --random-weights)"
        )


def _check_resumable(plan: EmbedPlan) -> None:
    fs, out = plan.output_fs, plan.output_path
    state_path = posixpath.join(out, RUN_STATE)
    if fs.exists(posixpath.join(out, columns.MANIFEST_NAME)) and not fs.exists(state_path):
        raise OutputExistsError(
            f"output {plan.cfg.output.uri!r} is a finished run; nothing to resume"
        )
    if not fs.exists(state_path):
        if any(posixpath.basename(p.rstrip("/")) != LOCK_NAME for p in list_names(fs, out)):
            raise OutputExistsError(
                f"output {plan.cfg.output.uri!r} holds data that no vitflow run left to resume; "
                "choose another output.uri or pass --overwrite instead of --resume"
            )
        return  # nothing was started: --resume on an empty output is a fresh run
    state = json.loads(retrying(lambda: fs.cat_file(state_path), what=f"read {state_path}"))
    if state.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise ConfigError(
            f"cannot resume {plan.cfg.output.uri!r}: it was started by an older vitflow, whose "
            "run state this one cannot check against the job; rerun with --overwrite"
        )
    if state.get("fingerprint") != plan.fingerprint:
        raise ConfigError(
            f"cannot resume {plan.cfg.output.uri!r}: the model weights, feature spec, source "
            "settings or the listed files changed since the interrupted run; rerun with "
            "--overwrite (or use `vitflow reindex` for a source that changes)"
        )


def run_embed(
    cfg: EmbedConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    address: str | None = None,
    plan: EmbedPlan | None = None,
    dense_pca: dict | None = None,
) -> EmbedResult:
    """Embed every image of ``cfg.source`` and write parquet parts + ``_manifest.json``.

    Args:
        cfg: the job.
        overwrite: replace an existing output instead of refusing.
        resume: finish an interrupted run in the same output: finished parts are kept,
            staged batches reused, only the rest is computed.
        address: Ray cluster address to attach to; default: the Ray already initialised in
            this process, else a local one sized to the machine.
        plan: a result of :func:`prepare_embed` to reuse (it is computed otherwise).
        dense_pca: the dense maps' PCA to project with instead of fitting one (a PCA the
            output stored, on --resume, still wins).

    Example:
        >>> from vitflow.config import load_config
        >>> cfg = load_config(base={"source": {"uri": "images"}, "model": {"name": "resnet18"},
        ...                         "output": {"uri": "embeddings"}})
        >>> result = run_embed(cfg)  # doctest: +SKIP
        >>> result.ok + result.error == result.listed  # doctest: +SKIP
        True
    """
    started = time.time()
    # Ray starts while the job is checked (a no-op where it runs or is starting already).
    with output_lock(cfg) as lock, ray_starting(address, cfg.compute.local_num_cpus):
        plan = plan or prepare_embed(cfg, overwrite=overwrite, resume=resume, dense_pca=dense_pca)
        return _run_locked(plan, overwrite, resume, address, started, lock)


def _run_locked(
    plan: EmbedPlan,
    overwrite: bool,
    resume: bool,
    address: str | None,
    started: float,
    lock: RunLock,
) -> EmbedResult:
    begun = _begin(plan, overwrite, resume, lock)
    result = None
    if begun.todo.num_rows:
        result = stream(
            plan.cfg,
            data_config=plan.backbone.data_config,
            weights=plan.weights,
            rows=begun.todo,
            sink=begun.sink,
            address=address,
            source_root=plan.listing.local_root,
            lock=lock,
            model_params=plan.num_params,
        )
    return _finish(plan, begun, result, started, lock)


def run_embed_many(
    cfgs: list[EmbedConfig],
    *,
    overwrite: bool = False,
    address: str | None = None,
    dense_pca: list[dict | None] | None = None,
) -> list[EmbedResult]:
    """Fresh runs of several jobs over one source (the same source, storage and compute;
    a matrix job's models on one split): the source is listed once, and the jobs whose
    models take the same resize and crop run as one stream, in which each file is read
    and decoded once and every model embeds the same pixels (:func:`~vitflow.engine.
    stream_shared`). Each output is an ordinary embed output, as :func:`run_embed` of its
    job writes it; results come in the order of ``cfgs``.

    Args:
        cfgs: the jobs (their outputs must be free, or ``overwrite``).
        overwrite: replace existing outputs.
        address: Ray cluster to attach to; default: this process's Ray, else a local one.
        dense_pca: per job, the dense maps' PCA to use instead of fitting one (or None).
    """
    first = cfgs[0]
    dense_pca = dense_pca or [None] * len(cfgs)
    for c in cfgs[1:]:
        if input_settings(c) != input_settings(first):
            raise ValueError("run_embed_many needs jobs over the same source, storage and compute")
    results: dict[int, EmbedResult] = {}
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(output_lock(c)) for c in cfgs]
        stack.enter_context(ray_starting(address, first.compute.local_num_cpus))
        t_list = time.perf_counter()
        listing = list_images(first.source, first.storage.options_for(first.source.uri))
        listing_seconds = time.perf_counter() - t_list
        plans = []
        for c, pca in zip(cfgs, dense_pca, strict=True):
            plan = prepare_embed(c, overwrite=overwrite, listing=listing, dense_pca=pca)
            plan.listing_seconds = listing_seconds
            # Every model of the split is prepared before the first stream (to group them):
            # keep its weights as the bytes the actors get, not also as live tensors.
            _release_tensors(plan.backbone)
            plans.append(plan)
        for group in shared_input_groups(plans):
            started = time.time()
            begun = [_begin(plans[i], overwrite, False, locks[i]) for i in group]
            todo = begun[0].todo
            streamed: list = [None] * len(group)
            if todo.num_rows:
                streamed = stream_shared(
                    [
                        StreamOutput(
                            plans[i].cfg, plans[i].weights, b.sink, locks[i], plans[i].num_params
                        )
                        for i, b in zip(group, begun, strict=True)
                    ],
                    data_config=plans[group[0]].backbone.data_config,
                    rows=todo,
                    address=address,
                    source_root=listing.local_root,
                )
            for i, b, r in zip(group, begun, streamed, strict=True):
                results[i] = _finish(plans[i], b, r, started, locks[i])
    return [results[i] for i in range(len(cfgs))]


def _release_tensors(backbone: Backbone) -> None:
    """Move a prepared backbone's modules to the meta device: shapes stay (the manifest
    counts parameters), memory goes; the plan's ``weights`` bytes are what runs."""
    for module in (backbone.model, backbone.head, backbone.mae_decoder):
        if module is not None:
            module.to("meta")


def shared_input_groups(plans: list[EmbedPlan]) -> list[list[int]]:
    """The plans (by position) that can share a stream: their models take the same resize
    and crop (their normalisations may differ: those run on the device) and their jobs the
    same part size and compute settings (a dense job's may have been lowered for its maps)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):
        key = (
            Preprocessor(p.backbone.data_config).resize_spec(),
            input_settings(p.cfg),
            p.cfg.output.rows_per_file,
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass
class _Begun:
    """An output made ready for its stream: what is left to embed, and its sink."""

    todo: PartRows
    sink: PartsSink
    resumed_parts: int


def _begin(plan: EmbedPlan, overwrite: bool, resume: bool, lock: RunLock) -> _Begun:
    """Clear (``overwrite``) or take up (``resume``) the output, write its run state and
    return the rows left to embed with the sink that stages and compacts them."""
    cfg, retry_s = plan.cfg, plan.cfg.storage.retry_seconds
    fs, out = plan.output_fs, plan.output_path
    if overwrite:
        lock.check()
        removed = remove_output(fs, out, retry_s)
        log.info("--overwrite: removed %d files of the previous output", removed)
    n, per_part = len(plan.listing), cfg.output.rows_per_file
    done = finished_parts(fs, out) if resume else set()
    all_parts = set(range(-(-n // per_part)))
    clean_staging(fs, out, keep_parts=(all_parts - done) if resume else None, retry_s=retry_s)
    part_sizes = {p: min(per_part, n - p * per_part) for p in sorted(all_parts - done)}
    # Batches staged before the interruption are reused: only the rest is computed.
    staged = staged_ids(fs, out) if resume else {}
    staged_all = set().union(*staged.values()) if staged else set()
    todo = PartRows(plan.listing.ledger, per_part, done, staged_all)
    write_atomic(fs, posixpath.join(out, RUN_STATE), run_state(plan), retry_s=retry_s)
    _write_dense_pca(plan)  # with the run state: a resume finds the PCA it began with
    schema = output_schema(plan.dims, mae_loss=cfg.model.mae_loss is not None, dense=plan.dense)
    sink = PartsSink(fs, out, schema, part_sizes, staged, retry_s)
    return _Begun(todo, sink, len(done))


def _finish(
    plan: EmbedPlan, begun: _Begun, result: StreamResult | None, started: float, lock: RunLock
) -> EmbedResult:
    """After the stream: check the output part by part and write its manifest."""
    cfg, retry_s = plan.cfg, plan.cfg.storage.retry_seconds
    fs, out = plan.output_fs, plan.output_path
    if result is None:  # everything left was staged already: just finish those parts
        begun.sink.start(None)
        begun.sink.finish()
    lock.check()  # never tidy or finalise an output another run has taken over
    clean_staging(fs, out, retry_s=retry_s)
    t_verify = time.perf_counter()
    counts, parts = _verify_output(plan)
    seconds = time.time() - started
    timings = {
        "listing_seconds": round(plan.listing_seconds, 3),
        **(result.timings if result else {}),
        "verify_seconds": round(time.perf_counter() - t_verify, 3),
    }
    manifest = build_manifest(
        cfg,
        plan.backbone,
        plan.features,
        counts=counts,
        seconds=seconds,
        stats={**(result.stats if result else {}), "resumed_parts": begun.resumed_parts},
        actors=result.actors.__dict__ if result and result.actors else None,
        listing=plan.listing,
        parts=parts,
        timings=timings,
        identity=vector_identity(cfg, plan.weights),
    )
    write_manifest(fs, out, manifest, retry_s=retry_s)
    remove_file(fs, posixpath.join(out, RUN_STATE), retry_s=retry_s)
    return EmbedResult(
        cfg.output.uri,
        counts["listed"],
        counts["ok"],
        counts["error"],
        seconds,
        manifest,
        begun.resumed_parts,
    )


class PartRows:
    """The rows an embed run still has to compute, read from the ledger in pieces: each
    listed row with its part number (:data:`PART_COLUMN`: ``row // rows_per_file``), less
    the rows of finished parts and the rows already staged."""

    def __init__(self, ledger: Ledger, rows_per_file: int, done: set[int], staged: set[str]):
        self.ledger, self.rows_per_file = ledger, rows_per_file
        self.done = pa.array(sorted(done), pa.int64())
        self.staged = pa.array(sorted(staged), pa.string())
        self.schema = ledger.schema.append(pa.field(PART_COLUMN, pa.int64()))
        self.num_rows = (
            ledger.num_rows
            if not done and not staged
            else sum(t.num_rows for t in self._pieces([columns.ID]))
        )

    def _pieces(self, names: list[str] | None = None):
        start = 0
        for piece in self.ledger.batches(names):
            parts = pa.array((start + np.arange(piece.num_rows)) // self.rows_per_file)
            start += piece.num_rows
            piece = piece.append_column(PART_COLUMN, parts)
            if len(self.done) or len(self.staged):
                keep = pc.invert(
                    pc.or_(pc.is_in(parts, self.done), pc.is_in(piece[columns.ID], self.staged))
                )
                piece = piece.filter(keep)
            yield piece

    def batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """The rows in order, in tables of exactly ``batch_rows`` rows (the last one fewer)."""
        return rebatch(self._pieces(), self.schema, batch_rows)


def _verify_output(plan: EmbedPlan) -> tuple[dict[str, int], dict[str, int]]:
    """Check, part by part, that every listed id is there exactly once.

    Returns ``(counts, parts)``: ok/error/listed counts, and each part file's row count
    (recorded in the manifest, so readers can tell a complete output from a damaged one).
    One part is in memory at a time."""
    rows = plan.cfg.output.rows_per_file
    fs, out = plan.output_fs, plan.output_path
    counts = {"listed": len(plan.listing), "ok": 0, "error": 0}
    parts: dict[str, int] = {}
    problems = []
    for number, ids in enumerate(plan.listing.ledger.batches([columns.ID], batch_rows=rows)):
        name = part_file(number)
        want = ids.column(0)
        try:
            got = _read_columns(fs, posixpath.join(out, name), [columns.ID, columns.STATUS])
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        ids = got.column(columns.ID)
        distinct = pc.count_distinct(ids).as_py()
        missing = len(want) - pc.sum(pc.is_in(want, ids)).as_py()
        if got.num_rows != len(want) or distinct != got.num_rows or missing:
            problems.append(
                f"{name} has {got.num_rows} rows for {len(want)} files "
                f"({got.num_rows - distinct} duplicated, {missing} missing)"
            )
        ok = pc.sum(pc.equal(got.column(columns.STATUS), columns.STATUS_OK)).as_py() or 0
        counts["ok"] += ok
        counts["error"] += got.num_rows - ok
        parts[name] = got.num_rows
    if problems:
        raise VitflowError(
            f"output check failed: {'; '.join(problems[:3])}"
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            + "; rerun with --resume to complete it"
        )
    return counts, parts


def _read_columns(fs, path: str, names: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    def read():
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=names)

    return retrying(read, what=f"read {path}")
