"""Path ``"reuse_graph"``: double backward through a first-order graph kept per batch.

``g_b = ∇L_b`` is built once per batch with ``create_graph=True``; each product is a
backward pass through it, ``∂(g_b · v)/∂θ``. A block of vectors goes through one vmapped
backward (``is_grads_batched``) on accelerators, and one backward per vector on the CPU,
where that is cheaper per vector (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..first_order import weighted_gradient
from ..isolation import measurement_context
from ..operator import dense
from .errors import NoSecondDerivative, raise_second_order

if TYPE_CHECKING:
    from ..hessian import HessianOperator

__all__ = ["ReusedGraphProducts"]

#: model -> the (loss function, parameter names, reduction) whose double-backward products
#: passed :meth:`ReusedGraphProducts.check_symmetry`.
_SYMMETRY_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()

#: model -> {(loss function, parameter names, reduction): whether the gradients that carry
#: no graph are constant} (:meth:`ReusedGraphProducts._gradients_are_constant`).
_CONSTANT_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

#: One graph per batch: (batch weight, [(parameter index, its gradient with a graph)]).
Graphs = list[tuple[float, list[tuple[int, torch.Tensor]]]]


class ReusedGraphProducts:
    """Products through the kept first-order graphs of ``operator``'s batches."""

    def __init__(self, operator: HessianOperator) -> None:
        self.operator = operator
        self.graphs: Graphs | None = None

    def release(self) -> None:
        """Drop the graphs (rebuilt at the next product)."""
        self.graphs = None

    def first_order_graphs(self) -> Graphs:
        """The graphs, built at the first call (and the loss checked finite there)."""
        if self.graphs is not None:
            return self.graphs
        op = self.operator
        graphs, losses = [], []
        for batch, weight in zip(op.batches, op.batch_weights, strict=True):
            with measurement_context(op.model, op.seed):
                loss = op.batch_loss(batch)
                losses.append(loss.detach())
                try:
                    grads = torch.autograd.grad(
                        loss, op.params, create_graph=True, allow_unused=True
                    )
                except RuntimeError as error:
                    raise_second_order(error)
            # A gradient that is None (unused parameter) has zero derivative. One that is
            # there but carries no graph is constant only if the loss is linear in that
            # parameter; far more often an op's backward is not differentiable (a custom
            # autograd.Function), which would read as a zero Hessian block.
            constant = [i for i, g in enumerate(grads) if g is not None and not g.requires_grad]
            if constant and not self._gradients_are_constant(constant):
                names = [op.names[i] for i in constant[:3]]
                raise NoSecondDerivative(
                    RuntimeError(
                        f"the gradient of {names} carries no graph but changes with the "
                        "parameters (a custom autograd.Function whose backward is not "
                        "differentiable?), so double backward would read its Hessian block "
                        "as 0: use hvp='gradient_difference'"
                    ),
                    None,
                )
            # A gradient without a graph that is constant: its Hessian rows are zero.
            kept = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
            graphs.append((weight, kept))
        op.raise_if_non_finite(losses)
        op.checked_finite = True
        self.graphs = graphs
        return graphs

    def _gradients_are_constant(self, indices: list[int]) -> bool:
        """Whether the gradients of parameters ``indices``, which carry no graph, are constant
        (the loss is linear in them) rather than cut off from their second derivative: their
        gradient at ``θ`` and at ``θ + h u`` (``u`` a random unit direction, ``h`` a thousandth
        of ``1 + ‖θ‖``) agree to rounding. Two gradients, once per model, loss and selection."""
        op = self.operator
        key = (op.loss_fn, tuple(op.names), op.reduction)
        known = _CONSTANT_CHECKED.setdefault(op.model, {})
        if key not in known:
            generator = torch.Generator(device=op.device).manual_seed((op.seed + 104729) % 2**63)
            direction = torch.randn(op.size, generator=generator, dtype=op.dtype, device=op.device)
            norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in op.params))
            step = 1e-3 * (1.0 + norm) / float(direction.norm())
            here = weighted_gradient(op)
            with op.moved(step * direction):
                there = weighted_gradient(op)
            eps = torch.finfo(op.product_dtype).eps
            known[key] = all(
                float((there[i] - here[i]).double().norm())
                <= 1e3 * eps * float(here[i].double().norm() + there[i].double().norm())
                for i in indices
            )
        return known[key]

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        op = self.operator
        width = block.shape[0]
        if width > 1 and op.device.type == "cpu":
            # A vmapped backward (is_grads_batched) costs more per vector than one backward
            # per vector on the CPU (docs/benchmarks.md).
            return torch.cat([self.matmat(row) for row in block.split(1)])
        pieces = op.split(block)
        total = torch.zeros_like(block)
        for weight, outputs in self.first_order_graphs():
            if not outputs:
                continue
            indices = [i for i, _ in outputs]
            grads = [g for _, g in outputs]
            vectors = [pieces[i] if width > 1 else pieces[i][0] for i in indices]
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    products = torch.autograd.grad(
                        grads,
                        op.params,
                        grad_outputs=vectors,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=width > 1,
                    )
                except RuntimeError as error:
                    raise_second_order(error)
            total += weight * op.flatten(list(products), width)
        return total

    def gradient(self) -> torch.Tensor | None:
        """``Σ_b w_b ∇L_b`` of this process's batches from the kept graphs (free), flat in
        the operator's dtype; ``None`` while no graphs are kept."""
        if self.graphs is None:
            return None
        op = self.operator
        flat = torch.zeros(op.size, dtype=op.dtype, device=op.device)
        pieces = list(flat.split(op.numels))
        for weight, outputs in self.graphs:
            for i, g in outputs:
                pieces[i].add_(dense(g.detach()).reshape(-1).to(op.dtype), alpha=weight)
        return flat

    def check_symmetry(self) -> None:
        """Once per model, loss and parameter selection: ``vᵀ(H w) = wᵀ(H v)`` for two random
        vectors (two products, not counted). Double backward through an op whose backward is
        not itself differentiable (a custom ``autograd.Function``, ``@once_differentiable``
        included in torch 2.13) silently drops terms, and the product it gives is not
        symmetric; raises :class:`NoSecondDerivative` then."""
        op = self.operator
        checked = _SYMMETRY_CHECKED.setdefault(op.model, set())
        key = (op.loss_fn, tuple(op.names), op.reduction)
        if key in checked:
            return
        generator = torch.Generator(device=op.device).manual_seed((op.seed + 7919) % 2**63)
        pair = torch.randn(2, op.size, generator=generator, dtype=op.dtype, device=op.device)
        products = self.matmat(pair).double()
        v, w = pair.double()
        cross = torch.stack([(v * products[1]).sum(), (w * products[0]).sum()])
        scale = products[1].norm() * w.norm() + products[0].norm() * v.norm()
        asymmetry = (cross[0] - cross[1]).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)
        asymmetry = float(op.all_reduce(asymmetry.reshape(1), op="max")[0])
        roundoff = torch.finfo(op.product_dtype).eps / 2
        if asymmetry > min(0.1, max(1e4 * roundoff, 1e-10)):
            self.release()
            raise NoSecondDerivative(
                RuntimeError(
                    f"double backward of this loss gives an asymmetric Hessian (relative "
                    f"asymmetry {asymmetry:.2g}): an op's backward is not differentiable (a "
                    "custom autograd.Function, e.g. one marked @once_differentiable, or torch's "
                    "weight_norm), so its second-order terms are missing: use "
                    "hvp='gradient_difference'"
                ),
                None,
            )
        checked.add(key)
