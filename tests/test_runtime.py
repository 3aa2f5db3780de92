"""What the model actor pool and the decode actors look like on given clusters.

Each test plans for a literal cluster (what ``ray.cluster_resources()`` reports, and the CPUs
of its largest node) with :func:`vitflow.runtime.plan_actors`, and asserts what a user would
see on that cluster: how many actors, what each reserves, how many files decode at once, and
which jobs are refused. No sizing formula is recomputed here. Ray is not started.
"""

from __future__ import annotations

import os

import pytest

from vitflow.config import ComputeConfig
from vitflow.errors import ConfigError
from vitflow.runtime import ActorPlan, plan_actors


def plan(cluster: dict[str, float], node_cpus: float | None = None, **compute) -> ActorPlan:
    node = cluster.get("CPU", 0.0) if node_cpus is None else node_cpus
    return plan_actors(cluster, node, ComputeConfig(**compute))


def runs_at_once(p: ActorPlan, cpus: float, actors: int, decode_tasks: int) -> bool:
    """Whether ``actors`` model actors and ``decode_tasks`` decode actors of plan ``p`` fit in
    ``cpus`` CPUs together, so Ray runs them all at the same time."""
    return actors * p.num_cpus + decode_tasks * p.decode_num_cpus <= cpus + 1e-9


# --- CPU-only machines ---------------------------------------------------------------------------


def test_two_cpu_laptop_runs_one_actor_and_decodes_two_files_at_once():
    p = plan({"CPU": 2.0})
    assert (p.num_actors, p.device, p.num_gpus) == (1, "cpu", 0.0)
    assert p.torch_threads == 2  # the forward pass still uses both cores
    assert p.decode == "cpu"
    assert p.decode_tasks == 2
    assert runs_at_once(p, 2, actors=1, decode_tasks=2)


def test_one_cpu_node_still_decodes_beside_its_actor():
    p = plan({"CPU": 1.0})
    assert p.num_actors == 1 and p.torch_threads == 1
    assert p.decode_tasks >= 1 and runs_at_once(p, 1, actors=1, decode_tasks=1)


@pytest.mark.parametrize("cpus", [3.0, 4.0, 6.0, 8.0, 12.0])
def test_small_and_medium_nodes_decode_on_every_core_beside_one_actor(cpus):
    p = plan({"CPU": cpus})
    assert p.num_actors == 1 and p.torch_threads == int(cpus)
    assert p.decode_tasks == int(cpus)
    assert runs_at_once(p, cpus, actors=1, decode_tasks=p.decode_tasks)


def test_64_core_node_runs_eight_actors_on_eight_threads_each():
    p = plan({"CPU": 64.0})
    assert (p.num_actors, p.torch_threads, p.device) == (8, 8, "cpu")
    assert p.decode_tasks == 64  # a decode actor on every core
    assert runs_at_once(p, 64, actors=8, decode_tasks=64)


def test_four_16_core_nodes_run_two_actors_per_node():
    # 64 CPUs in all: 8 actors, two on each 16-core node, 8 torch threads each.
    p = plan({"CPU": 64.0}, node_cpus=16.0)
    assert (p.num_actors, p.torch_threads) == (8, 8)
    assert runs_at_once(p, 16, actors=2, decode_tasks=1)  # a node's two actors + a decode actor


def test_sixteen_4_core_nodes_run_one_actor_on_half_of_them():
    p = plan({"CPU": 64.0}, node_cpus=4.0)
    assert (p.num_actors, p.torch_threads) == (8, 4)
    assert runs_at_once(p, 4, actors=1, decode_tasks=1)


def test_three_2_core_nodes_share_one_actor():
    p = plan({"CPU": 6.0}, node_cpus=2.0)
    assert (p.num_actors, p.torch_threads) == (1, 2)
    assert runs_at_once(p, 2, actors=1, decode_tasks=1)


