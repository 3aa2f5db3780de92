"""Run by tests/test_multinode.py in a child process: a real multi-node Ray cluster on this
machine (ray.cluster_utils.Cluster, two nodes), then an embed or a train job on it; prints
one JSON line with the node ids the model actors / training workers ran on."""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from vitflow.config import load_config


def main(kind: str, data: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        if kind == "embed":
            from tests.conftest import TINY
            from vitflow.embed import run_embed

            name, kw = TINY["vit"]
            res = run_embed(
                load_config(
                    base={
                        "source": {"uri": data},
                        "model": {"name": name, "kwargs": kw, "weights": "random"},
                        "output": {"uri": out},
                        "compute": {"batch_size": 1, "num_actors": 2},
                    }
                )
            )
            print(
                json.dumps(
                    {
                        "nodes": res.manifest["execution"]["model_nodes"],
                        "ok": res.ok,
                        "listed": res.listed,
                        "cluster_nodes": len(ray.nodes()),
                    }
                )
            )
        elif kind == "lose-node":
            print(json.dumps(lose_a_node(cluster, data, out)))
        else:
            from vitflow.training.config import TrainConfig
            from vitflow.training.report import read_metrics
            from vitflow.training.trainer import run_train

            cfg = load_config(
                schema=TrainConfig,
                base={
                    "method": "simo2",
                    "data": {"uri": data, "image_size": 32},
                    "model": {"name": "resnet18", "embedding_dim": 8, "head_hidden_dim": 0},
                    "simo2": {"samples_per_class": 4, "classes_per_batch": 4},
                    "optim": {"steps": 4},
                    "monitor": {"knn_every": 0},
                    "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
                    "output": {"uri": out, "checkpoint_every": 4, "log_every": 2},
                },
            )
            run_train(cfg)
            nodes = next(m["worker_nodes"] for m in read_metrics(out) if "worker_nodes" in m)
            print(json.dumps({"nodes": nodes, "cluster_nodes": len(ray.nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def lose_a_node(cluster, data: str, out: str) -> dict:
    """Embed with model actors on both nodes, remove the worker node once parts are being
    written, let the run finish on the head, then embed again on the head alone (the clean
    reference) and compare the two outputs row by row."""
    import threading
    import time

    import numpy as np

    from tests.conftest import TINY, output_progress
    from vitflow.embed import run_embed
    from vitflow.loading import load_embeddings
    from vitflow.storage import open_fs

    name, kw = TINY["vit"]
    # vitflow's own warnings (a lost counter, a retried part) go into the result, so a
    # failed assertion shows them.
    import logging

    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage()[:300])
    logging.getLogger("vitflow").addHandler(handler)

    def job(uri):
        return load_config(
            base={
                "source": {"uri": data},
                "model": {"name": name, "kwargs": kw, "weights": "random"},
                "output": {"uri": uri, "rows_per_file": 4},
                "compute": {"batch_size": 1, "num_actors": 2, "decode_batch_size": 2},
            }
        )

    worker = cluster.list_all_nodes()[1]
    removed: list[float] = []
    fs, path = open_fs(out)

    def model_nodes() -> int:
        """How many nodes have a model actor up, from the run's own counters."""
        names = [n for n in ray.util.list_named_actors() if n.startswith("vitflow-stats-")]
        if not names:
            return 0
        try:
            return len(ray.get(ray.get_actor(names[0]).get.remote(), timeout=5)["model_nodes"])
        except Exception:
            return 0

    def remove_when_busy():
        # Strike only once a model actor is up on *both* nodes and parts are being written:
        # the head's actor may start first and write parts before the worker's is built.
        deadline = time.time() + 240
        while time.time() < deadline:
            staged, parts, done = output_progress(fs, path)
            if done:
                return
            if parts >= 1 and model_nodes() == 2:
                cluster.remove_node(worker, allow_graceful=False)
                removed.append(time.time())
                return
            time.sleep(0.05)

    t = threading.Thread(target=remove_when_busy, daemon=True)
    t.start()
    res = run_embed(job(out))
    t.join(timeout=5)
    clean = run_embed(job(out + "-clean"))
    a = load_embeddings(out, include_errors=True).set_index("id").sort_index()
    b = load_embeddings(out + "-clean", include_errors=True).set_index("id").sort_index()
    ok = a["status"] == "ok"
    same = (
        list(a.index) == list(b.index)
        and (a["status"] == b["status"]).all()
        and bool(np.allclose(np.stack(a["emb"][ok]), np.stack(b["emb"][ok]), atol=1e-6))
    )
    return {
        "removed": bool(removed),
        "listed": res.listed,
        "ok": res.ok,
        "clean_ok": clean.ok,
        "same_as_clean": same,
        # Missing only if the run lost its counters (it logs why): the assertion shows it.
        "nodes_before": res.manifest["execution"].get("model_nodes"),
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "warnings": warned,
    }


if __name__ == "__main__":
    main(*sys.argv[1:4])
