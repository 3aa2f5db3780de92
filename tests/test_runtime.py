"""Tests for vitflow.runtime.plan_actors: sizing the model actor pool (pure; Ray is not started)."""

from __future__ import annotations

import math

import pytest

from vitflow.config import ComputeConfig
from vitflow.errors import ConfigError
from vitflow.runtime import ActorPlan, plan_actors


def plan(cpus=None, gpus=None, node_cpus=None, **compute) -> ActorPlan:
    cluster = {}
    if cpus is not None:
        cluster["CPU"] = float(cpus)
    if gpus is not None:
        cluster["GPU"] = float(gpus)
    node = float(cpus if node_cpus is None else node_cpus)
    return plan_actors(cluster, node, ComputeConfig(**compute))


def actors_per_node(p: ActorPlan, cpus: float, node_cpus: float) -> int:
    # Ray packs actors onto the largest node at most in proportion to its share of the CPUs.
    return max(1, math.ceil(p.num_actors * node_cpus / cpus))


# --- CPU only ------------------------------------------------------------------------------------


def test_two_cpu_laptop():
    p = plan(cpus=2)
    assert p.num_actors == 1
    assert 0 < p.num_cpus < 1  # fractional: decode keeps a whole CPU
    assert 2 - p.num_cpus >= 1
    assert p.num_gpus == 0
    assert p.torch_threads == 2  # torch still uses the node's cores
    assert p.device == "cpu"


def test_64_cpu_single_node():
    p = plan(cpus=64)
    assert p.num_actors == 8
    assert p.device == "cpu"
    assert p.num_gpus == 0
    assert p.torch_threads == 8  # 64 cores / 8 actors
    # Half of the node's cores stay unreserved for read+decode.
    assert p.num_actors * p.num_cpus == pytest.approx(32)


@pytest.mark.parametrize("node_cpus", [2, 3, 4])
def test_small_node_leaves_a_whole_cpu_for_decode(node_cpus):
    compute = ComputeConfig()
    p = plan_actors({"CPU": float(node_cpus)}, float(node_cpus), compute)
    reserved = p.num_actors * p.num_cpus
    assert node_cpus - reserved >= 1
    assert node_cpus - reserved >= compute.decode_num_cpus


@pytest.mark.parametrize("node_cpus", [5, 6, 8, 12, 16, 32, 64, 96])
def test_larger_single_node_leaves_decode_cpus(node_cpus):
    p = plan(cpus=node_cpus)
    reserved = p.num_actors * p.num_cpus
    assert node_cpus - reserved >= 1
    assert p.torch_threads * p.num_actors <= node_cpus


@pytest.mark.parametrize("nodes, node_cpus", [(4, 16), (16, 4), (3, 2), (2, 64), (8, 8)])
def test_multi_node_each_node_keeps_decode_cpus(nodes, node_cpus):
    cpus = nodes * node_cpus
    p = plan(cpus=cpus, node_cpus=node_cpus)
    assert p.num_actors == max(1, cpus // 8)
    per_node = actors_per_node(p, cpus, node_cpus)
    assert node_cpus - per_node * p.num_cpus >= 1
    assert p.torch_threads == max(1, node_cpus // per_node)


def test_one_cpu_node_leaves_decode_its_cpu():
    compute = ComputeConfig()
    p = plan_actors({"CPU": 1.0}, 1.0, compute)
    assert 1.0 - p.num_actors * p.num_cpus >= compute.decode_num_cpus


# --- GPUs ----------------------------------------------------------------------------------------


def test_four_gpus():
    p = plan(cpus=32, gpus=4)
    assert p.num_actors == 4
    assert p.num_gpus == 1
    assert p.num_cpus == 1
    assert p.device == "cuda"
    assert p.torch_threads == 8  # 32 cores / 4 actors


def test_fractional_gpus_per_actor_sets_actor_count():
    p = plan(cpus=32, gpus=4, num_gpus_per_actor=0.5)
    assert (p.num_actors, p.num_gpus, p.device) == (8, 0.5, "cuda")


def test_device_cpu_ignores_gpus():
    p = plan(cpus=32, gpus=4, device="cpu")
    assert p.device == "cpu"
    assert p.num_gpus == 0
    assert p.num_actors == 4  # 32 // 8


def test_device_cuda_with_gpus():
    p = plan(cpus=8, gpus=1, device="cuda", precision="fp16")
    assert (p.num_actors, p.num_gpus, p.device) == (1, 1, "cuda")


def test_zero_gpus_per_actor_override_wins():
    p = plan(cpus=32, gpus=4, num_actors=2, num_gpus_per_actor=0)
    assert p.num_gpus == 0


def test_gpus_per_actor_without_gpus_raises():
    with pytest.raises(ConfigError):
        plan(cpus=8, num_gpus_per_actor=1)


# --- overrides -----------------------------------------------------------------------------------


def test_cpu_overrides_win():
    p = plan(cpus=64, num_actors=3, actor_num_cpus=2.5, torch_threads=5)
    assert (p.num_actors, p.num_cpus, p.torch_threads, p.device) == (3, 2.5, 5, "cpu")


def test_cpu_overrides_win_on_small_node():
    p = plan(cpus=2, actor_num_cpus=1.0, torch_threads=1)
    assert (p.num_actors, p.num_cpus, p.torch_threads) == (1, 1.0, 1)


def test_gpu_overrides_win():
    p = plan(cpus=32, gpus=4, num_actors=2, actor_num_cpus=4, torch_threads=3, num_gpus_per_actor=2)
    assert (p.num_actors, p.num_cpus, p.num_gpus, p.torch_threads, p.device) == (
        2,
        4,
        2,
        3,
        "cuda",
    )


def test_num_actors_override_sizes_threads():
    p = plan(cpus=16, num_actors=4)
    assert p.num_actors == 4
    assert p.torch_threads == 4  # 16 cores / 4 actors on the one node


# --- errors --------------------------------------------------------------------------------------


def test_cuda_without_gpus_raises():
    with pytest.raises(ConfigError, match="no GPUs"):
        plan(cpus=8, device="cuda")


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_fp16_on_cpu_raises(device):
    with pytest.raises(ConfigError, match="fp16"):
        plan(cpus=8, precision="fp16", device=device)


def test_fp16_with_cpu_device_on_gpu_cluster_raises():
    with pytest.raises(ConfigError, match="fp16"):
        plan(cpus=8, gpus=1, precision="fp16", device="cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_precisions_ok(precision):
    assert plan(cpus=4, precision=precision).device == "cpu"


@pytest.mark.parametrize("cluster", [{}, {"CPU": 0.0}, {"GPU": 4.0}])
def test_no_cpus_raises(cluster):
    with pytest.raises(ConfigError, match="no CPUs"):
        plan_actors(cluster, 0.0, ComputeConfig())


def test_autoscaling_cluster_at_zero_workers_plans_what_is_asked():
    # Head with CPU 0 and no workers yet: an explicit GPU plan is trusted, so the pending
    # actors make the autoscaler add GPU nodes instead of the job failing or running on CPU.
    p = plan_actors({"CPU": 0.0}, 0.0, ComputeConfig(device="cuda", num_actors=4))
    assert (p.num_actors, p.num_gpus, p.device) == (4, 1.0, "cuda")
    with pytest.raises(ConfigError, match="compute.num_actors"):
        plan_actors({"CPU": 0.0}, 0.0, ComputeConfig(device="cuda"))
