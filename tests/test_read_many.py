"""Tests for vitflow.storage.read_many: many reads in flight through a real S3 server (moto)
behind the fault proxy with added latency; per-file errors in their slots; an outage stops
the whole call."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.conftest import free_port, serving
from vitflow.errors import StorageUnavailable
from vitflow.storage import UnreadableFile, read_bytes, read_many

pytestmark = pytest.mark.timeout(120)

LATENCY_MS = 200  # well above what moto itself takes per request here (~20-50 ms)
N = 40


def proxy_cmd(s3_endpoint: str, port: int, *extra: str) -> list[str]:
    script = os.path.join(os.path.dirname(__file__), "faultproxy.py")
    upstream = s3_endpoint.rsplit(":", 1)[1]
    return [sys.executable, script, upstream, str(port), "2", *extra]


@pytest.fixture()
def slow_proxy(s3_endpoint):
    """The fault proxy, waiting LATENCY_MS before each request (a distant region)."""
    port = free_port()
    with serving(proxy_cmd(s3_endpoint, port, "--latency-ms", str(LATENCY_MS)), port) as url:
        yield url


@pytest.fixture()
def fault_proxy(s3_endpoint):
    """The fault proxy without added latency (503s for "flaky" and "broken" keys)."""
    port = free_port()
    with serving(proxy_cmd(s3_endpoint, port), port) as url:
        yield url


def options(endpoint: str, pool: int = 10) -> dict:
    # One attempt inside botocore, so that the attempts counted are vitflow's; botocore's
    # connection pool (10 by default) must be as large as the requests wanted in flight.
    config = {"retries": {"max_attempts": 1}, "max_pool_connections": pool}
    return {"endpoint_url": endpoint, "config_kwargs": config}


@pytest.fixture()
def objects(s3_bucket):
    """N objects of 1000 + 37 i bytes: (fs, bucket, endpoint, paths, contents)."""
    fs, bucket, endpoint = s3_bucket
    contents = {f"s3://{bucket}/imgs/img-{i:02d}.bin": os.urandom(1000 + 37 * i) for i in range(N)}
    fs.pipe({p[len("s3://") :]: data for p, data in contents.items()})
    return fs, bucket, endpoint, list(contents), contents


def test_requests_overlap_and_the_bytes_equal_sequential_reads(objects, slow_proxy):
    _, _, endpoint, paths, contents = objects
    expected = [read_bytes(p, options(endpoint)) for p in paths[:5]]  # one after another
    assert expected == [contents[p] for p in paths[:5]]
    read_many(paths[:1], options(slow_proxy, 16))  # client set up outside the timing

    started = time.monotonic()
    got = read_many(paths, options(slow_proxy, 16), max_in_flight=16)
    took = time.monotonic() - started

    assert got == [contents[p] for p in paths]
    # One after another, N reads cannot take less than N x 200 ms = 8 s; overlapped they
    # take 3 rounds of 200 ms plus the server's own time (2 s with the machine loaded).
    assert took < N * LATENCY_MS / 1000 / 2, f"{N} reads took {took:.2f} s: not overlapped"


def test_max_in_flight_bounds_the_requests_open_at_once(objects, slow_proxy):
    _, _, _, paths, contents = objects
    read_many(paths[:1], options(slow_proxy))
    started = time.monotonic()
    got = read_many(paths[:8], options(slow_proxy), max_in_flight=2)
    took = time.monotonic() - started
    assert got == [contents[p] for p in paths[:8]]
    # 8 requests, 2 at a time, each held 200 ms by the proxy: at least 4 rounds.
    assert took >= 4 * LATENCY_MS / 1000


def test_per_file_errors_stay_in_their_slots_and_the_others_are_read(objects, fault_proxy):
    fs, bucket, _, paths, contents = objects
    for key in ("broken.bin", "flaky.bin", "odd[1]*?.bin"):
        fs.pipe_file(f"{bucket}/imgs/{key}", key.encode())
    missing = f"s3://{bucket}/imgs/missing.bin"
    broken = f"s3://{bucket}/imgs/broken.bin"  # the proxy answers 503 SlowDown, always
    flaky = f"s3://{bucket}/imgs/flaky.bin"  # 503 twice, then the object
    odd = f"s3://{bucket}/imgs/odd[1]*?.bin"  # glob characters are part of the key
    ask = [paths[0], missing, broken, paths[1], flaky, odd, paths[0]]

    # s3fs retries a SlowDown 5 times itself (~2 s) inside each of vitflow's attempts: 2
    # attempts instead of the default 4 keep the test short.
    got = read_many(ask, options(fault_proxy), attempts=2, backoff_s=0.05)

    assert got[0] == got[6] == contents[paths[0]]  # duplicates kept
    assert got[3] == contents[paths[1]]
    assert isinstance(got[1], FileNotFoundError)
    assert isinstance(got[2], OSError) and "after 2 attempts" in str(got[2])
    assert "SlowDown" in str(got[2]) or "reduce your request rate" in str(got[2])
    assert got[4] == b"flaky.bin"
    assert got[5] == b"odd[1]*?.bin"


def test_objects_over_max_bytes_are_refused_in_their_slot(objects):
    _, _, endpoint, paths, contents = objects
    got = read_many(paths[:3], options(endpoint), max_bytes=1037)
    assert got[0] == contents[paths[0]]  # 1000 bytes
    assert got[1] == contents[paths[1]]  # 1037 bytes: exactly the cap
    assert isinstance(got[2], UnreadableFile) and "max_file_bytes=1037" in str(got[2])


def test_an_unreachable_store_stops_the_whole_call(objects, tmp_path):
    _, _, endpoint, paths, _ = objects
    port = free_port()
    down = tmp_path / "down"
    down.touch()  # the proxy drops every connection without an answer
    with serving(proxy_cmd(endpoint, port, "--down-file", str(down)), port) as url:
        with pytest.raises(StorageUnavailable, match=r"retry_seconds=1\b.*--resume"):
            read_many(paths[:2], options(url), retry_s=1, backoff_s=0.1)


def test_local_files_in_order_with_their_errors(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"A" * 10)
    b.write_bytes(b"B" * 20)
    (tmp_path / "folder").mkdir()
    paths = [str(b), str(tmp_path / "missing.jpg"), str(a), str(tmp_path / "folder")]

    got = read_many(paths, max_bytes=15)

    assert isinstance(got[0], UnreadableFile) and "max_file_bytes=15" in str(got[0])
    assert isinstance(got[1], FileNotFoundError)
    assert got[2] == b"A" * 10
    assert isinstance(got[3], IsADirectoryError)
    assert read_many([]) == []


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="Expected max_in_flight >= 1, but got 0"):
        read_many(["x"], max_in_flight=0)
