"""Never lose or corrupt data, and one sentence for every failure, probed with real things:
damaged outputs, a full tmpfs, two CLI processes on one output, Ctrl-C, an S3 endpoint that
goes away (through the fault proxy), and locks on a real S3 server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import (
    TINY,
    free_port,
    output_progress,
    serving,
    wait_until,
)
from vitflow.config import load_config
from vitflow.embed import run_embed
from vitflow.errors import DiskFull, OutputLocked, VitflowError
from vitflow.loading import load_embeddings

NAME, KW = TINY["vit"]
CLI = [sys.executable, "-m", "vitflow.cli"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from vitflow.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("safety")
    make_image_folder(root / "images", per_class=30, size=(64, 48), with_bad_files=True)
    torch.manual_seed(4)
    save_file(timm.create_model(NAME, num_classes=0, **KW).state_dict(), root / "w.safetensors")
    return root


def job_dict(root: Path, out: str, **compute) -> dict:
    return {
        "kind": "embed",
        "source": {"uri": str(root / "images")},
        "model": {"name": NAME, "kwargs": KW, "checkpoint": str(root / "w.safetensors")},
        "features": [{"name": "emb", "layers": 2, "pool": "mean"}],
        "output": {"uri": out, "rows_per_file": 6},
        "compute": {"batch_size": 4, **compute},
    }


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("clean") / "out"
    run_embed(load_config(base=job_dict(corpus, str(out))))
    return out


def same_rows(df, ref) -> None:
    df, ref = df.set_index("id").sort_index(), ref.set_index("id").sort_index()
    assert list(df.index) == list(ref.index) and (df["status"] == ref["status"]).all()
    ok = df["status"] == "ok"
    np.testing.assert_allclose(np.stack(df["emb"][ok]), np.stack(ref["emb"][ok]), atol=1e-6)


class Run:
    """A CLI run in its own session, attached to the shared test Ray (``ray_address``), so
    the test can signal or kill exactly the driver it started; the driver's job (its actors
    and tasks) dies with it."""

    def __init__(self, address: str, args: list[str], env: dict | None = None):
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": address, **(env or {})}
        self.proc = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.stop()
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def local_fs():
    import fsspec

    return fsspec.filesystem("file")


# --- readers refuse what is not whole -----------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_readers_refuse_an_incomplete_or_damaged_output(clean, tmp_path, caplog):
    full = load_embeddings(str(clean), include_errors=True)
    parts = sorted(p.name for p in clean.glob("part-*.parquet"))
    assert len(parts) >= 3

    # No manifest: the run never finished (killed, disk full).
    a = tmp_path / "no-manifest"
    shutil.copytree(clean, a)
    (a / "_manifest.json").unlink()
    with pytest.raises(VitflowError, match="has no _manifest.json.*--resume.*allow_incomplete"):
        load_embeddings(str(a))
    assert len(load_embeddings(str(a), include_errors=True, allow_incomplete=True)) == len(full)

    # A part missing: refused naming it; partial read on request, with a warning.
    b = tmp_path / "missing-part"
    shutil.copytree(clean, b)
    (b / parts[1]).unlink()
    with pytest.raises(VitflowError, match=f"{parts[1]} is missing"):
        load_embeddings(str(b))
    with caplog.at_level("WARNING", logger="vitflow.loading"):
        partial = load_embeddings(str(b), include_errors=True, allow_incomplete=True)
    assert len(partial) < len(full) and parts[1] in caplog.text

    # A truncated part is an error naming the file, even with allow_incomplete.
    c = tmp_path / "truncated"
    shutil.copytree(clean, c)
    data = (c / parts[0]).read_bytes()
    (c / parts[0]).write_bytes(data[: len(data) // 2])
    for allow in (False, True):
        with pytest.raises(VitflowError, match=f"part .*{parts[0]}.* is corrupt or truncated"):
            load_embeddings(str(c), allow_incomplete=allow)


def test_manifest_is_written_atomically_on_a_full_disk(tmp_path):
    """A full disk while the manifest is written leaves the previous one intact, never an
    empty file (tmpfs; the fault is ENOSPC from the kernel)."""
    from vitflow.manifest import write_manifest

    with full_disk(tmp_path, size_kb=64) as mnt:
        import fsspec

        fs = fsspec.filesystem("file")
        write_manifest(fs, str(mnt), {"counts": {"listed": 1}})
        before = (mnt / "_manifest.json").read_bytes()
        fill(mnt)
        with pytest.raises(DiskFull, match="disk full.*--resume"):
            write_manifest(fs, str(mnt), {"counts": {"listed": 2}, "pad": "x" * 200_000})
        assert (mnt / "_manifest.json").read_bytes() == before
        assert not list(mnt.glob("_tmp-*"))


# --- a full disk during a run: one sentence, then --resume finishes --------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_disk_full_mid_run_is_one_sentence_and_resume_finishes(
    corpus, clean, tmp_path, ray_address
):
    with full_disk(tmp_path, size_kb=1024) as mnt:
        out = mnt / "out"
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump(job_dict(corpus, str(out))))
        # Leave room for a few parts only: the run fills the disk part-way.
        fill(mnt, leave_kb=48)
        code, stdout, stderr = Run(ray_address, ["embed", str(cfg)]).finish()
        assert code == 1, stdout + stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: disk full") and "--resume" in last, stderr[-2000:]
        assert str(mnt) in last and "Traceback" not in stderr
        assert not (out / "_manifest.json").exists()
        (mnt / "ballast").unlink()  # free the space
        code, stdout, stderr = Run(ray_address, ["embed", str(cfg), "--resume"]).finish()
        assert code == 0, stderr[-3000:]
        same_rows(
            load_embeddings(str(out), include_errors=True),
            load_embeddings(str(clean), include_errors=True),
        )


# --- two runs on one output; Ctrl-C -----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_second_run_is_refused_and_ctrl_c_leaves_a_resumable_output(
    corpus, clean, tmp_path, ray_address
):
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job_dict(corpus, str(out), batch_size=1)))
    first = Run(ray_address, ["embed", str(cfg)])
    try:
        wait_until(
            lambda: output_progress(local_fs(), str(out))[1] >= 1 or first.proc.poll() is not None,
            240,
            "the first part of the first run",
        )
        assert first.proc.poll() is None, "the first run ended before the test could interfere"
        # A second CLI process on the same output, while the first is writing.
        code, stdout, stderr = Run(ray_address, ["embed", str(cfg), "--resume"]).finish()
        assert code == 1
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert "is being written by another vitflow run" in stderr
        assert f"pid {first.proc.pid}" in stderr and "Traceback" not in stderr
        # Ctrl-C in the terminal: SIGINT to the first run's process group.
        os.killpg(first.proc.pid, signal.SIGINT)
        code, stdout, stderr = first.finish(timeout=120)
    finally:
        first.stop()
    assert code == 130, stderr[-3000:]
    assert "interrupted: rerun the same command with --resume to finish" in stderr
    assert not (out / "_manifest.json").exists()
    code, stdout, stderr = Run(ray_address, ["embed", str(cfg), "--resume"]).finish()
    assert code == 0, stderr[-3000:]
    same_rows(
        load_embeddings(str(out), include_errors=True),
        load_embeddings(str(clean), include_errors=True),
    )


# --- S3: locks, and an endpoint that goes away -------------------------------------------------


def try_lock_elsewhere(endpoint: str, folder: str, stale_s: float = 300.0) -> str:
    """Take (and release) the lock from another process, as a second run would."""
    code = f"""
