"""The ``vitflow`` command line. Commands only parse arguments and call plain functions;
job errors become one sentence on stderr and exit code 1 here, and nowhere else."""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from vitflow.errors import VitflowError

app = typer.Typer(
    name="vitflow",
    help="Image collections to embeddings at any scale (Ray Data + timm).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Shared option types, defined once.
ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="Job config YAML. Optional when --input/--output/--model are given."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key: --set compute.batch_size=16 (repeatable)."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to attach to (e.g. ray://HEAD:10001 or auto). Default: a local Ray.",
    ),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log what vitflow decides (actor sizing, etc.).")
]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@contextmanager
def _job_errors(verbose: bool = False, interrupted="nothing was changed"):
    """Turn whatever stops a job into one sentence on stderr and exit code 1 (130 for
    Ctrl-C); ``--verbose`` adds the traceback. Only the CLI does this."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        # Caught here, inside the command: typer would exit before vitflow could say this.
        hint = interrupted() if callable(interrupted) else interrupted
        typer.echo(f"\ninterrupted: {hint}", err=True)
        raise typer.Exit(code=130) from None
    except Exception as e:
        if verbose:
            traceback.print_exc()
        _fail(_one_sentence(e, verbose))


def _one_sentence(e: Exception, verbose: bool) -> str:
    from vitflow.errors import job_error_in
    from vitflow.retry import is_disk_full, is_outage

    job_error = job_error_in(e)
    if job_error is not None:
        return str(job_error)
    if is_disk_full(e):
        where = next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None)
        return (
            f"disk full{f' writing {where}' if where else ''}: free space there, then rerun "
            "with --resume to finish the job (what was written so far is kept)"
        )
    if is_outage(e):
        return (
            f"the object store could not be reached ({type(e).__name__}: "
            f"{_first_line(e)}); check the endpoint and network, then rerun (with --resume "
            "for an embed job that had started)"
        )
    hint = "" if verbose else "; rerun with --verbose for the traceback"
    return f"unexpected error: {type(e).__name__}: {_first_line(e)}{hint}"


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _load_job(config: Path | None, command: str, overrides: list[str], shortcuts=None):
    """The validated job for ``vitflow COMMAND``: the file (if any), then the ``shortcuts``
    (dotted key -> value, None = not given), then ``--set``. A job whose ``kind:`` (or
    ``--set kind=``) names another command is refused in one sentence naming the right one;
    a file without ``kind:`` runs as COMMAND, with a note (once) to add it."""
    from vitflow.config import load_config, read_yaml, set_path
    from vitflow.errors import ConfigError
    from vitflow.jobkind import a_kind, job_kind, note_missing_kind, schema_for

    data = read_yaml(config) if config is not None else {}
    legacy = config is not None and "kind" not in data
    data["kind"] = job_kind(data, command, path=config)
    for key, value in (shortcuts or {}).items():
        if value is not None:
            set_path(data, key, value)
    cfg = load_config(base=data, overrides=overrides, schema=schema_for(command))
    if cfg.kind != command:  # only a --set kind=... gets here: the file's kind was checked
        raise ConfigError(
            f"--set kind={cfg.kind} asks `vitflow {command}` to run {a_kind(cfg.kind)} job; "
            f"leave it out, or run the job with `vitflow {cfg.kind}`"
        )
    if legacy:
        note_missing_kind(config, command)
    return cfg


@app.command()
def embed(
    config: ConfigArg = None,
    set_: SetOpt = None,
    input_: Annotated[
        str | None, typer.Option("--input", "-i", help="Image folder or URL (source.uri).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output folder or URL (output.uri).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="timm model name (model.name).")
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Weights file, .safetensors or .pth (model.checkpoint)."),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained",
            help="timm's pretrained weights from the Hugging Face hub or a copy of its cache "
            "(model.weights: hub).",
        ),
    ] = False,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Seeded random init, for smoke tests: the vectors mean nothing "
            "(model.weights: random).",
        ),
    ] = False,
    no_pretrained: Annotated[
        bool, typer.Option("--no-pretrained", hidden=True, help="Old spelling of --random-weights.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an interrupted run in the same output.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the job end to end and print the listing, model, features, actor plan "
            "and output layout; start no work.",
        ),
    ] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed a folder of images into sharded parquet.

    Example: vitflow embed --input ./images --output ./embeddings --model resnet18 --random-weights
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if no_pretrained:
        typer.echo("note: --no-pretrained is now spelled --random-weights", err=True)
    if pretrained and (random_weights or no_pretrained):
        _fail("--pretrained and --random-weights contradict each other; pick one")
    weights = "hub" if pretrained else "random" if (random_weights or no_pretrained) else None
    shortcuts = {
        "source.uri": input_,
        "output.uri": output,
        "model.name": model,
        "model.checkpoint": checkpoint,
        "model.weights": weights,
    }
    job: dict = {}

    def resume_hint() -> str:
        # What finishes the job depends on how far an --overwrite run got.
        if not overwrite:
            return "rerun the same command with --resume to finish"
        try:
            from vitflow.sinks import RUN_STATE
            from vitflow.storage import open_fs

            cfg = job["cfg"]
            fs, out = open_fs(cfg.output.uri, cfg.storage.options_for(cfg.output.uri))
            started = fs.exists(f"{out.rstrip('/')}/{RUN_STATE}")
        except Exception:
            started = False
        if started:
            return "rerun with --resume instead of --overwrite to finish"
        return "the old output was being removed; rerun the same command to start again"

    with _job_errors(verbose, resume_hint):
        cfg = job["cfg"] = _load_job(config, "embed", set_ or [], shortcuts)
        if dry_run:
            from vitflow.dryrun import describe_plan, plan_here
            from vitflow.embed import prepare_embed

            plan = prepare_embed(cfg, overwrite=overwrite, resume=resume, fit_pca=False)
            typer.echo(describe_plan(plan, *plan_here(plan.cfg.compute, address, plan.num_params)))
            return
        from vitflow.outputs import output_lock

        # The output is ours before anything is checked against it (and before torch is
        # imported): a second run is told at once that another one is writing there.
        from vitflow.runtime import ray_starting

        # Ray starts on a thread while torch and timm are imported and the job is checked.
        with output_lock(cfg), ray_starting(address, cfg.compute.local_num_cpus):
            from vitflow.embed import prepare_embed, run_embed

            plan = prepare_embed(cfg, overwrite=overwrite, resume=resume)
            typer.echo(
                f"vitflow embed: {len(plan.listing)} images from {cfg.source.uri} -> "
                f"{cfg.output.uri} | model {plan.backbone.name} | features "
                + ", ".join(f"{n}[{d}]" for n, d in plan.dims.items())
            )
            result = run_embed(cfg, overwrite=overwrite, resume=resume, address=address, plan=plan)
    _print_summary(result, plan)


def _print_summary(result, plan) -> None:
    from vitflow.dryrun import weights_line

    m = result.manifest
    lines = [
        "",
        "vitflow embed: done",
        f"  images listed : {result.listed}",
        *(
            [f"  resumed       : {result.resumed_parts} finished parts kept"]
            if result.resumed_parts
            else []
        ),
        f"  ok            : {result.ok}",
        f"  errors        : {result.error}",
        f"  accounted for : {result.ok + result.error} of {result.listed} "
        + ("(every file has a row)" if result.ok + result.error == result.listed else "(MISMATCH)"),
        f"  skipped       : {plan.listing.skipped.describe()}",
        f"  weights       : {weights_line(plan.cfg.model, plan.backbone.checkpoint_sha256)}",
        f"  wall time     : {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)",
        "  features      : " + ", ".join(f"{k} [{v['dim']}]" for k, v in m["features"].items()),
        f"  output        : {result.output_uri}",
        f"  load it with  : vitflow.load_embeddings({str(result.output_uri)!r})",
    ]
    typer.echo("\n".join(lines))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Train job YAML (method, data, model, ...).")],
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Pretrain a backbone with SimCLR or SIMO2 on Ray Train; rerun to resume.

    Example: vitflow train jobs/simo2-digits.yaml --set optim.steps=200
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose, "rerun the same command to resume from the newest checkpoint"):
        cfg = _load_job(config, "train", set_ or [])
        from vitflow.training.trainer import run_train

        typer.echo(
            f"vitflow train: {cfg.method} on {cfg.data.uri} | {cfg.model.name or cfg.model.checkpoint} | "
            f"{cfg.scaling.num_workers} workers | {cfg.optim.steps} steps -> {cfg.output.uri}"
        )
        result = run_train(cfg, address=address)
    lines = ["", "vitflow train: done"]
    if result.resumed_from_step:
        lines.append(f"  resumed from  : step {result.resumed_from_step}")
    lines += [
        f"  steps         : {result.steps}",
        f"  run folder    : {result.run_dir} (metrics.jsonl, loss_curves.png, embedding_projection.png)",
        f"  backbone      : {result.backbone_path}",
        f"  embed with it : vitflow embed --input IMAGES --output OUT --checkpoint {result.backbone_path}",
    ]
    typer.echo("\n".join(lines))


@app.command("export-backbone")
def export_backbone_cmd(
    run_dir: Annotated[str, typer.Argument(help="Run folder of a vitflow train job.")],
) -> None:
    """Export the newest checkpoint's backbone (+ projection head) as .safetensors."""
    from vitflow.training.trainer import export_backbone

    with _job_errors():
        path = export_backbone(run_dir)
    typer.echo(path)


