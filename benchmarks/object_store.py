"""Object storage: the same vitflow run from an S3 server with and without ~30 ms added per
request (issue 10).

moto's S3 server (``python -m moto.server``, in memory) runs in a child process with the
photos (default 1,000 at 1280x960) in a bucket; ``tests/faultproxy.py`` sits in front of
it. The decode-bound job of decode_bound.py (``mobilenetv3_small_050``, random weights, so
that reads are not hidden behind a slow model) runs three times, each ``vitflow embed``
end to end in its own process (runs.run_vitflow), reading the source from S3 and writing
its output locally:

  proxy   - through the proxy, nothing added;
  +30 ms  - through the proxy, which waits 30 ms before forwarding each request (a
            distant region);
  direct  - straight to moto: what the proxy itself costs, for reference (run last, so
            that the pair the goal compares runs side by side).

vitflow's decode actors read the files of their block with ``storage.read_in_flight``
(default 16) requests in flight. Goal (issue 10): (+30 ms) / proxy >= 0.8. Prints one
table, writes bench-out/results/object_store.json; asserts nothing.

Run:  .venv/bin/python benchmarks/object_store.py            (a few minutes on 2 cores)
      .venv/bin/python benchmarks/object_store.py --quick    (32 images, smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Dummy credentials for the local server; the vitflow processes inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "vitflow-bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vitflow-bench-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from photos import describe_set, photo_set, set_paths  # noqa: E402  (benchmarks/ on sys.path)
from report import Case, Row  # noqa: E402
from runs import REPO, run_vitflow, wait_for_quiet  # noqa: E402

GOAL = 0.8
FAULT_PROXY = REPO / "tests" / "faultproxy.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], port: int):
    """Run a local server until the block ends; yields its http://127.0.0.1 URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{' '.join(cmd)} did not start listening on port {port}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def moto_server():
    port = free_port()
    return serving([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)


def fault_proxy(upstream: str, latency_ms: float):
    port = free_port()
    up = upstream.rsplit(":", 1)[1]
    cmd = [sys.executable, str(FAULT_PROXY), up, str(port), "0", "--latency-ms", str(latency_ms)]
    return serving(cmd, port)


def upload(paths: list[Path], root: Path, endpoint: str) -> str:
    """Put the photos into a new bucket; returns the source URI."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    remote = [f"{bucket}/photos/{p.relative_to(root).as_posix()}" for p in paths]
    t0 = time.perf_counter()
    fs.put([str(p) for p in paths], remote)
    print(
        f"uploaded {len(paths)} photos to s3://{bucket}/photos ({time.perf_counter() - t0:.0f} s)"
    )
    return f"s3://{bucket}/photos"


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    ap.add_argument("--model", default="mobilenetv3_small_050")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--workdir", default="./bench-out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 images")
    ap.add_argument("--max-load", type=float, default=None, help="wait for a quieter machine")
    a = ap.parse_args()
    if a.quick:
        a.num_images = min(a.num_images, 32)
    work = Path(a.workdir).resolve()
    root = photo_set(work, a.num_images, a.width, a.height)
    paths = set_paths(root)
    with moto_server() as moto:
        source = upload(paths, root, moto)
        if a.max_load:
            wait_for_quiet(a.max_load, 600)
        case = Case(
            "object_store",
            f"Object storage: vitflow embed from S3 (moto) with and without {a.latency_ms:g} ms "
            "added per request",
        )
        job = {
            "kind": "embed",
            "source": {"uri": source},
            "model": {"name": a.model, "weights": "random"},
            "compute": {"device": "cpu"},
        }
        runs = {}
        # The pair the goal compares runs first and side by side; "direct" (the proxy's own
        # cost, for reference) last.
        for name, latency in (("proxy", 0.0), ("latency", a.latency_ms), ("direct", None)):
            with contextlib.ExitStack() as stack:
                url = moto if latency is None else stack.enter_context(fault_proxy(moto, latency))
                runs[name] = run_vitflow(
                    {**job, "storage": {"endpoint_url": url}},
                    work=work / "object_store",
                    name=name,
                )
    direct, proxy, slow = runs["direct"], runs["proxy"], runs["latency"]
    in_flight = 16  # StorageConfig.read_in_flight's default; the job leaves it alone
    case.setup = [
        f"images   : {describe_set(paths, a.width, a.height)}, in moto's in-memory S3 server",
        f"model    : {a.model}, random weights; output written locally",
        f"reads    : storage.read_in_flight {in_flight} per decode block; proxy = "
        f"tests/faultproxy.py (a thread per request, a new upstream connection each)",
    ]
    for label, run in (
        ("through the proxy, nothing added", proxy),
        (f"through the proxy, +{a.latency_ms:g} ms per request", slow),
        ("direct to moto (reference)", direct),
    ):
        case.rows.append(Row(f"{label}: end to end", run.listed, run.seconds))
        case.rows.append(Row(f"{label}: steady state", None, None, run.steady))
    e2e = {k: r.listed / r.seconds for k, r in runs.items()}
    case.ratio(f"+{a.latency_ms:g} ms / proxy, end to end", e2e["latency"], e2e["proxy"], GOAL)
    case.ratio(f"+{a.latency_ms:g} ms / proxy, steady state", slow.steady, proxy.steady, GOAL)
    case.ratio("proxy / direct, end to end (the proxy's own cost)", e2e["proxy"], e2e["direct"])
    case.notes = [f"{k}: {r.breakdown()}" for k, r in runs.items()]
    case.details = {k: r.details() for k, r in runs.items()}
    case.print()
    case.save(work, a.quick)


if __name__ == "__main__":
    main()
