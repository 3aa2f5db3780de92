"""Ask the Ray autoscaler for capacity before a vitflow job, or give it back afterwards.

vitflow sizes its model-actor pool from the GPUs the cluster has when the job starts, and a
cluster that scales from zero workers has none yet (its head advertises no CPU either). So
request the GPUs and decode cores first, wait until they are there, then submit:

    ray submit cluster/aws-gpu.yaml cluster/scale.py -- --gpus 4 --decode-cpus 32 --wait
    vitflow submit jobs/flowers-dinov2.yaml --address http://127.0.0.1:8265 ... --wait
    ray submit cluster/aws-gpu.yaml cluster/scale.py -- --release

On KubeRay, run it in the head pod:

    kubectl exec -i "$HEAD_POD" -- python - --gpus 2 --decode-cpus 16 --wait < cluster/scale.py

A request stays in force until the next one (`--release` asks for nothing), so the autoscaler
keeps the nodes while it stands and removes them once released and idle. It runs on the head,
where the node's RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) let it connect.
"""

from __future__ import annotations

import argparse
import sys
import time


def bundles(gpus: int, decode_cpus: int, actor_cpus: int = 1) -> list[dict[str, float]]:
    """One {GPU, CPU} bundle per model actor, then single-CPU bundles for the decode tasks.

    The autoscaler packs the CPU bundles into the GPU nodes' spare cores first and adds decode
    nodes only for the rest, as Ray's scheduler will place the tasks.
    """
    if gpus < 0 or decode_cpus < 0 or actor_cpus < 0:
        raise ValueError("counts must not be negative")
    actor = {"GPU": 1.0, "CPU": float(actor_cpus)} if actor_cpus else {"GPU": 1.0}
    return [dict(actor) for _ in range(gpus)] + [{"CPU": 1.0} for _ in range(decode_cpus)]


def totals(requested: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in requested:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs (= model actors) to have ready")
    p.add_argument("--decode-cpus", type=int, default=0, help="CPU cores for decode tasks")
    p.add_argument("--actor-cpus", type=int, default=1, help="CPUs per model actor (default 1)")
    p.add_argument("--release", action="store_true", help="withdraw the request")
    p.add_argument("--wait", action="store_true", help="wait until the resources are there")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to --wait (default 1800)")
    args = p.parse_args(argv)

    requested = [] if args.release else bundles(args.gpus, args.decode_cpus, args.actor_cpus)
    need = totals(requested)

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address="auto", logging_level="WARNING")
    request_resources(bundles=requested)
    print(f"requested {need or 'nothing (released)'}", flush=True)
    if not args.wait or not requested:
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        have = ray.cluster_resources()
        if all(have.get(k, 0.0) >= v for k, v in need.items()):
            print(f"ready: GPU {have.get('GPU', 0):g}, CPU {have.get('CPU', 0):g}", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"timed out: have GPU {have.get('GPU', 0):g}, CPU {have.get('CPU', 0):g}")
            return 1
        time.sleep(10)


if __name__ == "__main__":
    sys.exit(main())