import s3fs
from vitflow.errors import OutputLocked
from vitflow.locking import RunLock
fs = s3fs.S3FileSystem(endpoint_url={endpoint!r})
try:
    with RunLock(fs, {folder!r}, command="reindex", stale_s={stale_s}):
        print("TOOK")
except OutputLocked as e:
    print("REFUSED", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_s3_lock_is_exclusive_and_a_stale_one_is_taken_over(s3_bucket):
    from vitflow.locking import LOCK_NAME, RunLock

    fs, bucket, endpoint = s3_bucket
    folder = f"{bucket}/out"
    holder = RunLock(fs, folder, command="embed", heartbeat_s=1.0)
    holder.acquire()
    try:
        answer = try_lock_elsewhere(endpoint, folder)
        assert answer.startswith("REFUSED") and f"pid {os.getpid()}" in answer, answer
        assert "another vitflow run" in answer
        # While it beats, even a lock that looks old by the taker's clock is not taken: the
        # taker watches the object, and it changes.
        time.sleep(1.5)
        assert try_lock_elsewhere(endpoint, folder, stale_s=1.0).startswith("REFUSED")
        # The holder dies (stops beating): the object stops changing and is taken over.
        holder._stop.set()
        holder._thread.join()
        time.sleep(1.5)  # its last beat is now older than stale_s, whatever the start-up
        assert try_lock_elsewhere(endpoint, folder, stale_s=1.0) == "TOOK"
        assert not fs.exists(f"{folder}/{LOCK_NAME}")  # the taker released it
        fs.pipe_file(f"{folder}/{LOCK_NAME}", b'{"run_id": "someone else"}')
    finally:
        holder.release()  # the stalled holder wakes up: it must not delete another's lock
    assert fs.cat_file(f"{folder}/{LOCK_NAME}") == b'{"run_id": "someone else"}'
    fs.rm_file(f"{folder}/{LOCK_NAME}")
    with RunLock(fs, folder, command="embed"):
        assert fs.exists(f"{folder}/{LOCK_NAME}")
        # Re-entrant in one process: the CLI holds the lock around run_embed's own.
        with RunLock(fs, folder, command="embed"):
            pass
        assert fs.exists(f"{folder}/{LOCK_NAME}")
    assert not fs.exists(f"{folder}/{LOCK_NAME}")


def test_s3_run_that_lost_its_lock_stops(s3_bucket):
    from vitflow.locking import LOCK_NAME, RunLock

    fs, bucket, _ = s3_bucket
    folder = f"{bucket}/lost"
    lock = RunLock(fs, folder, command="embed", heartbeat_s=0.5)
    with lock:
        lock.check()  # held
        fs.pipe_file(f"{folder}/{LOCK_NAME}", b'{"run_id": "x", "command": "reindex"}')
        wait_until(lambda: lock.lost is not None, 30, "the heartbeat to notice")
        with pytest.raises(OutputLocked, match="was taken over by reindex"):
            lock.check()
    assert fs.exists(f"{folder}/{LOCK_NAME}")  # the new holder's lock stays


@pytest.fixture()
def outage_proxy(s3_endpoint, tmp_path):
    """The fault proxy in front of the S3 server; the endpoint is down while ``flag`` exists."""
    port = free_port()
    flag = tmp_path / "endpoint-down"
    script = os.path.join(os.path.dirname(__file__), "faultproxy.py")
    upstream = s3_endpoint.rsplit(":", 1)[1]
    cmd = [sys.executable, script, upstream, str(port), "0", "--down-file", str(flag)]
    with serving(cmd, port) as url:
        yield url, flag


@pytest.mark.timeout(120)
def test_lock_heartbeat_recovers_from_a_stale_etag(s3_bucket):
    """A beat whose write landed but whose answer (or the ETag read after it) was lost leaves
    the run holding a stale ETag: every later conditional write would fail and the live
    lock would look stale to other runs. The next failed beat finds the lock still ours and
    takes its current ETag."""
    from vitflow.locking import LOCK_NAME, RunLock

    fs, bucket, _ = s3_bucket
    folder = f"{bucket}/etag"
    lock = RunLock(fs, folder, command="embed", heartbeat_s=0.3)
    with lock:
        lock._etag = '"0123456789abcdef0123456789abcdef"'  # what a lost answer leaves behind
        fs.invalidate_cache(f"{folder}/{LOCK_NAME}")
        before = fs.cat_file(f"{folder}/{LOCK_NAME}")
        wait_until(lambda: fs.cat_file(f"{folder}/{LOCK_NAME}") != before, 30, "a beat again")
        assert lock.lost is None
        lock.check()
    assert not fs.exists(f"{folder}/{LOCK_NAME}")


@pytest.mark.timeout(120)
def test_lock_heartbeat_rides_out_an_outage(s3_bucket, outage_proxy):
    """While the endpoint is away every beat fails, and so does the look at who holds the
    lock: the heartbeat thread must live through it (no traceback, not 'lost') and beat again
    once the store is back."""
    import s3fs

    from vitflow.locking import LOCK_NAME, RunLock

    _, bucket, _ = s3_bucket
    proxy, flag = outage_proxy
    fs = s3fs.S3FileSystem(endpoint_url=proxy, config_kwargs={"retries": {"max_attempts": 1}})
    folder = f"{bucket}/beat"
    lock = RunLock(fs, folder, command="embed", heartbeat_s=0.3)
    with lock:
        flag.touch()
        try:
            time.sleep(10)  # failed beats (s3fs retries each ~2 s), each followed by a failed look
        finally:
            flag.unlink()
        assert lock._thread.is_alive() and lock.lost is None
        before = fs.cat_file(f"{folder}/{LOCK_NAME}")
        wait_until(lambda: fs.cat_file(f"{folder}/{LOCK_NAME}") != before, 30, "a beat after")
        lock.check()
    assert not fs.exists(f"{folder}/{LOCK_NAME}")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_s3_outage_past_the_budget_stops_resumably_and_a_short_one_is_ridden_out(
    corpus, clean, s3_bucket, outage_proxy, tmp_path, ray_address
):
    fs, bucket, _ = s3_bucket
    proxy, flag = outage_proxy
    fs.put(str(corpus / "images"), f"{bucket}/images", recursive=True)
    job = job_dict(corpus, f"s3://{bucket}/out", batch_size=2)
    job["source"]["uri"] = f"s3://{bucket}/images"
    job["storage"] = {"endpoint_url": proxy, "retry_seconds": 8, "client_retries": 1}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job))
    out = f"{bucket}/out"

    # 1. The endpoint goes away for longer than storage.retry_seconds: one sentence.
    run = Run(ray_address, ["embed", str(cfg)])
    try:
        wait_until(lambda: output_progress(fs, out)[1] >= 1, 240, "a finished part")
        flag.touch()
        code, stdout, stderr = run.finish(timeout=240)
    finally:
        run.stop()
        flag.unlink(missing_ok=True)
    assert code == 1, stdout[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not ") and "--resume" in last, stderr[-3000:]
    assert "retry_seconds=8" in last, last
    tb = stderr.find("Traceback")
    assert tb < 0, stderr[max(0, tb - 1500) : tb + 3000]
    assert not output_progress(fs, out)[2]

    # 2. --resume with a budget that outlasts a 6 s outage in the middle: it completes.
    job["storage"]["retry_seconds"] = 90
    job["compute"]["batch_size"] = 4  # not part of what a resume must match
    cfg.write_text(yaml.safe_dump(job))
    run = Run(ray_address, ["embed", str(cfg), "--resume"])
    try:
        parts_before = output_progress(fs, out)[1]
        wait_until(lambda: output_progress(fs, out)[1] > parts_before, 240, "resumed progress")
        flag.touch()
        time.sleep(6)
        flag.unlink()
        code, stdout, stderr = run.finish(timeout=300)
    finally:
        run.stop()
        flag.unlink(missing_ok=True)
    assert code == 0, stderr[-3000:]
    got = load_embeddings(
        f"s3://{bucket}/out", include_errors=True, storage_options={"endpoint_url": proxy}
    )
    ref = load_embeddings(str(clean), include_errors=True)
    assert (got["status"] == "ok").sum() == (ref["status"] == "ok").sum()  # no outage error rows
    same_rows(got, ref)


# --- helpers: a real full filesystem ------------------------------------------------------------


class full_disk:
    """A small tmpfs mounted for the test (root can mount; else the test is skipped, naming
    why). ENOSPC then comes from the kernel, as on a real full disk."""

    def __init__(self, tmp_path: Path, size_kb: int):
        self.mnt = tmp_path / "tmpfs"
        self.size_kb = size_kb

    def __enter__(self) -> Path:
        self.mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k", "tmpfs", str(self.mnt)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here to fill a disk ({r.stderr.strip()})")
        return self.mnt

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def fill(mnt: Path, leave_kb: int = 0) -> None:
    """Fill the tmpfs with a ballast file, leaving about ``leave_kb`` free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize - leave_kb * 1024
    with open(mnt / "ballast", "wb") as f:
        try:
            f.write(b"\0" * max(0, free))
        except OSError:
            pass


# --- a file that changed since the listing; a failing store; Ray-wrapped errors -----------------


def test_read_time_checks_refuse_what_the_listing_would_have(tmp_path):
    from vitflow.storage import UnreadableFile, read_bytes

    root = tmp_path / "src"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("hunter2")
    (root / "inside.jpg").write_bytes(b"x" * 10)
    (root / "link_in.jpg").symlink_to(root / "inside.jpg")
    # Listed as a regular file, then swapped for a link out of the source, a FIFO, a giant.
    (root / "swapped.jpg").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(root / "pipe.jpg")
    (root / "big.jpg").write_bytes(b"y" * 2048)
    kw = {"root": str(root), "follow_symlinks": False, "max_bytes": 1024}
    assert read_bytes(str(root / "link_in.jpg"), **kw) == b"x" * 10  # a link inside: fine
    with pytest.raises(UnreadableFile, match="symlink outside the source") as info:
        read_bytes(str(root / "swapped.jpg"), **kw)
    assert "hunter2" not in str(info.value)
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_bytes(str(root / "pipe.jpg"), **kw)  # would block forever if opened for reading
    with pytest.raises(UnreadableFile, match="2048 bytes, more than source.max_file_bytes=1024"):
        read_bytes(str(root / "big.jpg"), **kw)
    assert read_bytes(str(root / "swapped.jpg"), follow_symlinks=True) == b"hunter2"


def test_listing_refuses_files_past_max_file_bytes(tmp_path):
    from vitflow.config import SourceConfig
    from vitflow.sources import list_images

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "small.jpg").write_bytes(b"x" * 10)
    (tmp_path / "a" / "huge.jpg").write_bytes(b"x" * 5000)
    t = list_images(SourceConfig(uri=str(tmp_path), max_file_bytes=1000)).table.to_pylist()
    why = {r["relpath"]: r["__list_error"] for r in t}
    assert (
        why["a/small.jpg"] is None and "more than source.max_file_bytes=1000" in why["a/huge.jpg"]
    )


def test_file_after_file_failing_the_same_way_is_the_store_not_the_files():
    from vitflow.decode_task import ReadBreaker
    from vitflow.errors import StorageUnavailable

    b = ReadBreaker()
    for _ in range(ReadBreaker.BREAKER_READS - 1):
        b.failed(PermissionError("The provided token has expired."))
    b.ok()  # one good read resets it: those were bad files
    for _ in range(ReadBreaker.BREAKER_READS * 2):
        b.failed(FileNotFoundError("gone"))  # deleted files are each their own problem
    for _ in range(ReadBreaker.BREAKER_READS - 1):
        b.failed(OSError("503 Service Unavailable"))
    with pytest.raises(StorageUnavailable, match="8 files in a row.*--resume"):
        b.failed(OSError("503 Service Unavailable"))
    # On S3, access denied file after file is expired credentials: the store. On a local
    # disk it is files this user may not read (a root-owned folder): each its own error row.
    with pytest.raises(StorageUnavailable):
        for _ in range(ReadBreaker.BREAKER_READS):
            b.failed(PermissionError("Access Denied"))
    local = ReadBreaker(local=True)
    for _ in range(ReadBreaker.BREAKER_READS * 2):
        local.failed(PermissionError("[Errno 13] Permission denied: '/photos/root/a.jpg'"))
    for _ in range(ReadBreaker.BREAKER_READS - 1):
        local.failed(OSError("[Errno 5] Input/output error"))
    with pytest.raises(StorageUnavailable):
        local.failed(OSError("[Errno 5] Input/output error"))  # a failing disk still stops


def test_a_job_error_raised_across_ray_is_its_own_sentence():
    from ray.exceptions import RayTaskError

    from vitflow.errors import DiskFull, job_error_in

    try:
        raise DiskFull("disk full: no space left to write /x; free space there")
    except DiskFull as e:
        wrapped = RayTaskError("write", "Traceback (most recent call last):\n ...", e)
        dual = wrapped.as_instanceof_cause()  # what Ray raises: RayTaskError(DiskFull)
    assert isinstance(dual, DiskFull) and "\n" in str(dual)  # a remote traceback, not a sentence
    got = job_error_in(dual)
    assert type(got) is DiskFull and str(got).startswith("disk full") and "\n" not in str(got)


def test_bare_part_files_are_not_taken_for_a_vitflow_output(tmp_path):
    import fsspec

    from vitflow.sinks import output_files

    fs = fsspec.filesystem("file")
    (tmp_path / "part-00000.parquet").write_bytes(b"someone else's")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "deep.bin").write_bytes(b"")
    ours, foreign = output_files(fs, str(tmp_path))
    assert ours == [] and foreign == ["data/", "part-00000.parquet"]
    (tmp_path / "_manifest.json").write_text("{}")
    ours, foreign = output_files(fs, str(tmp_path))
    assert "part-00000.parquet" in ours and foreign == ["data/"]


def test_analysis_folders_beside_an_output_are_vitflows_own(tmp_path):
    """`vitflow eval`/`fit`/`index`/`report` write _eval/, _transforms/, ... beside the parts:
    --overwrite removes them with the output; beside no vitflow output they are foreign."""
    import fsspec

    from vitflow.sinks import output_files, remove_output

    fs = fsspec.filesystem("file")
    (tmp_path / "_eval").mkdir()
    (tmp_path / "_eval" / "eval.json").write_text("{}")
    assert output_files(fs, str(tmp_path)) == ([], ["_eval/"])  # no manifest: not ours
    (tmp_path / "_manifest.json").write_text("{}")
    (tmp_path / "_transforms").mkdir()
    (tmp_path / "_transforms" / "pca.safetensors").write_bytes(b"")
    ours, foreign = output_files(fs, str(tmp_path))
    assert foreign == [] and "_eval/eval.json" in ours and "_transforms/pca.safetensors" in ours
    assert remove_output(fs, str(tmp_path)) == 3 and list(tmp_path.iterdir()) == []
