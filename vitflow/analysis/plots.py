"""Pictures of an embedding, as PNG bytes: a kNN example grid, 2-D maps (PCA, t-SNE) and
the per-class similarity matrix. ``vitflow report`` puts them on one page; each is a plain
function too.

All three use cosine geometry (L2-normalised vectors), as eval and search do. Drawn on
matplotlib's Agg canvas, never pyplot: nothing needs a display and no global backend is
switched. Large outputs are sampled with :func:`vitflow.sample_embeddings` (seeded, the same
rows whatever the sharding); the class similarity streams every row.

UMAP is left out on purpose: ``umap-learn`` brings numba, llvmlite and pynndescent (well over
100 MB, and numba trails new NumPy releases, which would hold vitflow's NumPy back), for a
third view of the same sample that PCA (global structure) and t-SNE (neighbourhoods) already
cover.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from vitflow import columns
from vitflow.analysis.knn import l2_normalize

THUMB = 96  # thumbnail side in pixels, read from the source images
MAP_SAMPLE = 5000  # rows a map shows at most (t-SNE takes ~20 s on 2 cores for 5,000)
MAX_LEGEND = 20  # classes beyond this: no legend (it would hide the map)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kw)
    FigureCanvasAgg(fig)
    return fig


def _class_colors(classes: list) -> list:
    """One colour per class: tab10 up to 10 classes, tab20 up to 20, then turbo."""
    from matplotlib import colormaps

    n = len(classes)
    if n <= 10:
        return list(colormaps["tab10"].colors)[:n]
    if n <= 20:
        return list(colormaps["tab20"].colors)[:n]
    return list(colormaps["turbo"](np.linspace(0.05, 0.95, n)))


# --- kNN example grid ---


def thumbnails(paths: list[str], *, size: int = THUMB, storage_options=None) -> list:
    """``(size, size, 3)`` uint8 thumbnails of image files (local or fsspec URLs), letterboxed
    on white; None for a file that cannot be read or decoded."""
    from PIL import Image, ImageOps

    from vitflow.decode import decode_image
    from vitflow.storage import read_many

    out = []
    for data in read_many(list(paths), storage_options):
        if isinstance(data, BaseException):
            out.append(None)
            continue
        try:
            img = decode_image(data)
        except Exception:
            out.append(None)
            continue
        # Up or down to fit: a 32-pixel image is shown as large as a photo's thumbnail.
        up = img.width <= size // 2 and img.height <= size // 2
        img = ImageOps.contain(
            img, (size, size), Image.Resampling.NEAREST if up else Image.Resampling.BICUBIC
        )
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        out.append(np.asarray(canvas))
    return out


def knn_examples(
    uri: str,
    *,
    feature: str | None = None,
    queries: int = 6,
    k: int = 5,
    seed: int = 0,
    storage_options: dict | None = None,
) -> list[list[dict]]:
    """What :func:`knn_grid` draws: per query, the query row then its ``k`` nearest other
    ok rows (exact cosine search), each ``{"id", "path", "label", "similarity"}`` (the
    query's similarity is None).

    Queries come from a seeded sample (:func:`vitflow.sample_embeddings`): its first row of
    each label in sample order, then (with fewer labels than ``queries``) its other rows.
    """
    from vitflow.analysis.sample import sample_embeddings
    from vitflow.analysis.search import exact_neighbours, rows_at
    from vitflow.analysis.source import open_source

    src = open_source(uri, storage_options)
    name = src.feature(feature)
    sample = sample_embeddings(
        uri, queries * 20, seed, feature=name, storage_options=storage_options
    )
    first = ~sample[columns.LABEL].duplicated()
    picked = sample.loc[[*sample.index[first], *sample.index[~first]][:queries]]
    q = np.stack(picked[name].to_numpy()) if len(picked) else np.zeros((0, src.dims[name]))
    sims, pos = exact_neighbours(src, name, q, k + 1)
    found = np.unique(pos[pos >= 0])
    by_pos = dict(zip(found.tolist(), rows_at(src, found).to_pylist(), strict=True))
    out = []
    for qi, (_, row) in enumerate(picked.iterrows()):
        near = [
            {**by_pos[p], "similarity": float(s)}
            for p, s in zip(pos[qi], sims[qi], strict=True)
            if p >= 0 and by_pos[p][columns.ID] != row[columns.ID]
        ]
        query = {c: row[c] for c in (columns.ID, columns.PATH, columns.LABEL)}
        out.append([{**query, "similarity": None}, *near[:k]])
    return out


def knn_grid(
    uri: str,
    *,
    feature: str | None = None,
    queries: int = 6,
    k: int = 5,
    seed: int = 0,
    storage_options: dict | None = None,
) -> bytes:
    """PNG: ``queries`` seeded sampled rows (one per label where the labels allow), each with
    its ``k`` nearest other rows (cosine), as thumbnails read from the source images
    (:func:`knn_examples` says which).

    A query has a blue frame; a neighbour a green frame when its label is the query's and a
    red one (label in red) when not; each shows its label and similarity.

    Example:
        >>> open("knn.png", "wb").write(knn_grid("embeddings", feature="emb"))  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source

    name = open_source(uri, storage_options).feature(feature)
    grid = knn_examples(
        uri, feature=name, queries=queries, k=k, seed=seed, storage_options=storage_options
    )
    return _draw_grid(grid, k, name, storage_options)


def _draw_grid(grid, k, name, storage_options) -> bytes:
    cell = 1.45
    fig = _figure(cell * (k + 1) + 0.3, cell * 1.22 * max(len(grid), 1) + 0.5)
    fig.suptitle(
        f"{name}: sampled queries (blue) and their {k} nearest neighbours — "
        "green: same label, red: other label",
        fontsize=9,
    )
    if not grid:
        fig.text(0.5, 0.5, "no ok rows", ha="center")
        return _png(fig)
    images = thumbnails(
        [r[columns.PATH] for row in grid for r in row], storage_options=storage_options
    )
    axes = fig.subplots(len(grid), k + 1, squeeze=False)
    it = iter(images)
    for r, row in enumerate(grid):
        query_label = row[0][columns.LABEL]
        for c in range(k + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            label, sim = row[c][columns.LABEL], row[c]["similarity"]
            img = next(it)
            if img is None:
                ax.imshow(np.full((THUMB, THUMB, 3), 225, np.uint8))
                ax.text(THUMB / 2, THUMB / 2, "unreadable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(img)
            same = label == query_label and label is not None
            color = "#1f5fbf" if sim is None else "#2a9d3a" if same else "#d62728"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3.5)
            text = f"query: {label or '-'}" if sim is None else f"{label or '-'}  {sim:.3f}"
            ax.set_title(text, fontsize=8, color="black" if sim is None or same else color)
    fig.subplots_adjust(wspace=0.08, hspace=0.3, top=1 - 0.55 / fig.get_figheight())
    return _png(fig)


# --- 2-D maps ---


def embedding_maps(
    uri: str,
    *,
    feature: str | None = None,
    n: int = MAP_SAMPLE,
    seed: int = 0,
    storage_options: dict | None = None,
) -> bytes:
    """PNG: PCA and t-SNE maps of (a seeded sample of at most ``n``) ok rows, by label.

    Vectors are L2-normalised first (cosine geometry). t-SNE: scikit-learn, perplexity
    ``min(30, (rows - 1) / 3)``, PCA initialisation, ``random_state=seed``, on the first 50
    principal components when the vectors are wider (usual for t-SNE: faster, the same map in
    practice). The same output and seed give the same picture.

    Example:
        >>> open("maps.png", "wb").write(embedding_maps("embeddings"))  # doctest: +SKIP
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from vitflow.analysis.sample import sample_embeddings
    from vitflow.analysis.source import open_source

    src = open_source(uri, storage_options)
    name = src.feature(feature)
    total = src.count(ok=True)
    df = sample_embeddings(uri, n, seed, feature=name, storage_options=storage_options)
    fig = _figure(12.5, 5.6, layout="constrained")
    if len(df) < 4:
        fig.text(0.5, 0.5, f"{len(df)} ok rows: too few for a map", ha="center")
        return _png(fig)
    x = l2_normalize(np.stack(df[name].to_numpy()))
    labels = np.asarray([v if v is not None else "(none)" for v in df[columns.LABEL]], object)
    pca = PCA(n_components=2, random_state=seed).fit(x)
    xt = PCA(n_components=50, random_state=seed).fit_transform(x) if min(x.shape) > 50 else x
    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    maps = [
        (pca.transform(x), f"PCA ({100 * pca.explained_variance_ratio_.sum():.0f}% of variance)"),
        (tsne.fit_transform(xt), f"t-SNE (perplexity {perplexity:.0f})"),
    ]
    classes = sorted(set(labels.tolist()), key=lambda c: (c == "(none)", c))
    colors = _class_colors(classes)
    size = 14 if len(x) <= 1000 else 6
    for ax, (xy, title) in zip(fig.subplots(1, 2), maps, strict=True):
        for c, color in zip(classes, colors, strict=True):
            sel = labels == c
            color = "#9a9a9a" if c == "(none)" else color
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=color, label=c, alpha=0.8, lw=0)
        ax.set(title=title, xticks=[], yticks=[])
    if len(classes) <= MAX_LEGEND:
        fig.legend(
            *ax.get_legend_handles_labels(), loc="outside right center", markerscale=2, fontsize=9
        )
    shown = (
        f"seeded sample of {len(x):,} of {total:,} rows" if len(x) < total else f"{len(x):,} rows"
    )
    fig.suptitle(f"{name}: {shown}, {len(classes)} labels, cosine (L2-normalised)")
    return _png(fig)


# --- per-class similarity ---


@dataclass
class ClassSimilarity:
    """Mean cosine similarity between classes: ``matrix[a, b]`` over all pairs of a row of
    class ``a`` and a row of class ``b`` (on the diagonal, pairs of two different rows)."""

    feature: str
    classes: list[str]
    counts: np.ndarray  # (C,)
    matrix: np.ndarray  # (C, C) float64


def class_similarity(
    uri: str,
    *,
    feature: str | None = None,
    split: str | None = None,
    storage_options: dict | None = None,
    batch_rows: int | None = None,
) -> ClassSimilarity:
    """The mean cosine similarity between every two labels, in one streamed pass.

    With ``s_c`` the sum of the L2-normalised vectors of class ``c`` and ``n_c`` its rows,
    the mean over pairs is ``s_a . s_b / (n_a n_b)``, and within a class, leaving out each
    row's similarity 1 with itself, ``(|s_a|^2 - n_a) / (n_a (n_a - 1))``. Memory: one
    ``(classes, dim)`` float64 sum, whatever the rows. Rows without a label are left out.

    Example:
        >>> cs = class_similarity("embeddings", feature="emb")  # doctest: +SKIP
    """
    from vitflow.analysis.source import open_source
    from vitflow.loading import vectors_of

    src = open_source(uri, storage_options)
    name = src.feature(feature)
    index: dict[str, int] = {}
    sums = np.zeros((0, src.dims[name]))
    counts = np.zeros(0, np.int64)
    for _, t in src.batches([columns.LABEL, name], ok=True, split=split, batch_rows=batch_rows):
        labels = t.column(columns.LABEL).to_pylist()
        for v in dict.fromkeys(labels):
            if v is not None and v not in index:
                index[v] = len(index)
        if len(index) > len(counts):
            grow = len(index) - len(counts)
            sums = np.vstack([sums, np.zeros((grow, sums.shape[1]))])
            counts = np.concatenate([counts, np.zeros(grow, np.int64)])
        code = np.asarray([index.get(v, -1) if v is not None else -1 for v in labels])
        keep = code >= 0
        if keep.any():
            x = l2_normalize(vectors_of(t.column(name))[keep]).astype(np.float64)
            np.add.at(sums, code[keep], x)
            counts += np.bincount(code[keep], minlength=len(counts))
    order = sorted(index, key=str)
    rank = [index[c] for c in order]
    sums, counts = sums[rank], counts[rank]
    gram = sums @ sums.T
    matrix = gram / np.maximum(np.outer(counts, counts), 1)
    within = counts > 1
    diag = np.full(len(counts), np.nan)
    diag[within] = (np.diag(gram)[within] - counts[within]) / (
        counts[within] * (counts[within] - 1)
    )
    matrix[np.diag_indices_from(matrix)] = diag
    return ClassSimilarity(name, order, counts, matrix)


def class_similarity_chart(cs: ClassSimilarity, *, max_classes: int = 40) -> bytes:
    """PNG heatmap of :func:`class_similarity` (the ``max_classes`` largest classes when
    there are more; values written in the cells up to 20 classes)."""
    keep = np.arange(len(cs.classes))
    if len(keep) > max_classes:
        keep = np.sort(np.argsort(-cs.counts, kind="stable")[:max_classes])
    m = cs.matrix[np.ix_(keep, keep)]
    names = [f"{cs.classes[i]} ({cs.counts[i]})" for i in keep]
    side = min(11.0, 2.8 + 0.42 * len(keep))
    fig = _figure(side + 1.6, side, layout="constrained")
    ax = fig.add_subplot()
    if not len(keep):
        ax.text(0.5, 0.5, "no labelled rows", ha="center")
        return _png(fig)
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6))
    ax.set_xticks(range(len(keep)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(keep)), names, fontsize=8)
    if len(keep) <= 20:
        mid = (lo + hi) / 2
        for i in range(len(keep)):
            for j in range(len(keep)):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if m[i, j] > mid else "white",
                    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean cosine similarity")
    more = (
        f" ({len(keep)} largest of {len(cs.classes)} classes)"
        if len(keep) < len(cs.classes)
        else ""
    )
    ax.set_title(f"{cs.feature}: mean cosine similarity between classes{more}", fontsize=10)
    return _png(fig)


# --- out-of-distribution scores and dense maps ---


def ood_chart(scores: dict[str, np.ndarray], *, score: str = "ood_knn", title: str = "") -> bytes:
    """PNG box plot of each collection's per-image scores (lower: closer to the reference),
    collections ordered by median, with the median written beside each box."""
    finite = {n: np.asarray(v, dtype=np.float64) for n, v in scores.items()}
    finite = {n: v[np.isfinite(v)] for n, v in finite.items()}
    names = sorted(finite, key=lambda n: float(np.median(finite[n])) if len(finite[n]) else 0.0)
    data = [finite[n] for n in names]
    fig = _figure(8.0, 1.2 + 0.5 * max(1, len(names)), layout="constrained")
    ax = fig.add_subplot()
    if not names:
        ax.text(0.5, 0.5, "no collections", ha="center")
        return _png(fig)
    ax.boxplot(
        data,
        orientation="horizontal",
        showfliers=True,
        tick_labels=[f"{n} ({len(d)})" for n, d in zip(names, data, strict=True)],
    )
    for i, d in enumerate(data, start=1):
        if len(d):
            ax.text(
                float(np.nanmedian(d)), i + 0.3, f"{np.nanmedian(d):.3f}", ha="center", fontsize=8
            )
    ax.set_xlabel(score)
    ax.set_title(
        title or f"{score} per image, by collection (lower: closer to the reference)", fontsize=10
    )
    return _png(fig)


def pca_rgb(maps: list[np.ndarray], *, seed: int = 0) -> list[np.ndarray]:
    """Dense maps ``(h, w, D)`` -> ``uint8`` ``(h, w, 3)`` pictures: the first three
    principal components of all the maps' cells together (so colours compare across
    images), each scaled from its 1st to its 99th percentile onto 0..255."""
    from sklearn.decomposition import PCA

    if not maps:
        return []
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]).astype(np.float32)
    k = min(3, flat.shape[1], flat.shape[0])
    comps = PCA(n_components=k, random_state=seed).fit_transform(flat)
    if k < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - k)))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    spread = hi - lo
    flat_comp = spread <= 1e-6 * max(float(spread.max()), 1e-12)  # rounding noise, not signal
    scaled = np.clip((comps - lo) / np.where(flat_comp, 1.0, spread), 0, 1)
    scaled[:, flat_comp] = 0.5
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        out.append(
            (scaled[start : start + n] * 255).round().astype(np.uint8).reshape(*m.shape[:2], 3)
        )
        start += n
    return out


def dense_panel(
    images: list[np.ndarray], maps: list[np.ndarray], titles: list[str] | None = None
) -> bytes:
    """PNG: each image beside the first three principal components of its dense map as RGB
    (:func:`pca_rgb`), the usual check that dense features follow the objects."""
    pictures = pca_rgb(maps)
    n = len(images)
    fig = _figure(4.4, 2.2 * max(1, n), layout="constrained")
    for i, (img, pic) in enumerate(zip(images, pictures, strict=True)):
        for j, (arr, label) in enumerate(((img, (titles or [""] * n)[i]), (pic, "PCA 1-3 as RGB"))):
            ax = fig.add_subplot(n, 2, 2 * i + j + 1)
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
    return _png(fig)