@app.command()
def reindex(
    config: Annotated[
        Path, typer.Argument(help="Job YAML (same format as embed; output.uri is the index).")
    ],
    set_: SetOpt = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Re-embed every file and replace the index (needed after a "
            "model/feature/preprocessing change).",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the job and diff the source against the index; print what would be "
            "embedded, updated and removed; start no work and commit nothing.",
        ),
    ] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Incrementally update a Delta Lake index: embed new and changed images, drop deleted ones,
    commit once. Prints one JSON line (added, updated, deleted, unchanged, errors, seconds).

    Example: vitflow reindex jobs/reindex-nightly.yaml
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose, "nothing was committed; the index is as it was"):
        cfg = _load_job(config, "reindex", set_ or [])
        if dry_run:
            from vitflow.dryrun import describe_plan, plan_here
            from vitflow.reindex import plan_reindex

            plan = plan_reindex(cfg, rebuild=rebuild)
            actors, where = plan_here(cfg.compute, address, plan.embed.num_params)
            typer.echo(
                describe_plan(plan.embed, actors, where).replace(
                    "vitflow embed", "vitflow reindex", 1
                )
            )
            c = plan.counts
            typer.echo(
                f"  index     : version {plan.version} -> {c['added']} added, {c['updated']} "
                f"updated, {c['deleted']} deleted, {c['unchanged']} unchanged"
                + (" (--rebuild: every file re-embedded)" if rebuild else "")
            )
            return
        from vitflow.reindex import run_reindex

        result = run_reindex(cfg, rebuild=rebuild, address=address)
    if not (result.added or result.updated or result.deleted):
        typer.echo(
            f"vitflow reindex: {cfg.output.uri} is up to date; nothing embedded or committed",
            err=True,
        )
    typer.echo(result.summary_json())


