"""Figures for the README: the embed pipeline diagram and example plots from real runs.

    .venv/bin/python docs/figures.py           # docs/pipeline.png (seconds, no Ray)
    .venv/bin/python docs/figures.py --plots   # also docs/example-*.png (5-8 min on 2 cores)

``--plots`` makes scikit-learn's digits into an image folder, trains SIMO2 on it for a few
minutes (``vitflow train``, the README's Pretraining example), keeps the plots that run
writes, then embeds the digits with the exported backbone (three feature sets, one pass) and
maps them. ``--run-dir DIR`` takes a finished run instead of training again. Everything runs
with the dev venv (matplotlib, scikit-learn, vitflow); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
BIN = Path(sys.executable).parent  # the venv's bin/, where the `vitflow` script lives

# What the Source box lists. Edit here if the kinds of source change.
SOURCE_KINDS = "a folder (searched recursively)   ·   s3://bucket/prefix (any fsspec URL)"

# One colour per place where the work runs (fill, edge); the legend repeats them.
PLACES = {
    "storage": ("#eef2f7", "#7b8ca3"),
    "driver": ("#fff5d6", "#c9a227"),
    "tasks": ("#e3f4e6", "#4f9d63"),
    "actors": ("#ede6f7", "#7d5bb5"),
    "readers": ("#f3f3f3", "#8a8a8a"),
}
ERROR = "#c0392b"
INK = "#222222"
MUTED = "#555555"


# --------------------------------------------------------------------------- drawing helpers
LINE = 2.5  # drawing units between detail lines (10 units per inch)


def _height(n_lines: int) -> float:
    """Height of a stage box with a title and ``n_lines`` detail lines."""
    return 5.6 + LINE * n_lines


def _save_small(src, out: Path) -> None:
    """Write a PNG with a 256-colour palette: the same picture at a third of the bytes.

    Args:
        src: a PNG file path or an in-memory buffer holding one.
        out: where to write it.
    """
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out.relative_to(REPO)} ({out.stat().st_size // 1024} KB)")


def _box(ax, x, y, w, h, place, *, lw=1.4, ls="-", radius=1.2, z=1):
    """A rounded box with its top-left corner at (x, y); y grows upwards."""
    fill, edge = PLACES[place]
    ax.add_patch(
        FancyBboxPatch(
            (x, y - h),
            w,
            h,
            boxstyle=f"round,pad=0,rounding_size={radius}",
            fc=fill,
            ec=edge,
            lw=lw,
            ls=ls,
            zorder=z,
        )
    )


def _stage(ax, x, y, w, place, title, lines, *, tag=None, h=None, ls="-", size=9.5):
    """A box with a bold title, detail lines and where it runs (tag); returns its height."""
    h = h or _height(len(lines))
    _box(ax, x, y, w, h, place, ls=ls)
    ax.text(x + 1.5, y - 1.3, title, fontsize=11.5, weight="bold", va="top", color=INK, zorder=3)
    if tag:
        ax.text(
            x + w - 1.5,
            y - 1.45,
            tag,
            fontsize=8.5,
            va="top",
            ha="right",
            color=PLACES[place][1],
            weight="bold",
            zorder=3,
        )
    for i, line in enumerate(lines):
        ax.text(x + 1.5, y - 4.5 - LINE * i, line, fontsize=size, va="top", color=INK, zorder=3)
    return h


def _pill(ax, x, y, w, h, text, place, *, size=8.5, weight="normal"):
    """A small box with centred text, (x, y) its top-left corner."""
    _box(ax, x, y, w, h, place, lw=1.0, radius=0.8, z=2)
    ax.text(
        x + w / 2,
        y - h / 2,
        text,
        fontsize=size,
        ha="center",
        va="center",
        color=INK,
        weight=weight,
        zorder=3,
        linespacing=1.25,
    )


def _arrow(ax, a, b, *, color=INK, lw=1.5, ls="-", style="-|>", z=2):
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle=style,
            mutation_scale=13,
            color=color,
            lw=lw,
            ls=ls,
            shrinkA=0,
            shrinkB=0,
            zorder=z,
        )
    )


# --------------------------------------------------------------------------- pipeline diagram
def draw_pipeline(out: Path) -> None:
    """docs/pipeline.png: how data moves through ``vitflow embed``; reindex and train beside it."""
    W, TOP = 100.0, 200.0  # drawing units, 10 per inch; the bottom is cut to fit at the end
    fig = plt.figure()
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")

    ax.text(2, TOP - 1.5, "vitflow embed: how data moves", fontsize=14, weight="bold", va="top")
    ax.text(
        2,
        TOP - 4.7,
        "every listed file comes out as exactly one row: ok, or error with the reason",
        fontsize=9.5,
        va="top",
        color=MUTED,
    )

    x0, w = 9.0, 56.0  # the main column
    cx, gap = x0 + w / 2, 4.4
    y = TOP - 9.0
    at: dict[str, tuple[float, float]] = {}  # stage -> (top, bottom)

    def down(name: str, h: float, label: str | None, *, arrow: bool = True) -> None:
        """Record a stage's extent, then an arrow (and what travels on it) to the next."""
        nonlocal y
        at[name] = (y, y - h)
        y -= h + gap
        if arrow:
            _arrow(ax, (cx, y + gap), (cx, y))
        if label:
            ax.text(
                cx + 1.2, y + gap / 2, label, fontsize=8.5, style="italic", color=MUTED, va="center"
            )

    h = _stage(
        ax,
        x0,
        y,
        w,
        "storage",
        "Source",
        [SOURCE_KINDS],
        tag="local disk / object store",
    )
    down("source", h, "fsspec listing")

    h = _stage(
        ax,
        x0,
        y,
        w,
        "driver",
        "List: the ledger",
        [
            "every image, sorted; one row each: id, path, size, mtime/ETag,",
            "label (parent folder), split (train / val / test on the path)",
        ],
        tag="driver",
    )
    down("list", h, "rows of paths, streamed in batches")

    h = _stage(
        ax,
        x0,
        y,
        w,
        "tasks",
        "Read + decode",
        [
            "read bytes, retried; decode to RGB: EXIF orientation, alpha on",
            "white, grayscale / CMYK / 16-bit to 8-bit; pixel and time limits",
            "the model's own timm eval transform: resize + centre crop",
            "a file that fails here becomes an error row with the reason",
        ],
        tag="Ray CPU tasks, one per core",
    )
    down("decode", h, "uint8 batches (B, H, W, 3) + error rows")

    # The model stage, with a small picture of the replicas and of one forward pass.
    h = 27.5
    _stage(
        ax,
        x0,
        y,
        w,
        "actors",
        "Embed",
        [
            "one backbone per GPU (or per CPU actor), identical weights",
            "shipped from the driver; error rows ride along, not embedded",
        ],
        tag="Ray actor pool",
        h=h,
    )
    ay = y - 10.6
    for i, name in enumerate(["actor 1 · GPU 0", "actor 2 · GPU 1", "actor n · …"]):
        _pill(ax, x0 + 1.5, ay - 5.4 * i, 10.0, 3.6, name, "actors")
    fx = x0 + 13.5
    _pill(ax, fx, ay, 12.5, 6.0, "normalise,\none forward pass", "actors")
    _arrow(ax, (fx + 6.25, ay - 6.0), (fx + 6.25, ay - 8.4), lw=1.1)
    _pill(ax, fx, ay - 8.4, 12.5, 6.0, "layer hooks on\nblocks / stages", "actors")
    px = fx + 15.0
    _arrow(ax, (fx + 12.5, ay - 11.4), (px, ay - 11.4), lw=1.1)
    _pill(ax, px, ay - 8.4, 10.5, 6.0, "pooling:\ncls, mean, gem", "actors")
    fx2 = x0 + w - 13.0
    for i, feat in enumerate(["emb [1536]", "cls_last [384]", "last2_mean [768]"]):
        fy = ay - 0.2 - 5.4 * i
        _pill(ax, fx2, fy, 11.5, 3.6, feat, "readers", size=8)
        _arrow(ax, (px + 10.5, ay - 11.4), (fx2, fy - 1.8), lw=0.9)
    down("model", h, "arrow tables, one vector column per feature set")

    h = _stage(
        ax,
        x0,
        y,
        w,
        "actors",
        "Part writer",
        [
            "stages every batch at once under OUT/_staging/",
            "a part is finished when its last row arrives: written under",
            "a temporary name, then moved into place (atomic)",
            "--resume keeps finished parts and staged batches",
        ],
        tag="one writer actor",
    )
    down("writer", h, "the driver checks: ok + error = listed")

    h = _stage(
        ax,
        x0,
        y,
        w,
        "storage",
        "Output: plain parquet",
        [
            "OUT/part-00000.parquet …   (output.rows_per_file rows each)",
            "OUT/_manifest.json: config, model hash, dims, counts, timings",
        ],
        tag="local disk / object store",
    )
    down("output", h, None, arrow=False)

    # Readers: each straight from the parquet files, no vitflow needed for the first three.
    names = ["pandas", "polars", "duckdb", "vitflow.load_embeddings"]
    widths = [9.5, 9.5, 9.5, 22.5]
    rx, rh = x0, 5.6
    for name, rw in zip(names, widths, strict=True):
        _arrow(ax, (rx + rw / 2, y + gap), (rx + rw / 2, y))
        _pill(ax, rx, y, rw, rh, name, "readers", size=9.5, weight="bold")
        rx += rw + (w - sum(widths)) / (len(names) - 1)
    bottom = y - rh - 2.0

    # Error rows branch off decode and land in the same parts.
    ex = 4.5
    ey0 = at["decode"][1] + 2.6
    ey1 = at["writer"][0] - 5.6
    dash = {"color": ERROR, "lw": 1.6, "ls": (0, (4, 2.5))}
    ax.plot([x0, ex, ex], [ey0, ey0, ey1], zorder=2, **dash)
    _arrow(ax, (ex, ey1), (x0, ey1), **dash)
    ax.text(
        ex - 1.7,
        (ey0 + ey1) / 2,
        "error rows: status = 'error', the reason, no vectors",
        rotation=90,
        fontsize=9,
        color=ERROR,
        ha="center",
        va="center",
        weight="bold",
    )

    # Right column: a legend, then the two commands that share these stages.
    sx, sw = 69.0, 29.0
    ly = TOP - 9.0
    ax.text(sx, ly, "where it runs", fontsize=9.5, weight="bold", va="top")
    legend = [
        ("storage", "files: local disk or object store"),
        ("driver", "the driver process"),
        ("tasks", "Ray tasks: stateless, any CPU"),
        ("actors", "Ray actors: long-lived, stateful"),
        ("readers", "columns and readers"),
    ]
    for i, (place, text) in enumerate(legend):
        yy = ly - 3.4 - 2.8 * i
        _box(ax, sx, yy, 3.4, 2.0, place, lw=1.1, radius=0.4)
        ax.text(sx + 4.6, yy - 1.0, text, fontsize=8.5, va="center")
    yy = ly - 3.4 - 2.8 * len(legend) - 1.0
    _arrow(ax, (sx, yy), (sx + 3.4, yy), **dash)
    ax.text(sx + 4.6, yy, "error rows", fontsize=8.5, va="center", color=ERROR)

    train = [
        "Ray Train TorchTrainer (DDP),",
        "SimCLR or SIMO2; checkpoints,",
        "resumes after a crash",
        "→ exports the backbone:",
        "   <arch>-<method>-backbone",
        "   .safetensors",
        "→ vitflow embed --checkpoint",
    ]
    ty = at["model"][0] + 2.0
    th = _stage(ax, sx, ty, sw, "driver", "vitflow train", train, ls=(0, (3, 2)), size=9)
    ya = ty - 4.5 - LINE * (len(train) - 1) - 1.0
    _arrow(ax, (sx, ya), (x0 + w, ya), color=MUTED, lw=1.6)

    reindex = [
        "the same list, decode and embed",
        "stages, for what changed only:",
        "diffs the listing against the",
        "index (new, changed, deleted)",
        "sink: a Delta Lake table instead",
        "of parts; adds + removes in ONE",
        "commit: readers see old or new",
    ]
    ry = max(at["writer"][0] + 1.0, ty - th - 3.5)
    _stage(ax, sx, ry, sw, "storage", "vitflow reindex", reindex, ls=(0, (3, 2)), size=9)

    ax.set(xlim=(0, W), ylim=(bottom, TOP))
    fig.set_size_inches(W / 10, (TOP - bottom) / 10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    plt.close(fig)
    _save_small(buf, out)


# --------------------------------------------------------------------------- example plots
TRAIN_STEPS = 150  # 3-5 minutes on 2 busy CPU cores; kNN top-1 climbs from ~0.2 to ~0.85


def train_digits(work: Path) -> Path:
    """A short SIMO2 run on scikit-learn's digits (the README's Pretraining example)."""
    run_dir = work / "run-simo2"
    subprocess.run(
        [
            str(BIN / "vitflow"),
            "train",
            str(REPO / "jobs" / "simo2-digits.yaml"),
            "--set",
            f"data.uri={work / 'digits'}",
            "--set",
            f"output.uri={run_dir}",
            "--set",
            f"optim.steps={TRAIN_STEPS}",
        ],
        check=True,
    )
    return run_dir


def embed_digits(work: Path, checkpoint: Path) -> Path:
    """Embed every digit with the trained backbone: three feature sets, one forward pass."""
    from vitflow import load_config, run_embed

    out = work / "emb-digits"
    cfg = load_config(
        base={
            "source": {"uri": str(work / "digits")},
            "model": {"checkpoint": str(checkpoint)},
            "features": [
                {"name": "stage3", "layers": [3], "pool": "avg"},
                {"name": "stage4", "layers": [4], "pool": "avg"},
                {"name": "head", "source": "head"},
            ],
            "output": {"uri": str(out)},
        }
    )
    run_embed(cfg, overwrite=True)
    return out


def plot_embed_features(emb_dir: Path, out: Path) -> None:
    """One t-SNE map per feature set (val split, by digit), titled with its kNN top-1.

    t-SNE, not PCA: like kNN it keeps neighbourhoods, so the map and the number agree; a 2-D
    PCA of a 256-d feature hides most of what a nearest-neighbour search sees.
    """
    from sklearn.manifold import TSNE
    from sklearn.neighbors import KNeighborsClassifier

    import vitflow

    df = vitflow.load_embeddings(str(emb_dir))
    manifest = json.loads((emb_dir / "_manifest.json").read_text())
    features = list(manifest["features"])
    train, val = (df["split"] == "train").to_numpy(), (df["split"] == "val").to_numpy()
    labels = df["label"].to_numpy()
    digits = sorted(set(labels), key=int)
    fig, axes = plt.subplots(1, len(features), figsize=(12, 4.3), layout="constrained")
    for ax, name in zip(axes, features, strict=True):
        x = np.stack(df[name].to_numpy())
        knn = KNeighborsClassifier(5, metric="cosine").fit(x[train], labels[train])
        top1 = knn.score(x[val], labels[val])
        xy = TSNE(2, perplexity=30, init="pca", random_state=0).fit_transform(x[val])
        for i, d in enumerate(digits):
            sel = labels[val] == d
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, color=plt.cm.tab10(i), label=d, alpha=0.85)
        dim = manifest["features"][name]["dim"]
        ax.set_title(f"{name} [{dim}]   kNN top-1 {top1:.2f}", fontsize=11)
        ax.set(xticks=[], yticks=[])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", markerscale=2)
    fig.suptitle(
        f"One vitflow embed pass of the SIMO2 backbone, three feature sets: t-SNE of the "
        f"{val.sum()} held-out digits\n(kNN top-1: k=5, cosine, train split → val split)",
        fontsize=11,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor="white")
    plt.close(fig)
    _save_small(buf, out)


def make_example_plots(run_dir: Path | None = None) -> None:
    """docs/example-*.png from real runs: SIMO2 training plots and an embed of its backbone."""
    from vitflow.synthetic import make_digits_folder

    with tempfile.TemporaryDirectory(prefix="vitflow-figures-") as tmp:
        work = Path(tmp)
        make_digits_folder(work / "digits")
        run_dir = run_dir or train_digits(work)
        _save_small(run_dir / "loss_curves.png", DOCS / "example-loss-curves.png")
        _save_small(run_dir / "embedding_projection.png", DOCS / "example-embedding-projection.png")
        (checkpoint,) = run_dir.glob("*-backbone.safetensors")
        emb_dir = embed_digits(work, checkpoint)
        plot_embed_features(emb_dir, DOCS / "example-embed-features.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plots", action="store_true", help="also make docs/example-*.png")
    p.add_argument("--run-dir", help="a finished `vitflow train` run to take the plots from")
    args = p.parse_args(argv)
    draw_pipeline(DOCS / "pipeline.png")
    if args.plots:
        make_example_plots(Path(args.run_dir).resolve() if args.run_dir else None)


if __name__ == "__main__":
    main()
