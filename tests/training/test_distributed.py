"""all_gather_with_grad, NT-Xent and SIMO2 on two gloo processes: losses and gradients equal
one process on the global batch.

Convention under test (see vitflow.training.distributed): rank r's leaf gets
sum_r' dL_r'/dx_r; DDP divides by the world size, so the effective gradient of the global
objective L = mean_r L_r is grad_r / W, which must equal dL/dx_r from one process.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitflow.training.distributed import all_gather_with_grad, rank_and_world
from vitflow.training.losses import NTXentLoss, SIMO2Loss

WORLD = 2
B, D, TAU = 3, 5, 0.2
C_RANK, K, IN = 2, 3, 7  # SIMO2: classes per rank, samples per class, input width


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    z1 = torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    return z0, z1


def _simo2_batch():
    """Inputs of a global SIMO2 batch, class-major: (WORLD * C_RANK * K, IN)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * C_RANK * K, IN, generator=g, dtype=torch.float64)


def _simo2_model() -> torch.nn.Linear:
    torch.manual_seed(2)
    return torch.nn.Linear(IN, D).double()


def _simo2_rank(rank: int) -> dict:
    """This rank's SIMO2 loss on its classes, the gradient of its inputs, and the parameter
    gradients of a DDP-wrapped projection, as the training loop computes them."""
    from torch.nn.parallel import DistributedDataParallel

    rows = slice(rank * C_RANK * K, (rank + 1) * C_RANK * K)
    x = _simo2_batch()[rows].clone().requires_grad_()
    z = torch.nn.functional.normalize(x, dim=1)
    out = SIMO2Loss()(z, num_classes=C_RANK)
    (x_grad,) = torch.autograd.grad(out.loss, x)

    ddp = DistributedDataParallel(_simo2_model())
    z = torch.nn.functional.normalize(ddp(_simo2_batch()[rows]), dim=1)
    SIMO2Loss()(z, num_classes=C_RANK).loss.backward()
    return {
        "terms": torch.stack([t.detach() for t in out]),
        "x_grad": x_grad,
        "param_grads": [p.grad.clone() for p in ddp.module.parameters()],
    }


def _weighted_squares(y: torch.Tensor, rank: int) -> torch.Tensor:
    # A loss that differs per rank, so a wrong reduction in backward cannot cancel out.
    return (rank + 1) * y.pow(2).sum()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        z0, z1 = _global_batch()
        rows = slice(rank * B, (rank + 1) * B)
        x0 = z0[rows].clone().requires_grad_()
        x1 = z1[rows].clone().requires_grad_()

        gathered = all_gather_with_grad(x0)
        sq_loss = _weighted_squares(gathered, rank)
        (sq_grad,) = torch.autograd.grad(sq_loss, x0)

        nt_loss = NTXentLoss(temperature=TAU)(x0, x1)
        nt_grads = torch.autograd.grad(nt_loss, (x0, x1))
        local_loss = NTXentLoss(temperature=TAU, gather_distributed=False)(x0, x1)
        torch.save(
            {
                "rank_world": rank_and_world(),
                "gathered": gathered.detach(),
                "sq_grad": sq_grad,
                "nt_loss": nt_loss.detach(),
                "nt_grads": nt_grads,
                "local_loss": local_loss.detach(),
                "simo2": _simo2_rank(rank),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two-process job once; return each rank's saved results."""
    out = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
def test_gather_concatenates_in_rank_order(ranks):
    z0, _ = _global_batch()
    for r, res in enumerate(ranks):
        assert res["rank_world"] == (r, WORLD)
        torch.testing.assert_close(res["gathered"], z0)


@pytest.mark.slow
def test_gather_gradient_matches_single_process(ranks):
    z0, _ = _global_batch()
    x = z0.clone().requires_grad_()
    # DDP optimises the mean of the per-rank losses.
    loss = sum(_weighted_squares(x, r) for r in range(WORLD)) / WORLD
    (want,) = torch.autograd.grad(loss, x)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["sq_grad"] / WORLD, want[r * B : (r + 1) * B])


@pytest.mark.slow
def test_ntxent_across_ranks_matches_single_process(ranks):
    z0, z1 = _global_batch()
    x0, x1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    loss = NTXentLoss(temperature=TAU)(x0, x1)  # one process, 2 * WORLD * B anchors
    want0, want1 = torch.autograd.grad(loss, (x0, x1))

    mean_of_ranks = sum(res["nt_loss"] for res in ranks) / WORLD
    torch.testing.assert_close(mean_of_ranks, loss.detach())
    for r, res in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res["nt_grads"][0] / WORLD, want0[rows])
        torch.testing.assert_close(res["nt_grads"][1] / WORLD, want1[rows])
        # Gathering adds negatives: the per-rank loss differs from the local-only one.
        local = NTXentLoss(temperature=TAU)(z0[rows], z1[rows])
        torch.testing.assert_close(res["local_loss"], local)
        assert not torch.allclose(res["nt_loss"], local)


@pytest.mark.slow
def test_simo2_across_ranks_matches_single_process(ranks):
    """Every rank's SIMO2 loss is the loss of the whole global batch (between-class terms
    pair classes of different ranks); input gradients / W and DDP's averaged parameter
    gradients equal one process on that batch."""
    x = _simo2_batch().clone().requires_grad_()
    z = torch.nn.functional.normalize(x, dim=1)
    want = SIMO2Loss()(z, num_classes=WORLD * C_RANK)
    (want_x,) = torch.autograd.grad(want.loss, x)
    model = _simo2_model()
    z = torch.nn.functional.normalize(model(_simo2_batch()), dim=1)
    SIMO2Loss()(z, num_classes=WORLD * C_RANK).loss.backward()
    want_params = [p.grad for p in model.parameters()]

    per_rank = SIMO2Loss()(
        torch.nn.functional.normalize(_simo2_batch()[: C_RANK * K], dim=1), num_classes=C_RANK
    )
    assert not torch.allclose(per_rank.diff, want.diff)  # one rank alone would differ
    for r, res in enumerate(ranks):
        got = res["simo2"]
        torch.testing.assert_close(got["terms"], torch.stack([t.detach() for t in want]))
        rows = slice(r * C_RANK * K, (r + 1) * C_RANK * K)
        torch.testing.assert_close(got["x_grad"] / WORLD, want_x[rows])
        for g, w in zip(got["param_grads"], want_params, strict=True):
            torch.testing.assert_close(g, w)


def test_single_process_is_identity():
    assert rank_and_world() == (0, 1)
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x