@app.command()
def matrix(
    config: Annotated[Path, typer.Argument(help="Job YAML with kind: matrix.")],
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the outputs of an earlier run.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Keep complete outputs, finish interrupted ones, run the rest."
        ),
    ] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed several datasets with several models in one job: OUT/<model>/<dataset>/<split>/,
    with a manifest per model/dataset and, with ood:, each dataset's distance to a reference.

    Example: vitflow matrix jobs/matrix-demo.yaml
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose, "rerun the same command with --resume to finish"):
        cfg = _load_job(config, "matrix", set_ or [])
        from vitflow.runtime import ray_starting

        with ray_starting(address, cfg.compute.local_num_cpus):  # beside the imports and checks
            from vitflow.matrix import run_matrix

            result = run_matrix(
                cfg, overwrite=overwrite, resume=resume, address=address, echo=typer.echo
            )
    typer.echo(
        f"vitflow matrix: done in {result.seconds:.1f} s: {len(result.runs)} outputs under "
        f"{result.output_uri}"
    )
    _print_ls(result.output_uri, cfg.storage.options_for(result.output_uri))
    for model, ood in result.ood.items():
        typer.echo(f"  out of distribution ({model}, vs {ood['reference']['dataset']}):")
        for row in ood["summary"]:
            typer.echo(
                f"    {row['dataset']:<20} n {row['n']:>6}  median {row['median']:.4f}  "
                f"p10 {row['p10']:.4f}  p90 {row['p90']:.4f}"
            )


@app.command("ls")
def ls_cmd(
    output: Annotated[str, typer.Argument(help="A matrix output, or any embed output.")],
) -> None:
    """Print what an output holds: model, dataset, split, rows, ok, errors, features."""
    with _job_errors():
        _print_ls(output, None)


