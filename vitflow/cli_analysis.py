"""The analysis commands of the ``vitflow`` CLI: ``eval``, ``fit`` and ``export``.

Each only parses its arguments and calls the plain function notebooks and tests call
(:mod:`vitflow.analysis`); errors become one sentence and exit code 1 through the CLI's own
handler. :func:`register` adds them to the app (``vitflow/cli.py`` calls it once).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

OutputArg = Annotated[
    str,
    typer.Argument(help="An embed output folder or a reindexed index (local path or URL)."),
]
FeatureOpt = Annotated[
    str | None,
    typer.Option("--feature", "-f", help="The vector column (default: the only one)."),
]
SplitOpt = Annotated[
    str | None, typer.Option("--split", help="Use only the rows of this split (default: all).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress; tracebacks.")]


def eval_command(
    output: OutputArg,
    feature: Annotated[
        list[str] | None,
        typer.Option(
            "--feature", "-f", help="Score only this vector column (repeatable; default: all)."
        ),
    ] = None,
    train_split: Annotated[
        str, typer.Option("--train-split", help="The split value of the train rows.")
    ] = "train",
    test_split: Annotated[
        str | None,
        typer.Option(
            "--test-split",
            help="The split value of the test rows (default: the first of test, val, "
            "validation present). Without split values: a seeded stratified k-fold.",
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="kNN neighbours (DINO: 20).")] = 20,
    temperature: Annotated[
        float, typer.Option("--temperature", help="kNN vote weight exp(sim / T) (DINO: 0.07).")
    ] = 0.07,
    folds: Annotated[
        int, typer.Option("--folds", min=2, help="Folds when the output has no split values.")
    ] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seeds folds and the probe's choices.")] = 0,
    max_probe_rows: Annotated[
        int,
        typer.Option(
            "--max-probe-rows", min=2, help="Most train rows the linear probe fits on (sampled)."
        ),
    ] = 50_000,
    verbose: VerboseOpt = False,
) -> None:
    """Score every feature set (kNN and linear probe) and print the leaderboard.

    kNN: k=20, T=0.07, cosine (DINO); linear: logistic regression on standardised features.
    Writes OUTPUT/_eval/eval.json and OUTPUT/_eval/leaderboard.png. On a matrix output
    (vitflow matrix): every model/dataset pair, and one leaderboard with model and dataset
    columns in OUTPUT/_eval/leaderboard.json and .csv.

    Example: vitflow eval ./embeddings --feature emb --feature cls_last
    """
    from vitflow.cli import _job_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    with _job_errors(verbose):
        from vitflow.analysis.evaluate import evaluate, evaluate_matrix
        from vitflow.errors import VitflowError
        from vitflow.matrix import is_matrix_output

        protocol = dict(
            train_split=train_split,
            test_split=test_split,
            k=k,
            temperature=temperature,
            folds=folds,
            seed=seed,
            max_probe_rows=max_probe_rows,
        )
        if is_matrix_output(output):
            if feature:
                raise VitflowError(
                    "--feature picks vector columns of one output; a matrix output is scored "
                    "with every feature of every model (eval one pair, OUT/MODEL/DATASET, for "
                    "a feature of one model)"
                )
            report = evaluate_matrix(output, **protocol)
        else:
            report = evaluate(output, feature=feature or None, **protocol)
    typer.echo(report.leaderboard())


def fit_command(
    output: OutputArg,
    feature: FeatureOpt = None,
    standardize: Annotated[
        bool, typer.Option("--standardize", help="Subtract the mean, divide by the std.")
    ] = False,
    pca: Annotated[
        int | None,
        typer.Option("--pca", min=1, help="Keep this many principal components."),
    ] = None,
    whiten: Annotated[
        bool, typer.Option("--whiten", help="Scale each component to unit variance (--pca).")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The transform's name (default e.g. emb-std-pca128w)."),
    ] = None,
    split: SplitOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a transform of the same name.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fit standardisation and/or PCA in one streaming pass; store it in OUTPUT/_transforms/.

    Example: vitflow fit ./embeddings --feature emb --standardize --pca 128 --whiten
    """
    from vitflow.cli import _job_errors

    with _job_errors(verbose):
        from vitflow.analysis.transforms import TRANSFORMS_DIR, fit_transform

        fitted = fit_transform(
            output,
            feature=feature,
            standardize=standardize,
            pca=pca,
            whiten=whiten,
            name=name,
            split=split,
            overwrite=overwrite,
        )
    m = fitted.meta
    what = m["kind"] + (", whitened" if m["whiten"] else "")
    variance = (
        f"; {m['explained_variance_ratio']:.1%} of the variance kept"
        if "explained_variance_ratio" in m
        else ""
    )
    folder = f"{output.rstrip('/')}/{TRANSFORMS_DIR}/{fitted.name}"
    typer.echo(
        "\n".join(
            [
                f"vitflow fit: {fitted.name} ({what}: {m['dim_in']} -> {m['dim_out']} dims) "
                f"fitted on {m['rows']} rows of {fitted.feature}{variance}",
                f"  wrote        : {folder}.safetensors, {folder}.json",
                f"  load it with : vitflow.load_embeddings({output!r}, "
                f"feature={fitted.feature!r}, transform={fitted.name!r})",
            ]
        )
    )


def export_command(
    output: OutputArg,
    format: Annotated[
        str | None,
        typer.Option("--format", help="csv | npy | parquet (default: from --output's extension)."),
    ] = None,
    feature: FeatureOpt = None,
    transform: Annotated[
        str | None, typer.Option("--transform", help="Apply this fitted transform first.")
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="The file to write (default: OUTNAME-FEATURE[-TRANSFORM][-SPLIT].FORMAT here).",
        ),
    ] = None,
    split: SplitOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export one feature's vectors as one CSV, .npy or parquet file.

    CSV: header filename,x1..xD; npy: the array plus NAME.ids.parquet (id, path, label,
    split of each row); parquet: one file. Streamed part by part.

    Example: vitflow export ./embeddings --format csv --feature emb --output emb.csv
    """
    from vitflow.cli import _job_errors

    with _job_errors(verbose):
        from vitflow.analysis.export import export_embeddings

        result = export_embeddings(
            output, file, format=format, feature=feature, transform=transform, split=split
        )
    extra = f" (+ ids in {result.ids_path})" if result.ids_path else ""
    typer.echo(
        f"vitflow export: {result.rows} rows x {result.dim} ({result.feature}"
        + (f", transform {result.transform}" if result.transform else "")
        + f") -> {result.path}{extra}"
    )


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``fit`` and ``export`` to the ``vitflow`` app."""
    app.command("eval")(eval_command)
    app.command("fit")(fit_command)
    app.command("export")(export_command)
