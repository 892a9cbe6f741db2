"""Run by tests/curvature/test_gradient_difference.py: λ_max of a model sharded by torch's
fully_shard (FSDP2) over two CPU processes (gloo), by gradient differences.

Usage: python tests/curvature/fsdp_worker.py OUT_DIR PORT
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import eigenpairs
from tests.models import Skewed, skewed_loss


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, x, y


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(rank: int, out: str, port: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, x, y = model_and_data()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    params = list(model.parameters())
    for p in params:  # a .grad that must survive, as between training steps
        p.grad = torch.distributed.tensor.distribute_tensor(
            torch.ones(p.shape, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None
        )
    grads = [p.grad for p in params]
    before = [p.full_tensor().clone() for p in params]
    part = slice(0, 4) if rank == 0 else slice(4, 10)  # unequal shards: 4 and 6 samples
    with HessianOperator(
        model, loss_fn, (x[part], y[part]), hvp="gradient_difference", distributed=True
    ) as operator:
        result = eigenpairs(operator, k=2, tol=1e-6)
    record = {
        "eigenvalues": result.eigenvalues.tolist(),
        "converged": result.converged.tolist(),
        "restored": all(
            torch.equal(p.full_tensor(), b) for p, b in zip(params, before, strict=True)
        ),
        "grads_kept": all(p.grad is g for p, g in zip(params, grads, strict=True)),
        "sharded": all(p.to_local().shape != p.shape for p in params),
    }
    # A loss whose top direction the step's calibration does not see: the solve runs again
    # at a step chosen for it, the same decision on both processes.
    skewed = Skewed().double()
    fully_shard(skewed, mesh=init_device_mesh("cpu", (2,)))
    with HessianOperator(
        skewed, skewed_loss, x[part], hvp="gradient_difference", distributed=True
    ) as operator:
        top = eigenpairs(operator, k=1, tol=1e-7)
    record["skewed"] = {
        "eigenvalue": float(top.eigenvalues[0]),
        "error_bound": float(top.errors[0]),
        "num_hvps": top.num_hvps,
        "num_iterations": top.num_iterations,
    }
    pathlib.Path(out, f"fsdp{rank}.json").write_text(json.dumps(record))
    # Both processes past every collective before gloo's threads are torn down (without
    # the barrier one process sometimes aborted in teardown: "terminate called without an
    # active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
