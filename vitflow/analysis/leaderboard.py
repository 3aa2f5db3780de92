"""The eval leaderboard as text (what ``vitflow eval`` prints) and as a bar chart PNG.

Drawn on matplotlib's Agg canvas, never pyplot: nothing needs a display and no global
backend is switched.
"""

from __future__ import annotations

import io

from vitflow.analysis.source import describe_spec


def _how(report) -> str:
    if report.mode == "split":
        return f"train split {report.split['train']!r}, test split {report.split['test']!r}"
    return f"no split values: seeded stratified {report.split['folds']}-fold cross-validation"


def _excluded(report) -> str:
    e = report.excluded
    return (
        f"excluded {e['error']} error rows, {e['no_label']} rows without a label, "
        f"{e['other_split']} rows of other splits"
    )


def leaderboard_text(report) -> str:
    """The leaderboard: rank, feature, dim, kNN top-1/top-5, linear top-1, C, spec."""
    first = report.scores[0] if report.scores else None
    knn = first.protocol["knn"] if first else {"k": "?", "temperature": "?"}
    lines = [
        f"vitflow eval: {report.uri}",
        f"  {_how(report)}; seed {report.seed}",
        f"  {_excluded(report)}",
        f"  kNN: k={knn['k']}, T={knn['temperature']}, cosine; linear: logistic regression on "
        "standardised features, C chosen on 20% of train",
        "",
    ]
    header = ("rank", "feature", "dim", "train", "test", "kNN@1", "kNN@5", "linear@1", "C", "spec")
    rows = []
    for i, s in enumerate(report.scores, 1):
        c = s.protocol["linear"]["C"]
        c_text = "/".join(_num(x) for x in c) if isinstance(c, list) else _num(c)
        rows.append(
            (
                str(i),
                s.name,
                str(s.dim),
                str(s.n_train),
                str(s.n_test),
                f"{s.knn_top1:.4f}",
                f"{s.knn_top5:.4f}",
                f"{s.linear_top1:.4f}",
                c_text,
                describe_spec(s.spec),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 2, 3, 4, 5, 6, 7}
    for r in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    if report.eval_json:
        lines += ["", f"  wrote {report.eval_json}", f"        {report.chart}"]
    return "\n".join(lines)


def _num(c) -> str:
    return "-" if c is None else f"{c:g}"


def bar_chart(report) -> bytes:
    """PNG: one row per feature (best at the top), bars for kNN top-1 and linear top-1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = list(reversed(report.scores))  # barh draws bottom-up: best on top
    n = len(scores)
    fig = Figure(figsize=(8, 1.2 + 0.55 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = range(n)
    h = 0.38
    knn = [s.knn_top1 for s in scores]
    lin = [s.linear_top1 for s in scores]
    ax.barh([y + h / 2 for y in ys], knn, height=h, label="kNN top-1", color="C0")
    ax.barh([y - h / 2 for y in ys], lin, height=h, label="linear top-1", color="C1")
    for y, a, b in zip(ys, knn, lin, strict=True):
        ax.text(a + 0.005, y + h / 2, f"{a:.3f}", va="center", fontsize=8)
        ax.text(b + 0.005, y - h / 2, f"{b:.3f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{s.name} [{s.dim}]" for s in scores])
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("top-1 accuracy")
    ax.set_title(f"vitflow eval: {_how(report)}", fontsize=9)
    # Outside the axes: bars reach 1.0 and would hide under it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
