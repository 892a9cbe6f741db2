r"""The generalised Gauss–Newton matrix ``G = Jᵀ H_out J`` as a matrix-free operator.

For a loss ``ℓ(f(θ), y)`` of network outputs ``f``, the Hessian splits as
``H = Jᵀ H_out J + Σ_k (∂ℓ/∂f_k) ∇²f_k`` with ``J = ∂f/∂θ`` and ``H_out = ∇²_f ℓ``. The first
part ``G`` is positive semi-definite when ``ℓ`` is convex in ``f``; comparing its spectrum with
the Hessian's shows which outliers come from ``G`` (Sagun et al.; Papyan 2019). ``H_out`` is
known in closed form for:

``"cross_entropy"``
    ``F.cross_entropy(f, y)`` on logits ``(N, C)`` (``(B, T, C)`` is flattened to rows):
    ``H_out = diag(p) − p pᵀ`` per row, ``p = softmax(f)``;
``"mse"``
    ``F.mse_loss(f, y)``: ``H_out = 2 I``;
``"bce"``
    ``F.binary_cross_entropy_with_logits(f, y)``: ``H_out = diag(p (1 − p))``, ``p = σ(f)``.

With ``reduction="mean"`` each batch's ``H_out`` is divided by its number of loss terms
(rows for cross-entropy, elements for MSE and BCE, as torch's losses average) and batches
are weighted by size, as for :class:`~spectral_callbacks.curvature.HessianOperator`; with
``"sum"`` neither. A product ``G v`` is ``Jᵀ (H_out (J v))``: ``J v`` by the double-vjp
trick (the gradient of ``uᵀ f`` with respect to ``θ`` is linear in ``u``, so differentiating
it with respect to ``u`` gives ``J v``), ``Jᵀ w`` by one backward pass through the kept
graph of ``f``; no second derivative of the model is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_callable, check_choice
from ..settings import (
    CURVATURES,
    GGN_LOSSES,
    Curvature,
    GgnLoss,
    OperatorSettings,
    ParameterFilter,
    Reduction,
)
from .data import as_batch_list, batch_size, move_to_device, select_parameters
from .isolation import BufferSnapshot, measurement_context

__all__ = [
    "CURVATURES",
    "GGN_LOSSES",
    "Curvature",
    "GGNOperator",
    "GgnLoss",
    "curvature_operator",
    "default_outputs",
]


def default_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), y)`` for a batch ``(x, y)``."""
    return model(batch[0]), batch[1]


