"""``vitflow report OUTPUT``: one self-contained HTML page about an output.

``OUTPUT/_report/index.html`` holds the run summary (from the manifest), the eval
leaderboard (``_eval/eval.json``; eval runs first when it is missing or stale), the PCA and
t-SNE maps, the kNN example grid and the class similarity matrix of one feature, the search
index and near-duplicate summaries when those were built, and the error rows by reason. Every
picture is embedded as a ``data:`` URI and the page has no script and no link to fetch, so it
opens from disk, offline, mailed or archived alike. The pictures are also written beside it
as PNG files.
"""

from __future__ import annotations

import base64
import html
import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from vitflow import columns
from vitflow.errors import VitflowError

REPORT_DIR = "_report"
ERROR_EXAMPLES = 3  # paths shown per error reason

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom:
  2px solid #e3e3e8; padding-bottom: 0.2em; } .muted { color: #6e6e73; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 0.3em 0.8em;
  border-bottom: 1px solid #e3e3e8; text-align: left; vertical-align: top; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #e3e3e8; margin: 0.5em 0; }
code { background: #f5f5f7; padding: 0.1em 0.3em; border-radius: 3px; }
.note { background: #fff8e1; border-left: 4px solid #f5a623; padding: 0.5em 1em; }
"""


@dataclass
class Report:
    """Where :func:`build_report` wrote the page and what is on it."""

    path: str
    feature: str
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _e(value) -> str:
    return html.escape("-" if value is None else str(value))


class _Html(str):
    """A table cell already written as HTML (not escaped again)."""


def _cell(v) -> str:
    if isinstance(v, _Html):
        return f"<td>{v}</td>"
    num = isinstance(v, int | float) and not isinstance(v, bool)
    return f'<td class="num">{_e(v)}</td>' if num else f"<td>{_e(v)}</td>"


def _table(header: list[str], rows: list[list], *, cls: str = "", row_cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    tr = f'<tr class="{row_cls}">' if row_cls else "<tr>"
    body = "".join(tr + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pairs(rows: list[list]) -> str:
    """A two-column table of ``[key, value]`` rows, keys as row headers (None: left out)."""
    body = "".join(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in rows if v is not None)
    return f'<table class="summary"><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def error_reason(message: str | None) -> str:
    """The kind of an error row's message: the text before its first ``:`` or `` (``
    (``corrupt or truncated JPEG``, ``empty file``), so rows group by cause, not by detail."""
    text = (message or "unknown").strip()
    cut = min((i for i in (text.find(": "), text.find(" (")) if i > 0), default=len(text))
    return re.sub(r"\s+", " ", text[:cut])[:100]


def errors_by_reason(src) -> list[dict]:
    """Error rows grouped by :func:`error_reason`, most frequent first: reason, count, a few
    paths with their full messages. Streams the small columns only."""
    counts: Counter = Counter()
    examples: dict[str, list] = {}
    wanted = [columns.STATUS, columns.ERROR, columns.PATH]
    for _, t in src.batches(wanted):
        status = t.column(columns.STATUS).to_pylist()
        if columns.STATUS_ERROR not in status:
            continue
        for s, msg, path in zip(
            status, t[columns.ERROR].to_pylist(), t[columns.PATH].to_pylist(), strict=True
        ):
            if s != columns.STATUS_ERROR:
                continue
            reason = error_reason(msg)
            counts[reason] += 1
            if len(examples.setdefault(reason, [])) < ERROR_EXAMPLES:
                examples[reason].append((path, msg))
    return [
        {"reason": r, "count": c, "examples": examples[r]}
        for r, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def build_report(
    uri: str,
    *,
    feature: str | None = None,
    run_eval: bool = True,
    seed: int = 0,
    map_rows: int = 3000,
    queries: int = 6,
    k: int = 5,
    storage_options: dict | None = None,
) -> Report:
    """Write ``OUTPUT/_report/index.html`` (and its pictures as PNG beside it).

    Args:
        uri: an embed output or a reindexed index (local path or fsspec URL).
        feature: the feature the pictures show (default: the leaderboard's best, else the
            first).
        run_eval: run :func:`vitflow.evaluate` when ``_eval/eval.json`` is missing or was
            computed on other data (default); False leaves the leaderboard out with a note.
        seed: seeds the map sample and the kNN queries.
        map_rows: rows the maps show at most (a seeded sample). Default 3,000.
        queries: kNN grid rows. Default 6.
        k: neighbours per kNN query. Default 5.
        storage_options: fsspec options for object storage.

    Example:
        >>> build_report("embeddings").path  # doctest: +SKIP
        'embeddings/_report/index.html'
    """
    from vitflow.analysis import plots
    from vitflow.analysis.source import open_source, require_train_extra

    require_train_extra("vitflow report")
    src = open_source(uri, storage_options)
    if feature is not None:
        src.feature(feature)  # a misspelt name is refused before eval runs
    notes: list[str] = []
    board, eval_json = _leaderboard(src, run_eval, seed, notes, storage_options)
    if feature is None:
        feature = (eval_json or {}).get("leaderboard", [None])[0] or src.features()[0]
    name = src.feature(feature)
    parts = [
        f"<h1>vitflow report</h1><p class='muted'>{_e(src.uri)} · written "
        f"{_e(datetime.now(timezone.utc).isoformat(timespec='seconds'))}</p>"
    ]
    sections = ["summary", "leaderboard"]
    parts.append("<h2>Run summary</h2>" + _summary(src))
    parts.append("<h2>Leaderboard</h2>" + board)
    pictures = {}
    if src.count(ok=True):
        pictures["maps"] = plots.embedding_maps(
            src.uri, feature=name, n=map_rows, seed=seed, storage_options=storage_options
        )
        pictures["knn"] = plots.knn_grid(
            src.uri, feature=name, queries=queries, k=k, seed=seed, storage_options=storage_options
        )
        pictures["class-similarity"] = plots.class_similarity_chart(
            plots.class_similarity(src.uri, feature=name, storage_options=storage_options)
        )
    titles = {
        "maps": ("Maps", "PCA and t-SNE of the L2-normalised vectors, coloured by label."),
        "knn": ("Nearest neighbours", "Seeded sampled queries and their nearest rows (cosine)."),
        "class-similarity": (
            "Class similarity",
            "Mean cosine similarity between the rows of two classes (diagonal: within a class).",
        ),
    }
    for key, png in pictures.items():
        src.write_file(posixpath.join(REPORT_DIR, f"{key}-{name}.png"), png)
        title, what = titles[key]
        parts.append(f"<h2>{title}: {_e(name)}</h2><p>{_e(what)}</p>{_img(png, f'{title} {name}')}")
        sections.append(key)
    extra = _derived(src, name)
    if extra:
        parts.append("<h2>Search index and near-duplicates</h2>" + extra)
        sections.append("derived")
    parts.append("<h2>Error rows by reason</h2>" + _errors(src))
    sections.append("errors")
    if notes:
        parts.insert(1, "".join(f'<p class="note">{_e(n)}</p>' for n in notes))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>vitflow report: {_e(src.uri)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    path = src.write_file(posixpath.join(REPORT_DIR, "index.html"), page.encode())
    return Report(path, name, sections, notes)


def _leaderboard(src, run_eval, seed, notes, storage_options) -> tuple[str, dict | None]:
    """The leaderboard's HTML and eval.json (run eval first when it is missing or stale)."""
    from vitflow.analysis.evaluate import EVAL_DIR, evaluate

    base = src.path.rstrip("/")
    data = _read_json(src, posixpath.join(base, EVAL_DIR, "eval.json"))
    stale = data is not None and (data.get("data") or {}).get("fingerprint") != src.fingerprint
    if data is None or stale:
        why = "was computed on other data" if stale else "is missing"
        if not run_eval:
            notes.append(f"_eval/eval.json {why}: run `vitflow eval {src.uri}` for the leaderboard")
            return "<p>No leaderboard: run <code>vitflow eval</code>.</p>", None
        try:
            data = evaluate(src.uri, seed=seed, storage_options=storage_options).to_json()
        except VitflowError as e:
            notes.append(f"eval could not score this output: {e}")
            return f"<p>No leaderboard: {_e(e)}</p>", None
    rows = []
    for i, name in enumerate(data["leaderboard"], 1):
        f = data["features"][name]
        rows.append(
            [
                i,
                name,
                f["dim"],
                f"{f['knn_top1']:.4f}",
                f"{f['knn_top5']:.4f}",
                f"{f['linear_top1']:.4f}",
                f["n_train"],
                f["n_test"],
                _spec(f.get("spec")),
            ]
        )
    if "split" in data:
        how = f"train split {data['split']['train']!r}, test split {data['split']['test']!r}"
    else:
        how = f"no split values: seeded stratified {data['folds']['folds']}-fold cross-validation"
    table = _table(
        [
            "rank",
            "feature",
            "dim",
            "kNN top-1",
            "kNN top-5",
            "linear top-1",
            "train",
            "test",
            "spec",
        ],
        rows,
        cls="leaderboard",
        row_cls="leaderboard-row",
    )
    first = data["features"][data["leaderboard"][0]] if data["leaderboard"] else {}
    knn = (first.get("protocol") or {}).get("knn") or {}
    chart = _read_bytes(src, posixpath.join(base, EVAL_DIR, "leaderboard.png"))
    return (
        f"<p>{_e(how)}; kNN: the {_e(knn.get('k'))} nearest train rows, votes "
        f"exp(sim / {_e(knn.get('temperature'))}), cosine; linear probe: "
        "logistic regression on standardised features (from <code>_eval/eval.json</code>).</p>"
        + table
        + (_img(chart, "leaderboard chart") if chart else ""),
        data,
    )


def _spec(spec) -> str:
    from vitflow.analysis.source import describe_spec

    return describe_spec(spec)


def _summary(src) -> str:
    from vitflow.loading import _manifest

    if src.kind == "delta":
        rows = [
            ["kind", f"reindexed Delta index, version {src.data.get('version')}"],
            ["rows", f"{src.count():,} ({src.count(ok=True):,} ok)"],
        ]
        feats = [[n, d, _spec(src.specs.get(n))] for n, d in src.dims.items()]
        return _pairs(rows) + _table(["feature", "dim", "spec"], feats)
    m = _manifest(src.fs, src.path.rstrip("/")) or {}
    model, counts = m.get("model") or {}, m.get("counts") or {}
    dc = model.get("data_config") or {}
    timing, versions = m.get("timing") or {}, m.get("versions") or {}
    sha = model.get("checkpoint_sha256")
    rows = [
        ["model", model.get("name")],
        ["weights", model.get("weights")],
        [
            "checkpoint",
            model.get("checkpoint")
            and model["checkpoint"] + (f" (sha256 {sha[:12]}…)" if sha else ""),
        ],
        ["parameters", f"{model['num_params']:,}" if model.get("num_params") else None],
        ["preprocessing", ", ".join(f"{k} {v}" for k, v in dc.items()) or None],
        ["images listed", counts.get("listed")],
        ["ok", counts.get("ok")],
        ["errors", counts.get("error")],
        ["wall time", f"{timing['wall_seconds']} s" if timing.get("wall_seconds") else None],
        ["images/s", timing.get("images_per_second")],
        ["written", m.get("created_at")],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None],
    ]
    feats = [[n, src.dims.get(n), _spec(spec)] for n, spec in src.specs.items()] or [
        [n, d, "-"] for n, d in src.dims.items()
    ]
    return _pairs(rows) + _table(["feature", "dim", "spec"], feats)


def _derived(src, name: str) -> str:
    """What `vitflow index` and `vitflow dedup` left beside the output, if anything."""
    from vitflow.analysis.dedup import DEDUP_DIR
    from vitflow.analysis.search import index_paths

    base = src.path.rstrip("/")
    out = []
    meta = _read_json(src, posixpath.join(base, index_paths(src, name)["meta"]))
    if meta:
        fresh = meta["built_on"]["fingerprint"] == src.fingerprint
        r = meta["recall_at_10"]
        out.append(
            f"<p>Index of <code>{_e(name)}</code>: {_e(meta['kind'])} ({_e(meta['factory'])}), "
            f"{meta['rows']:,} rows, recall@10 {r['value']:.3f} against exact search on "
            f"{_e(r['queries'])} queries"
            + ("" if fresh else " — <b>stale: rebuild it</b>")
            + ".</p>"
        )
    info = _read_json(src, posixpath.join(base, DEDUP_DIR, "groups.json"))
    if info:
        out.append(
            f"<p>Near-duplicates ({_e(info['feature'])}, cosine ≥ {_e(info['threshold'])}): "
            f"{info['groups']:,} groups holding {info['members']:,} rows, in "
            "<code>_dedup/groups.parquet</code>"
            + (
                ""
                if (info.get("built_on") or {}).get("fingerprint") == src.fingerprint
                else " — <b>stale: the output changed since; run vitflow dedup again</b>"
            )
            + ".</p>"
        )
    return "".join(out)


def _errors(src) -> str:
    groups = errors_by_reason(src)
    if not groups:
        return "<p>No error rows: every listed file was embedded.</p>"
    rows = []
    for g in groups:
        shown = _Html("<br>".join(f"<code>{_e(p)}</code>: {_e(m)}" for p, m in g["examples"]))
        rows.append([g["reason"], g["count"], shown])
    return _table(["reason", "rows", f"examples (up to {ERROR_EXAMPLES})"], rows, cls="errors")


def _read_json(src, path: str) -> dict | None:
    raw = _read_bytes(src, path)
    try:
        return None if raw is None else json.loads(raw)
    except ValueError:
        return None


def _read_bytes(src, path: str) -> bytes | None:
    try:
        with src.fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
