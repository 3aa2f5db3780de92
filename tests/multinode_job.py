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


if __name__ == "__main__":
    main(*sys.argv[1:4])