class GGNOperator:
    """``G = Σ_b w_b J_bᵀ H_out,b J_b`` over ``data`` (module docstring), with the products
    and attributes of :class:`~spectral_callbacks.curvature.HessianOperator`.

    Args:
        model: The model (modes used as they are; BatchNorm statistics frozen, RNG seeded).
        loss: ``"cross_entropy"``, ``"mse"`` or ``"bce"``: what ``H_out`` is.
        data: One batch or an iterable of batches.
        outputs_fn: ``outputs_fn(model, batch) -> (outputs, targets)``; default
            :func:`default_outputs`.
        params: Parameter filter, as for the Hessian.
        reduction: ``"mean"`` (torch's default reduction of ``loss``) or ``"sum"``.
        seed: Seed of the RNG inside forward passes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: GgnLoss,
        data: Any,
        outputs_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
        params: ParameterFilter = None,
        reduction: Reduction = "mean",
        seed: int = 0,
    ) -> None:
        check_choice("loss", loss, GGN_LOSSES)
        OperatorSettings(params=params, reduction=reduction, seed=seed)
        check_callable("outputs_fn", outputs_fn, "outputs_fn(model, batch) -> (f, y)", True)
        self.model = model
        self.loss = loss
        self.outputs_fn = outputs_fn or default_outputs
        named = select_parameters(model, params)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.numels = [p.numel() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.size = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.product_dtype = self.dtype  # products are exact in the parameters' dtype
        self.product_relative_error = 0.0
        self.device = self.params[0].device
        self.seed = seed
        self.reduction = reduction
        self.batches = [move_to_device(b, self.device) for b in as_batch_list(data)]
        if reduction == "sum":
            self.batch_weights = [1.0] * len(self.batches)
        else:
            sizes = [batch_size(b) for b in self.batches]
            self.batch_weights = [s / sum(sizes) for s in sizes]
        self.num_hvps = 0
        self._graphs: list | None = None
        self._buffers = BufferSnapshot(model)

    def __enter__(self) -> GGNOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the kept graphs and restore every buffer."""
        self._graphs = None
        self._buffers.restore()

    def _output_curvature(self, outputs: torch.Tensor):
        """``w ↦ H_out w`` for this batch's (flattened) outputs, reduction included."""
        f = outputs.detach()
        if self.loss == "cross_entropy":
            rows = f.reshape(-1, f.shape[-1])
            p = torch.softmax(rows, dim=1)
            scale = 1.0 / rows.shape[0] if self.reduction == "mean" else 1.0

            def apply(w: torch.Tensor) -> torch.Tensor:
                w = w.reshape(rows.shape)
                return (scale * (p * w - p * (p * w).sum(dim=1, keepdim=True))).reshape(f.shape)

            return apply
        scale = 1.0 / f.numel() if self.reduction == "mean" else 1.0
        if self.loss == "mse":
            return lambda w: (2.0 * scale) * w
        p = torch.sigmoid(f)
        return lambda w: scale * p * (1 - p) * w

    def _batch_graphs(self) -> list:
        if self._graphs is None:
            graphs = []
            for batch in self.batches:
                with measurement_context(self.model, self.seed):
                    outputs, _ = self.outputs_fn(self.model, batch)  # H_out needs no targets
                    dummy = torch.zeros_like(outputs, requires_grad=True)
                    transposed = torch.autograd.grad(
                        outputs, self.params, dummy, create_graph=True, allow_unused=True
                    )
                graphs.append((outputs, dummy, transposed, self._output_curvature(outputs)))
            self._graphs = graphs
        return self._graphs

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``G`` applied to each row of a ``(b, n)`` block."""
        if block.ndim != 2 or block.shape[1] != self.size:
            raise ValueError(f"block must have shape (b, {self.size}), got {tuple(block.shape)}")
        block = block.to(dtype=self.dtype, device=self.device)
        self.num_hvps += block.shape[0]
        rows = []
        for row in block:
            pieces = [
                p.reshape(s) for p, s in zip(row.split(self.numels), self.shapes, strict=True)
            ]
            total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
            for (outputs, dummy, transposed, curvature), weight in zip(
                self._batch_graphs(), self.batch_weights, strict=True
            ):
                used = [(t, v) for t, v in zip(transposed, pieces, strict=True) if t is not None]
                with torch.enable_grad():
                    (jv,) = torch.autograd.grad(
                        [t for t, _ in used], dummy, [v for _, v in used], retain_graph=True
                    )
                    back = torch.autograd.grad(
                        outputs, self.params, curvature(jv), retain_graph=True, allow_unused=True
                    )
                flat = torch.cat(
                    [
                        torch.zeros(n, dtype=self.dtype, device=self.device)
                        if g is None
                        else g.reshape(-1)
                        for g, n in zip(back, self.numels, strict=True)
                    ]
                )
                total += weight * flat
            rows.append(total)
        return torch.stack(rows)


def curvature_operator(
    model: nn.Module,
    loss_fn: Callable | None,
    data: Any,
    curvature: Curvature = "hessian",
    ggn_loss: GgnLoss | None = None,
    outputs_fn: Callable | None = None,
    **options: Any,
):
    """The operator ``curvature`` names: the loss Hessian
    (:class:`~spectral_callbacks.curvature.HessianOperator` of ``loss_fn``, with ``options``)
    or the Gauss–Newton part (:class:`GGNOperator` of ``ggn_loss`` on ``outputs_fn``'s
    outputs; of ``options`` it takes ``params``, ``reduction`` and ``seed``)."""
    from .hessian import HessianOperator

    check_choice("curvature", curvature, CURVATURES)
    if curvature == "hessian":
        if loss_fn is None:
            raise ValueError("curvature='hessian' needs loss_fn(model, batch) -> scalar")
        return HessianOperator(model, loss_fn, data, **options)
    if ggn_loss is None:
        raise ValueError(f"curvature='ggn' needs ggn_loss, one of {GGN_LOSSES}")
    kept = {key: options[key] for key in ("params", "reduction", "seed") if key in options}
    return GGNOperator(model, ggn_loss, data, outputs_fn=outputs_fn, **kept)
