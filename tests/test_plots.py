"""Pictures of an output: the kNN examples against brute-force numpy, the streamed class
similarity against the mean over every pair, thumbnails from the source images, and PNGs
that are real, non-blank and the same for the same seed.

The output is scikit-learn's digits: each 8x8 digit saved as a PNG in a folder named by its
class (the source images the thumbnails read) and its 64 pixels as the vectors, written in
the documented layout by hand (no Ray, no model).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from tests.test_eval import write_output
from vitflow import columns

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_openmp_thread")]


def write_digits_output(
    root, *, per_class=30, parts=3, missing_image=True, proj=False, errors=None, classes=10
):
    """Digits as PNG files ``root/images/CLASS/NNNN.png`` and an output ``root/out`` whose
    vector ``pix`` is each digit's pixels (and with ``proj``, ``proj``: a fixed random
    projection of them to 16 dims). Row 3 is an error row, or the rows ``errors`` names
    (position -> message); with ``missing_image`` the file of row 5 is deleted (a thumbnail
    that cannot be read). ``classes``: the digits 0 .. classes-1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:per_class] for c in range(classes)])
    keep.sort()
    paths = []
    for i in keep:
        p = root / "images" / str(d.target[i]) / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize(
            (32, 32), Image.Resampling.NEAREST
        ).convert("RGB").save(p)
        paths.append(str(p))
    n = len(keep)
    rows = {
        columns.ID: [hashlib.sha256(p.encode()).hexdigest()[:16] for p in paths],
        columns.PATH: paths,
        columns.LABEL: [str(d.target[i]) for i in keep],
        columns.SPLIT: ["val" if j % 5 == 4 else "train" for j in range(n)],
        columns.STATUS: ["ok"] * n,
        columns.ERROR: [None] * n,
        "pix": d.data[keep].astype(np.float32),
    }
    if proj:
        rows["proj"] = rows["pix"] @ np.random.default_rng(0).normal(size=(64, 16)).astype(
            np.float32
        )
    errors = errors or {3: "corrupt or truncated JPEG: image file is truncated (9 bytes)"}
    for i, message in errors.items():
        rows[columns.STATUS][i] = "error"
        rows[columns.ERROR][i] = message
    if missing_image:
        (root / "images" / rows[columns.LABEL][5] / f"{keep[5]:04d}.png").unlink()
    write_output(root / "out", rows, parts=parts)
    return str(root / "out"), rows


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_output(tmp_path_factory.mktemp("plots"))


def ok_rows(rows):
    ok = np.asarray(rows[columns.STATUS]) == "ok"
    x = rows["pix"][ok]
    return (
        x / np.linalg.norm(x, axis=1, keepdims=True),
        np.asarray(rows[columns.LABEL], object)[ok],
        np.asarray(rows[columns.ID], object)[ok],
    )


def is_png(data: bytes, min_colors: int = 20) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 10, "blank picture"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) >= min_colors
    return img


def test_class_similarity_is_the_mean_over_every_pair(digits):
    from vitflow.analysis.plots import class_similarity

    uri, rows = digits
    x, labels, _ = ok_rows(rows)
    cs = class_similarity(uri, batch_rows=7)  # many batches: the sums are streamed
    assert cs.classes == [str(c) for c in range(10)]
    sim = x @ x.T
    for a, ca in enumerate(cs.classes):
        ia = np.flatnonzero(labels == ca)
        assert cs.counts[a] == len(ia)
        for b, cb in enumerate(cs.classes):
            block = sim[np.ix_(ia, np.flatnonzero(labels == cb))]
            want = block[~np.eye(len(ia), dtype=bool)].mean() if a == b else block.mean()
            assert cs.matrix[a, b] == pytest.approx(want, abs=1e-6)
    # digits of a class are more alike than digits of two classes
    assert np.all(
        np.diag(cs.matrix) > cs.matrix.max(axis=1, where=~np.eye(10, dtype=bool), initial=-1)
    )


