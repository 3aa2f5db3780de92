"""`vitflow report`: the page opened from disk in a real headless browser (Debian's
`chromium`), a screenshot taken and the DOM checked for every leaderboard row, and the page
proved self-contained (no network URL anywhere; pictures inline as data: URIs). Then the
exploring commands (`index`, `search --id`, `dedup`, `report`) through a subprocess, as a
user runs them.

The output is the digits output of tests/test_plots.py (PNG source images, vectors written
by hand, no Ray, no model) with a second feature and error rows of two kinds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from tests.test_plots import write_digits_output

CHROMIUM = shutil.which("chromium")
WINDOW = (1280, 1800)
ERRORS = {
    3: "corrupt or truncated JPEG: image file is truncated (9 bytes)",
    8: "corrupt or truncated JPEG: broken data stream when reading image file",
    12: "empty file (0 bytes)",
}
VITFLOW = [sys.executable, "-m", "vitflow.cli"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, one_openmp_thread):
    """An output with an index and near-duplicate groups beside it, and its report (eval
    runs inside build_report: eval.json is missing)."""
    pytest.importorskip("faiss")
    from vitflow.analysis.dedup import find_duplicates
    from vitflow.analysis.report import build_report
    from vitflow.analysis.search import build_index

    uri, rows = write_digits_output(
        tmp_path_factory.mktemp("report"), per_class=12, proj=True, errors=ERRORS
    )
    build_index(uri, feature="pix")
    find_duplicates(uri, threshold=0.95, feature="pix")
    report = build_report(uri, map_rows=60, queries=3, k=4)
    return uri, rows, report


class Tables(HTMLParser):
    """Every table's body rows as lists of cell texts, by the table's class; and every
    attribute of every element."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.attrs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self._table = self._row = self._cell = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class") or "", [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    p = Tables()
    p.feed(page)
    return p


def chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    """Headless Chromium, its own profile, offline: every host name fails to resolve and
    every connection goes to a closed port, so a page that needed the network would show it."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
@pytest.mark.timeout(300)
def test_report_in_headless_chromium(reported, tmp_path):
    uri, rows, report = reported
    page = f"file://{report.path}"
    assert report.sections == [
        "summary",
        "leaderboard",
        "maps",
        "knn",
        "class-similarity",
        "derived",
        "errors",
    ]
    shot = tmp_path / "report.png"
    chromium(
        f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", page, tmp_path=tmp_path
    )
    img = Image.open(shot)
    assert img.format == "PNG" and img.size == WINDOW
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 10, "blank screenshot"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 100  # text, tables and pictures

    dom = parse(chromium("--dump-dom", page, tmp_path=tmp_path).stdout)
    evaluated = json.load(open(f"{uri}/_eval/eval.json"))
    assert sorted(evaluated["leaderboard"]) == ["pix", "proj"]
    board = dom.tables["leaderboard"]
    # one row per feature, in leaderboard order, with the scores eval.json holds
    assert [r[1] for r in board] == evaluated["leaderboard"]
    for rank, row in enumerate(board, 1):
        f = evaluated["features"][row[1]]
        assert row[:6] == [
            str(rank),
            row[1],
            str(f["dim"]),
            f"{f['knn_top1']:.4f}",
            f"{f['knn_top5']:.4f}",
            f"{f['linear_top1']:.4f}",
        ]
        assert row[6:8] == [str(f["n_train"]), str(f["n_test"])]
    # error rows by reason, most frequent first
    assert [r[:2] for r in dom.tables["errors"]] == [
        ["corrupt or truncated JPEG", "2"],
        ["empty file", "1"],
    ]
    assert rows["path"][8] in dom.tables["errors"][0][2]
    # the pictures rendered from inline data: leaderboard chart, maps, kNN grid, classes
    srcs = [v for tag, k, v in dom.attrs if tag == "img" and k == "src"]
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for key in ("maps", "knn", "class-similarity"):
        assert os.path.getsize(f"{uri}/_report/{key}-pix.png") > 1000


def test_report_needs_no_network(reported):
    """Nothing on the page is fetched: no script, stylesheet link or frame, no URL with a
    scheme or a host in any attribute or in the CSS; every picture is a PNG data: URI."""
    _, _, report = reported
    page = open(report.path, encoding="utf-8").read()
    tree = parse(page)
    assert not {tag for tag, _, _ in tree.attrs} & {"script", "link", "iframe", "object"}
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    urls = [(tag, k, v) for tag, k, v in tree.attrs if k in ("src", "href", "srcset", "action")]
    assert urls and all(v.startswith("data:image/png;base64,") for _, _, v in urls), urls
    for _, _, v in urls:
        Image.open(io.BytesIO(base64.b64decode(v.split(",", 1)[1]))).verify()
    # nothing that names a network location anywhere, as text or attribute
    assert not re.search(r"(https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)


def test_everything_written_beside_the_output_is_vitflows_own(reported):
    """eval, index, dedup and report folders are all ones `--overwrite` removes with the
    output (vitflow.sinks.DERIVED_FOLDERS): nothing there counts as someone else's file."""
    import fsspec

    from vitflow.sinks import output_files

    uri, _, _ = reported
    ours, foreign = output_files(fsspec.filesystem("file"), uri)
    assert foreign == []
    assert {p.split("/")[0] for p in ours if "/" in p} == {"_eval", "_index", "_dedup", "_report"}


def test_error_reasons_group_by_cause():
    from vitflow.analysis.report import error_reason

    assert error_reason(ERRORS[3]) == error_reason(ERRORS[8]) == "corrupt or truncated JPEG"
    assert error_reason(ERRORS[12]) == "empty file"
    assert error_reason(None) == "unknown"
    assert error_reason("cannot identify image file") == "cannot identify image file"


# --- the exploring commands, as a user runs them ---


def vitflow(*args, timeout=120) -> subprocess.CompletedProcess:
    """The CLI in a subprocess. None of these commands starts Ray; the environment is read
    at call time, so whatever the session set up (the shared Ray's settings) is inherited.
    One OpenMP thread, as ``one_openmp_thread`` (tests/conftest.py) gives in-process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*VITFLOW, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.timeout(400)
def test_cli_index_search_dedup_report(tmp_path):
    pytest.importorskip("faiss")
    uri, rows = write_digits_output(tmp_path, per_class=6, parts=2)
    ok = [i for i, s in enumerate(rows["status"]) if s == "ok"]

    r = vitflow("index", uri, "-f", "pix")
    assert r.returncode == 0, r.stderr
    assert "recall@10 : 1.0000" in r.stdout and "Flat (flat)" in r.stdout, r.stdout
    meta = json.load(open(f"{uri}/_index/pix.json"))
    assert meta["rows"] == len(ok)
    assert os.path.getsize(f"{uri}/_index/pix.faiss") > 0
    assert os.path.exists(f"{uri}/_index/pix.rows.parquet")

    query = rows["id"][ok[7]]
    r = vitflow("search", uri, "--id", query, "-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "flat index" in lines[0] and len(lines) == 4, r.stdout
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-4)
    assert first[-1] == rows["path"][ok[7]]

    r = vitflow("dedup", uri, "--threshold", "0.9", "--method", "exact")
    assert r.returncode == 0, r.stderr
    assert "exact blocked products" in r.stdout, r.stdout
    info = json.load(open(f"{uri}/_dedup/groups.json"))
    assert info["threshold"] == 0.9 and info["rows"] == len(ok)
    assert os.path.exists(f"{uri}/_dedup/groups.parquet")

    r = vitflow("report", uri, "--map-rows", "30", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{uri}/_report/index.html" in r.stdout, r.stdout
    page = open(f"{uri}/_report/index.html", encoding="utf-8").read()
    assert 'class="leaderboard"' in page and "Near-duplicates (pix" in page
    assert os.path.exists(f"{uri}/_eval/eval.json")  # eval ran first

    # a mistake is one sentence on stderr and exit code 1, for each command
    for args in (
        ["index", uri, "-f", "nope"],
        ["search", uri, "--id", query, "-f", "nope"],
        ["dedup", uri, "-f", "nope"],
        ["report", uri, "-f", "nope", "--no-eval"],
    ):
        r = vitflow(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "feature 'nope' is not in" in r.stderr and "Traceback" not in r.stderr, args
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
