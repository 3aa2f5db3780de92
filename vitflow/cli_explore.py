"""The exploring commands of the ``vitflow`` CLI: ``index``, ``search``, ``dedup`` and
``report``.

Each only parses its arguments and calls the plain function notebooks and tests call
(:mod:`vitflow.analysis.search`, ``dedup``, ``report``); errors become one sentence and exit
code 1 through the CLI's own handler. :func:`register` adds them to the app
(``vitflow/cli.py`` calls it once).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from vitflow.cli_analysis import FeatureOpt, OutputArg, VerboseOpt

SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds the samples drawn.")]


def index_command(
    output: OutputArg,
    feature: FeatureOpt = None,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="flat (exact) | ivf (inverted lists) | auto: flat up to 100,000 rows, else ivf.",
        ),
    ] = "auto",
    nlist: Annotated[
        int | None, typer.Option("--nlist", min=1, help="IVF lists (default ~4*sqrt(rows)).")
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            min=1,
            help="IVF lists a query visits (default: smallest with recall@10 >= 0.95).",
        ),
    ] = None,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Build a nearest-neighbour index (faiss, cosine) in OUTPUT/_index/ and report recall@10.

    Example: vitflow index ./embeddings --feature emb
    """
    from vitflow.cli import _job_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose):
        from vitflow.analysis.search import build_index

        meta = build_index(
            output, feature=feature, kind=kind, nlist=nlist, nprobe=nprobe, seed=seed
        )
    r = meta["recall_at_10"]
    tried = r.get("by_nprobe")
    typer.echo(
        "\n".join(
            [
                f"vitflow index: {meta['feature']} [{meta['dim']}], {meta['rows']:,} rows",
                f"  index     : {meta['factory']} ({meta['kind']}), inner product on "
                "L2-normalised vectors (cosine)"
                + (f", nprobe {meta['nprobe']}" if meta["nprobe"] else ""),
                f"  recall@10 : {r['value']:.4f} against exact search, {r['queries']} sampled "
                "queries"
                + (
                    " (by nprobe: " + ", ".join(f"{p}: {v:.3f}" for p, v in tried.items()) + ")"
                    if tried
                    else ""
                ),
                f"  wrote     : {meta['uri']}",
            ]
        )
    )


def search_command(
    output: OutputArg,
    image: Annotated[
        str | None,
        typer.Option("--image", "-i", help="A query image, embedded exactly as the job did."),
    ] = None,
    id: Annotated[str | None, typer.Option("--id", help="Or the id of a row as the query.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Neighbours to print.")] = 10,
    feature: FeatureOpt = None,
    job: Annotated[
        str | None,
        typer.Option(
            "--job",
            help="Embed with this job file instead of the stored job (a reindexed index needs "
            "its reindex job); it must give the output's vectors.",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Print the nearest rows (path, label, cosine similarity) of a query image or row.

    Uses OUTPUT/_index/ when built (vitflow index), else an exact search over every row.

    Example: vitflow search ./embeddings --image query.jpg -k 10
    """
    from vitflow.cli import _job_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose):
        from vitflow.analysis.search import search

        found = search(output, image=image, id=id, k=k, feature=feature, job=job)
    typer.echo(found.text())


def dedup_command(
    output: OutputArg,
    threshold: Annotated[
        float,
        typer.Option("--threshold", "-t", help="Cosine similarity at which rows are duplicates."),
    ] = 0.95,
    feature: FeatureOpt = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="exact (blocked products) | index (the faiss index's range search) | auto: "
            "the index when built, else exact.",
        ),
    ] = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Write near-duplicate groups to OUTPUT/_dedup/groups.parquet (id, group, similarity).

    Example: vitflow dedup ./embeddings --threshold 0.95 --feature emb
    """
    from vitflow.cli import _job_errors

    with _job_errors(verbose):
        from vitflow.analysis.dedup import find_duplicates

        result = find_duplicates(output, threshold=threshold, feature=feature, method=method)
    typer.echo(result.text())


def report_command(
    output: OutputArg,
    feature: Annotated[
        str | None,
        typer.Option(
            "--feature", "-f", help="The feature pictured (default: the leaderboard's best)."
        ),
    ] = None,
    run_eval: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="Run vitflow eval first when _eval/eval.json is missing."
        ),
    ] = True,
    map_rows: Annotated[
        int, typer.Option("--map-rows", min=4, help="Rows the PCA/t-SNE maps show (sampled).")
    ] = 3000,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Write one self-contained HTML page: run summary, leaderboard, maps, kNN grid, errors.

    The page (OUTPUT/_report/index.html) embeds its pictures and needs no network.

    Example: vitflow report ./embeddings
    """
    from vitflow.cli import _job_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose):
        from vitflow.analysis.report import build_report

        report = build_report(
            output, feature=feature, run_eval=run_eval, map_rows=map_rows, seed=seed
        )
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"vitflow report: {report.path} ({', '.join(report.sections)}; {report.feature})")


def dense_command(
    output: OutputArg,
    feature: Annotated[str, typer.Option("--feature", "-f", help="The dense feature set.")],
    images: Annotated[int, typer.Option("--images", min=1, help="Images pictured.")] = 6,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Picture a dense feature: sampled images beside their maps' first three principal
    components as RGB, in OUTPUT/_dense/FEATURE.png.

    Example: vitflow dense ./embeddings --feature patches
    """
    from vitflow.cli import _job_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose):
        from vitflow.analysis.dense_view import dense_preview

        where = dense_preview(output, feature, images=images, seed=seed)
    typer.echo(where)


def register(app: typer.Typer) -> None:
    """Add ``index``, ``search``, ``dedup``, ``report`` and ``dense`` to the ``vitflow`` app."""
    app.command("index")(index_command)
    app.command("search")(search_command)
    app.command("dedup")(dedup_command)
    app.command("report")(report_command)
    app.command("dense")(dense_command)