def test_knn_examples_are_the_exact_nearest_rows(digits):
    from vitflow.analysis.plots import knn_examples

    uri, rows = digits
    x, labels, ids = ok_rows(rows)
    grid = knn_examples(uri, queries=5, k=4, seed=3)
    assert len(grid) == 5
    assert len({g[0][columns.LABEL] for g in grid}) == 5  # one query per label first
    for g in grid:
        q = int(np.flatnonzero(ids == g[0][columns.ID])[0])
        sims = x @ x[q]
        sims[q] = -np.inf  # the query itself is never its own neighbour
        want = np.argsort(-sims, kind="stable")[:4]
        assert [r["similarity"] for r in g[1:]] == pytest.approx(sims[want].tolist(), abs=1e-5)
        assert [r[columns.ID] for r in g[1:]] == ids[want].tolist()
        assert [r[columns.LABEL] for r in g[1:]] == labels[want].tolist()
    assert knn_examples(uri, queries=5, k=4, seed=3) == grid  # seeded
    assert knn_examples(uri, queries=5, k=4, seed=4) != grid


def test_knn_grid_reads_thumbnails_from_the_source_images(digits, tmp_path):
    from vitflow.analysis.plots import THUMB, knn_grid, thumbnails

    uri, rows = digits
    thumbs = thumbnails([rows[columns.PATH][0], rows[columns.PATH][5], str(tmp_path / "nope")])
    assert thumbs[0].shape == (THUMB, THUMB, 3)
    # the 32x32 digit is scaled up to the thumbnail (nearest: its 8x8 cells stay sharp)
    src = np.asarray(Image.open(rows[columns.PATH][0]))
    assert np.array_equal(thumbs[0][:: THUMB // 32, :: THUMB // 32], src)
    assert thumbs[1] is None and thumbs[2] is None  # deleted, never there
    img = is_png(knn_grid(uri, queries=3, k=4, seed=0))
    assert 500 < img.width < 1200 and 400 < img.height < 900


def test_maps_are_pictures_and_the_same_for_the_same_seed(digits):
    from vitflow.analysis.plots import embedding_maps

    uri, _ = digits
    a = embedding_maps(uri, n=120, seed=0)
    img = is_png(a)
    assert img.width > 900  # two maps side by side, legend beside
    assert embedding_maps(uri, n=120, seed=0) == a


def test_maps_of_fewer_labels_than_the_palette(tmp_path):
    """Three labels: one colour each (the palette has ten), and the legend lists three."""
    from vitflow.analysis.plots import _class_colors, embedding_maps

    uri, _ = write_digits_output(tmp_path, per_class=8, classes=3, parts=2)
    is_png(embedding_maps(uri, n=20, seed=0))
    for n in (1, 3, 10, 11, 20, 21, 40):
        assert len(_class_colors([str(i) for i in range(n)])) == n


def test_class_similarity_chart_is_a_picture(digits):
    from vitflow.analysis.plots import class_similarity, class_similarity_chart

    uri, _ = digits
    is_png(class_similarity_chart(class_similarity(uri)))


# --- out-of-distribution chart, dense-map pictures --------------------------------------


def test_pca_rgb_colours_regions_alike_within_and_across_maps():
    from vitflow.analysis.plots import pca_rgb

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T * 5  # three orthogonal directions
    regions = np.repeat(np.arange(3), 4)  # 12 columns: 3 regions of 4
    a = np.stack([basis[regions]] * 6)  # (6, 12, 16)
    b = np.stack([basis[regions[::-1]]] * 6)  # the same features, regions mirrored
    pa_, pb = pca_rgb([a, b])
    assert pa_.shape == (6, 12, 3) and pa_.dtype == np.uint8
    colours = {tuple(pa_[0, c]) for c in range(12)}
    assert len(colours) == 3  # one colour per region, three different ones
    assert (pa_ == pa_[0]).all()  # every row alike
    np.testing.assert_array_equal(pb[:, ::-1], pa_)  # same feature, same colour in both maps


def test_ood_chart_and_dense_panel_are_real_pictures():
    from vitflow.analysis.plots import dense_panel, ood_chart

    rng = np.random.default_rng(1)
    png = ood_chart({"near": rng.normal(0.1, 0.02, 50), "far": rng.normal(0.4, 0.05, 30)})
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    assert img.shape[0] > 100 and img.shape[1] > 400 and img.std() > 5
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.normal(size=(8, 8, 12)) for _ in range(2)]
    png = dense_panel(images, maps, titles=["a.jpg", "b.jpg"])
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 200 and img.std() > 5