def test_explicit_num_gpus_per_actor_on_a_cpu_cluster_is_refused():
    with pytest.raises(ConfigError, match="num_gpus_per_actor is 1.*no GPUs.*leave it unset"):
        plan({"CPU": 8.0}, num_gpus_per_actor=1)


# --- GPU clusters --------------------------------------------------------------------------------


def test_four_gpus_give_four_gpu_actors_and_decode_on_the_other_cores():
    p = plan({"CPU": 32.0, "GPU": 4.0})
    assert (p.num_actors, p.device, p.num_gpus, p.num_cpus) == (4, "cuda", 1.0, 1.0)
    assert p.torch_threads == 8
    assert p.decode == "cpu" and p.decode_num_cpus == 1.0
    assert p.decode_tasks == 28  # every core the actors do not hold
    assert runs_at_once(p, 32, actors=4, decode_tasks=28)


def test_half_a_gpu_per_actor_doubles_the_actors():
    p = plan({"CPU": 32.0, "GPU": 4.0}, num_gpus_per_actor=0.5)
    assert (p.num_actors, p.num_gpus, p.device) == (8, 0.5, "cuda")


def test_device_cpu_on_a_gpu_cluster_leaves_the_gpus_alone():
    p = plan({"CPU": 32.0, "GPU": 4.0}, device="cpu")
    assert (p.num_actors, p.device, p.num_gpus) == (4, "cpu", 0.0)


def test_zero_gpus_per_actor_asks_for_cpu_actors_on_a_gpu_cluster():
    p = plan({"CPU": 32.0, "GPU": 4.0}, num_actors=2, num_gpus_per_actor=0)
    assert (p.num_actors, p.device, p.num_gpus) == (2, "cpu", 0.0)


def test_device_cuda_with_fp16_on_one_gpu():
    p = plan({"CPU": 8.0, "GPU": 1.0}, device="cuda", precision="fp16")
    assert (p.num_actors, p.num_gpus, p.device) == (1, 1.0, "cuda")


def test_gpu_decode_happens_in_the_actors_and_only_with_gpus():
    assert plan({"CPU": 8.0, "GPU": 1.0}, decode="auto").decode == "gpu"
    assert plan({"CPU": 8.0, "GPU": 1.0}, decode="gpu").decode == "gpu"
    assert plan({"CPU": 8.0}, decode="auto").decode == "cpu"
    assert plan({"CPU": 8.0}, decode="gpu").decode == "cpu"  # no GPU: decoded by CPU tasks


def test_autoscaling_cluster_at_zero_workers_plans_what_is_asked():
    # A head with no CPUs and no workers yet: an explicit GPU plan is trusted, so the pending
    # actors make the autoscaler add GPU nodes instead of the job failing or running on CPU.
    p = plan({"CPU": 0.0}, device="cuda", num_actors=4)
    assert (p.num_actors, p.num_gpus, p.device) == (4, 1.0, "cuda")
    with pytest.raises(ConfigError, match="compute.num_actors"):
        plan({"CPU": 0.0}, device="cuda")


# --- what the job asks for wins ------------------------------------------------------------------


def test_cpu_overrides_win():
    p = plan({"CPU": 64.0}, num_actors=3, actor_num_cpus=2.5, torch_threads=5)
    assert (p.num_actors, p.num_cpus, p.torch_threads, p.device) == (3, 2.5, 5, "cpu")


def test_cpu_overrides_win_on_a_small_node():
    p = plan({"CPU": 2.0}, actor_num_cpus=1.0, torch_threads=1)
    assert (p.num_actors, p.num_cpus, p.torch_threads) == (1, 1.0, 1)


def test_gpu_overrides_win():
    p = plan(
        {"CPU": 32.0, "GPU": 4.0},
        num_actors=2,
        actor_num_cpus=4,
        torch_threads=3,
        num_gpus_per_actor=2,
    )
    assert (p.num_actors, p.num_cpus, p.num_gpus, p.torch_threads, p.device) == (
        2,
        4,
        2,
        3,
        "cuda",
    )


