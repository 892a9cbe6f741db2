"""Gradients of an operator's dataset loss, never written into ``.grad``.

:meth:`HessianOperator.gradient <spectral_callbacks.curvature.HessianOperator.gradient>`
and the products from gradient differences take them from here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .isolation import measurement_context
from .sharding import reshard

if TYPE_CHECKING:
    from .hessian import HessianOperator

__all__ = ["first_order_gradient", "weighted_gradient"]


def first_order_gradient(
    loss_of: Callable[[], torch.Tensor],
    params: list[nn.Parameter],
    model: nn.Module,
    context: Callable[[], contextlib.AbstractContextManager],
) -> list:
    """``∇ loss_of()`` w.r.t. ``params`` (``None`` for unused ones), never into ``.grad``,
    computed inside a fresh ``context()`` (a seeded :func:`measurement_context`).

    Reentrant activation checkpointing (``use_reentrant=True``) refuses
    ``torch.autograd.grad`` (and frees the graph doing so); there the loss is computed
    again, in another fresh ``context()`` (so with the same dropout masks), and the gradient
    comes from ``loss.backward()``, with the ``.grad`` of every parameter of ``model`` saved
    first and put back after, object for object (in one process only: under DDP a backward
    would fire its gradient hooks).
    """
    try:
        with context():
            return list(torch.autograd.grad(loss_of(), params, allow_unused=True))
    except RuntimeError as error:
        if "incompatible with .grad()" not in str(error):
            raise
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "reentrant activation checkpointing (use_reentrant=True) allows gradients "
                "only by backward(), which under DDP would run its all-reduce hooks: use "
                "torch.utils.checkpoint(..., use_reentrant=False)"
            ) from error
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for param, _ in saved:
            param.grad = None
        with context():
            loss_of().backward()
        return [p.grad for p in params]
    finally:
        for param, grad in saved:
            param.grad = grad


def weighted_gradient(operator: HessianOperator) -> list[torch.Tensor]:
    """``Σ_b w_b ∇L_b`` of this process's batches at the parameters' current values, one
    tensor per parameter in the operator's dtype (float32 or wider); whole on every process
    for sharded parameters (:func:`_sharded_weighted_gradient`)."""
    op = operator
    if op.sharded:
        return _sharded_weighted_gradient(op)
    total = [torch.zeros(p.shape, dtype=op.dtype, device=op.device) for p in op.params]
    for batch, weight in zip(op.batches, op.batch_weights, strict=True):
        grads = first_order_gradient(
            functools.partial(op.batch_loss, batch),
            op.params,
            op.model,
            functools.partial(measurement_context, op.model, op.seed, math_attention=False),
        )
        for accumulator, grad in zip(total, grads, strict=True):
            if grad is not None:
                accumulator.add_(grad.to(op.dtype), alpha=weight)
    return total


def _sharded_weighted_gradient(op: HessianOperator) -> list[torch.Tensor]:
    """The gradient of the dataset loss for parameters sharded by ``fully_shard`` (FSDP2),
    whole on every process.

    ``torch.autograd.grad`` with respect to FSDP2's sharded parameters does not follow
    changes of the shards, so this runs FSDP's own ``backward()`` (one per gradient, on
    the weighted sum of every batch's loss, so that every process enters the same
    collectives), reads the reduce-scattered ``.grad`` (FSDP averages it over the
    processes: multiplied back by their number, it is the gradient of the union), gathers
    it whole, and puts every ``.grad`` of the model back as it found it.
    """
    reshard(op.model)  # a forward alone leaves the root gathered, blind to the shards
    saved = [(p, p.grad) for p in op.model.parameters()]
    try:
        for param, _ in saved:
            param.grad = None
        with measurement_context(op.model, op.seed, math_attention=False):
            loss = sum(
                weight * op.batch_loss(batch)
                for batch, weight in zip(op.batches, op.batch_weights, strict=True)
            )
            loss.backward()
        gradients = []
        for param in op.params:
            grad = param.grad
            if grad is None:
                gradients.append(torch.zeros(param.shape, dtype=op.dtype, device=op.device))
                continue
            processes = param.device_mesh.size() if hasattr(param, "device_mesh") else 1
            whole = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            gradients.append(whole.to(op.dtype) * processes)
        return gradients
    finally:
        for param, grad in saved:
            param.grad = grad
        reshard(op.model)
