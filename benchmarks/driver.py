"""Run the vitflow CLI in this process and record the driver's own peak memory.

Usage: python benchmarks/driver.py PEAK_JSON embed JOB.yaml [CLI options...]

The same as ``python -m vitflow.cli embed ...``; at exit PEAK_JSON gets this process's peak
resident set size (``getrusage(RUSAGE_SELF)``): the driver alone, without Ray's processes or
the decode and model workers, which ``RUSAGE_CHILDREN`` would mix in.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path


def _record(out: Path, pid: int) -> None:
    if os.getpid() != pid:  # a forked child exiting through Python: not the driver
        return
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out.write_text(json.dumps({"peak_rss_mb": round(peak_kib / 1024, 1)}))


if __name__ == "__main__":
    atexit.register(_record, Path(sys.argv[1]), os.getpid())
    sys.argv = ["vitflow", *sys.argv[2:]]
    from vitflow.cli import main

    main()