def test_num_actors_override_shares_the_cores_between_them():
    p = plan({"CPU": 16.0}, num_actors=4)
    assert (p.num_actors, p.torch_threads) == (4, 4)


def test_decode_num_cpus_override_sets_what_each_decode_task_reserves():
    p = plan({"CPU": 16.0}, decode_num_cpus=2.0)
    assert p.decode_num_cpus == 2.0 and p.decode_tasks >= 1
    assert runs_at_once(p, 16, actors=p.num_actors, decode_tasks=p.decode_tasks)


def test_batch_size_set_in_the_job_wins_on_any_cluster():
    assert plan({"CPU": 2.0}, batch_size=7).batch_size == 7
    assert plan({"CPU": 8.0, "GPU": 1.0}, batch_size=7).batch_size == 7


@pytest.mark.parametrize(
    "cluster, params, batch",
    [
        ({"CPU": 8.0}, 5_000_000_000, 32),  # CPU actors: 32, whatever the model
        ({"CPU": 8.0, "GPU": 1.0}, 22_000_000, 256),  # ViT-S on a GPU
        ({"CPU": 8.0, "GPU": 1.0}, 304_000_000, 128),  # ViT-L
        ({"CPU": 8.0, "GPU": 1.0}, 1_100_000_000, 64),  # ViT-g
    ],
)
def test_default_batch_size_is_the_one_the_config_documents(cluster, params, batch):
    p = plan_actors(cluster, cluster["CPU"], ComputeConfig(), model_params=params)
    assert p.batch_size == batch


# --- refused ------------------------------------------------------------------------------------


def test_cuda_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(
        ConfigError, match="compute.device is cuda, but the Ray cluster has no GPUs"
    ):
        plan({"CPU": 8.0}, device="cuda")


def test_cuda_with_zero_gpus_per_actor_is_refused():
    with pytest.raises(
        ConfigError, match="num_gpus_per_actor is 0, so the actors would get no GPU"
    ):
        plan({"CPU": 8.0, "GPU": 2.0}, device="cuda", num_gpus_per_actor=0)


@pytest.mark.parametrize(
    "cluster, device",
    [({"CPU": 8.0}, "auto"), ({"CPU": 8.0}, "cpu"), ({"CPU": 8.0, "GPU": 1.0}, "cpu")],
)
def test_fp16_without_gpu_actors_is_refused(cluster, device):
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        plan(cluster, precision="fp16", device=device)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_precisions_run_on_cpu(precision):
    assert plan({"CPU": 4.0}, precision=precision).device == "cpu"


@pytest.mark.parametrize("cluster", [{}, {"CPU": 0.0}, {"GPU": 4.0}])
def test_a_cluster_without_cpus_is_refused(cluster):
    with pytest.raises(ConfigError, match="no CPUs"):
        plan_actors(cluster, 0.0, ComputeConfig())


def test_decode_actors_yield_the_cpu_to_the_model_side():
    """A decode actor lowers its own priority (in its own process: here a child, so this test
    process keeps its own), and a worker already at least that nice stays as it is."""
    import subprocess
    import sys

    from vitflow.decode_task import DECODE_NICE

    code = (
        "import os\n"
        "from vitflow.decode_task import DecodeWorker\n"
        "os.nice({start})\n"
        "DecodeWorker(mode='gpu')\n"
        "print(os.nice(0))\n"
    )
    for start in (0, DECODE_NICE + 3):
        out = subprocess.run(
            [sys.executable, "-c", code.format(start=start)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert int(out.stdout.split()[-1]) == max(DECODE_NICE, os.nice(0) + start)


def test_gpu_actors_keep_two_batches_in_flight_and_cpu_actors_one():
    assert plan({"CPU": 8.0, "GPU": 1.0}).batches_in_flight == 2
    assert plan({"CPU": 8.0}).batches_in_flight == 1
    assert plan({"CPU": 8.0, "GPU": 1.0}, batches_in_flight=1).batches_in_flight == 1
    assert plan({"CPU": 8.0}, batches_in_flight=3).batches_in_flight == 3