def _print_ls(uri: str, storage_options) -> None:
    from vitflow.matrix import matrix_rows

    rows = matrix_rows(uri, storage_options)
    heads = ("model", "dataset", "split", "rows", "ok", "errors", "features")
    cells = [[("" if r[h] is None else str(r[h])) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    for line in [list(heads), *cells]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


JobsAddressOpt = Annotated[
    str,
    typer.Option(
        "--address", envvar="RAY_ADDRESS", help="Ray dashboard URL, e.g. http://127.0.0.1:8265."
    ),
]


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Job YAML (embed, train or reindex).")],
    address: JobsAddressOpt,
    set_: SetOpt = None,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            help="embed | train | reindex, for a file without kind: (default: its kind).",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the logs; exit with the job's status.")
    ] = False,
    ship_package: Annotated[
        bool,
        typer.Option(
            "--ship-package/--no-ship-package", help="Upload this vitflow to the cluster."
        ),
    ] = True,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Pass --resume to an embed job (finish an interrupted run)."),
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Pass --rebuild to a reindex job.")
    ] = False,
) -> None:
    """Submit a job to a running Ray cluster (Ray Jobs API, token auth).

    Example: vitflow submit jobs/flowers-dinov2.yaml --address http://127.0.0.1:8265 --wait
    """
    from vitflow import submit as jobs

    try:
        job_id = jobs.submit(
            config,
            address=address,
            overrides=set_ or [],
            command=command,
            ship_package=ship_package,
            extra_args=[*(["--resume"] if resume else []), *(["--rebuild"] if rebuild else [])],
        )
        typer.echo(f"submitted {job_id}")
        if wait:
            status = jobs.follow(address, job_id)
            typer.echo(f"job {job_id}: {status}")
            if status != "SUCCEEDED":
                raise typer.Exit(code=1)
    except VitflowError as e:
        _fail(str(e))


jobs_app = typer.Typer(
    help="Inspect and control jobs on a Ray cluster (mirrors `ray job`).", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")


def _jobs_call(fn, *args):
    try:
        return fn(*args)
    except VitflowError as e:
        _fail(str(e))


@jobs_app.command("list")
def jobs_list(address: JobsAddressOpt) -> None:
    """List the cluster's jobs."""
    from vitflow import submit as jobs

    for j in _jobs_call(jobs.list_jobs, address):
        typer.echo(f"{j['job_id']}  {j['status']:<10}  {j['entrypoint']}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: JobsAddressOpt) -> None:
    """Print a job's status."""
    from vitflow import submit as jobs

    typer.echo(_jobs_call(jobs.job_status, address, job_id))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: JobsAddressOpt,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends.")
    ] = False,
) -> None:
    """Print (or follow) a job's logs."""
    from vitflow import submit as jobs

    if follow:
        _jobs_call(jobs.follow, address, job_id)
    else:
        typer.echo(_jobs_call(jobs.job_logs, address, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: JobsAddressOpt) -> None:
    """Stop a running job."""
    from vitflow import submit as jobs

    stopped = _jobs_call(jobs.stop_job, address, job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the job file.")] = Path("job.yaml"),
    example: Annotated[
        str | None,
        typer.Option("--example", help="Start from this example job instead (see --list)."),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the example jobs.")] = False,
) -> None:
    """Write a commented job file to start from.

    Example: vitflow init job.yaml && vitflow embed job.yaml --dry-run
    """
    from vitflow import examples

    if list_:
        for name in examples.list_examples():
            typer.echo(name)
        return
    try:
        written = (
            examples.write_example(example, path) if example else examples.write_example(path=path)
        )
    except VitflowError as e:
        _fail(str(e))
        return
    typer.echo(f"wrote {written}; edit source.uri and the model, then: vitflow embed {written}")


@app.command()
def schema(
    kind: Annotated[str, typer.Argument(help="embed (also reindex) | train | matrix.")] = "embed",
) -> None:
    """Print the JSON Schema of a job file, for editors (YAML language servers) and checks."""
    import json

    from vitflow.config import EmbedConfig

    if kind in ("embed", "reindex"):
        model = EmbedConfig
    elif kind == "train":
        from vitflow.training.config import TrainConfig

        model = TrainConfig
    elif kind == "matrix":
        from vitflow.matrix import MatrixConfig

        model = MatrixConfig
    else:
        _fail(f"unknown job kind {kind!r}; use embed, reindex, train or matrix")
        return
    typer.echo(json.dumps(model.model_json_schema(), indent=2))


@app.command()
def version() -> None:
    """Print the versions of vitflow and the libraries it runs on."""
    from vitflow.manifest import versions

    for k, v in versions().items():
        typer.echo(f"{k} {v}")


__import__("vitflow.cli_analysis").cli_analysis.register(app)  # eval, fit, export
__import__("vitflow.cli_explore").cli_explore.register(app)  # index, search, dedup, report


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
