"""Ray starts beside the driver's checks (runtime.ray_starting), in a fresh process as a CLI
run has it: the stream takes the started Ray over, and a job refused before its stream
shuts it down again and shows nothing of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vitflow.synthetic import make_image_folder

SCRIPT = r"""
import json, sys
import ray
from vitflow.config import load_config
from vitflow.embed import run_embed
from vitflow.errors import OutputExistsError

images, out = sys.argv[1], sys.argv[2]
cfg = load_config(base={
    "source": {"uri": images},
    "model": {"name": "resnet18", "weights": "random"},
    "output": {"uri": out},
    "compute": {"batch_size": 4, "local_num_cpus": 2},
})
# Refused before its stream (the output holds someone's file): Ray was starting meanwhile,
# and its first start in a process logs a notice about token authentication.
try:
    run_embed(cfg)
    raise SystemExit("the job was not refused")
except OutputExistsError:
    pass
print("refused; ray initialized:", ray.is_initialized(), file=sys.stderr, flush=True)
print("MARK", file=sys.stderr, flush=True)
import os
os.remove(os.path.join(out, "notes.txt"))
result = run_embed(cfg)
print(json.dumps({"timing": result.manifest["timing"], "ok": result.ok, "listed": result.listed,
                  "initialized": ray.is_initialized()}))
"""


@pytest.mark.timeout(300)
def test_ray_starts_beside_the_checks_and_a_refused_job_leaves_none(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, per_class=2, splits=("train",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VITFLOW_EARLY_RAY")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(images), str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = r.stderr.split("MARK", 1)
    # The refused job's Ray was shut down, and what it logged while starting never showed.
    assert "refused; ray initialized: False" in before
    assert "ray" not in before.replace("refused; ray initialized", "").lower(), before
    assert "SIGTERM handler is not set" not in after  # ray_starting sets one itself
    got = json.loads(r.stdout.strip().splitlines()[-1])
    t = got["timing"]
    assert got["ok"] == got["listed"] > 0 and got["initialized"] is False
    # The stream waited only for the part of Ray's start that the checks did not cover.
    # Run one after the other, the two would be equal.
    assert 0 <= t["ray_wait_seconds"] < t["ray_start_seconds"]


def test_what_ray_logs_while_starting_shows_when_a_stream_takes_it_over(monkeypatch):
    """The hold-back itself, with the start replaced by one that only logs (the test above
    starts a real Ray): records of the start thread reach Ray's handlers only once the
    start is taken over, and never when the job stops first."""
    import logging

    import ray  # noqa: F401  (its logger and handlers)

    from vitflow import runtime

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep(level=logging.INFO)
    logging.getLogger("ray").addHandler(keep)

    def logging_start(ray_module, address, num_cpus, fail=False):
        logging.getLogger("ray.fake").warning("ray is starting")
        logging.getLogger("ray._private.worker").warning("SIGTERM handler is not set because")
        if fail:
            raise RuntimeError("no cluster at that address")

    try:
        monkeypatch.setattr(runtime, "_init", logging_start)
        start = runtime._RayStart(None, None)
        start.ready.wait(30)
        assert seen == []  # held while nothing has used the started Ray
        start.wait()
        assert seen == ["ray is starting"]  # shown once taken over; the SIGTERM note dropped
        start.released.set()

        seen.clear()
        monkeypatch.setattr(runtime, "_init", lambda *a: logging_start(*a, fail=True))
        refused = runtime._RayStart(None, None)
        refused.close()  # the job stopped before its stream
        assert seen == [] and not refused.thread.is_alive()
        with pytest.raises(RuntimeError, match="no cluster"):
            refused.wait()  # a stream that does take it over gets the start's error
    finally:
        logging.getLogger("ray").removeHandler(keep)
