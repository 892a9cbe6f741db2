"""Parameters sharded by ``fully_shard`` (FSDP2 ``DTensor`` parameters): what an operator
needs to read, perturb and re-shard them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["like", "local_tensor", "reshard"]


def reshard(model: nn.Module) -> None:
    """Put every module sharded by ``fully_shard`` (FSDP2) back on its sharded parameters.

    FSDP2 gathers the whole parameters for a forward pass and, for the root module, shards
    them again only after a backward pass: after a forward alone (the finiteness check) the
    next forward would use the gathered copy and miss a perturbation of the shards.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded by it
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """This process's shard of a ``DTensor`` (FSDP2's sharded parameters); ``None`` for a
    plain tensor."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else None


def like(parameter: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` (the parameter's full shape) laid out like ``parameter``: as it is for a
    plain tensor, sharded like a ``DTensor`` parameter (each process keeps its slice; no
    communication, as every process holds the same ``whole``)."""
    if not hasattr(parameter, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None)
