r"""The generalised Gauss–Newton matrix ``G = Jᵀ H_out J`` as a matrix-free operator.

For a loss ``ℓ(f(θ), y)`` of network outputs ``f``, the Hessian splits as
``H = Jᵀ H_out J + Σ_k (∂ℓ/∂f_k) ∇²f_k`` with ``J = ∂f/∂θ`` and ``H_out = ∇²_f ℓ``. The first
part ``G`` is positive semi-definite when ``ℓ`` is convex in ``f``; comparing its spectrum with
the Hessian's shows which outliers come from ``G`` (Sagun et al.; Papyan 2019). ``H_out`` is
known in closed form for:

``"cross_entropy"``
    ``F.cross_entropy(f, y)`` on logits ``(N, C)`` (``(B, T, C)`` is flattened to rows):
    ``H_out = diag(p) − p pᵀ`` per row, ``p = softmax(f)``; rows whose class-index target is
    torch's ``ignore_index`` ``-100`` (padding) have none and do not count in the mean;
``"mse"``
    ``F.mse_loss(f, y)``: ``H_out = 2 I``;
``"bce"``
    ``F.binary_cross_entropy_with_logits(f, y)``: ``H_out = diag(p (1 − p))``, ``p = σ(f)``.

With ``reduction="mean"`` each batch's ``H_out`` is divided by its number of loss terms
(rows not ignored for cross-entropy, elements for MSE and BCE, as torch's losses average)
and batches are weighted by size, as for :class:`~spectral_callbacks.curvature.HessianOperator`;
with ``"sum"`` neither. A product ``G v`` is ``Jᵀ (H_out (J v))``: ``J v`` by the double-vjp
trick (the gradient of ``uᵀ f`` with respect to ``θ`` is linear in ``u``, so differentiating
it with respect to ``u`` gives ``J v``), ``Jᵀ w`` by one backward pass through the kept
graph of ``f``; no second derivative of the model is needed. What it shares with the
Hessian (selection, float32 vectors for 16-bit parameters, batch weights, the distributed
reduce, lifecycle) is :class:`~spectral_callbacks.curvature.operator.CurvatureOperator`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..settings import (
    CURVATURES,
    GGN_LOSSES,
    Curvature,
    GgnLoss,
    OperatorSettings,
    ParameterFilter,
    Reduction,
)
from .data import fresh_batch
from .isolation import measurement_context
from .operator import CurvatureOperator

__all__ = [
    "CURVATURES",
    "GGN_LOSSES",
    "Curvature",
    "GGNOperator",
    "GgnLoss",
    "default_outputs",
]


def default_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), y)`` for a batch ``(x, y, ...)``.

    Raises:
        TypeError: For another kind of batch (a dict of a Hugging Face model), or a model
            whose output is not a tensor: ``outputs_fn`` says what the outputs are then.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        kind = type(batch).__name__
        if isinstance(batch, Mapping):
            kind = f"a dict with keys {sorted(batch)}"
        raise TypeError(
            f"the Gauss-Newton operator's default outputs are (model(x), y) of a batch (x, y), "
            f"and this batch is {kind}: pass outputs_fn=lambda model, batch: (logits, targets)"
        )
    outputs = model(batch[0])
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"model(x) returned {type(outputs).__name__}, not the outputs tensor the "
            "Gauss-Newton operator differentiates: pass outputs_fn=lambda model, batch: "
            "(logits, targets)"
        )
    return outputs, batch[1]


class GGNOperator(CurvatureOperator):
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
        batch_size_fn: ``batch -> int`` samples in a batch (``reduction="mean"``), as for
            the Hessian.
        distributed: As for the Hessian: the GGN of the union of every process's ``data``.
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
        batch_size_fn: Callable[[Any], int] | None = None,
        distributed: bool = False,
    ) -> None:
        settings = OperatorSettings.from_arguments(
            {**locals(), "curvature": "ggn", "ggn_loss": loss}
        )
        super().__init__(model, data, settings, distributed)
        self._check_not_sharded()

    @classmethod
    def from_settings(
        cls, model: nn.Module, data: Any, settings: OperatorSettings, distributed: bool = False
    ) -> GGNOperator:
        """The operator of checked ``settings`` (``curvature="ggn"``)."""
        operator = cls.__new__(cls)
        CurvatureOperator.__init__(operator, model, data, settings, distributed)
        operator._check_not_sharded()
        return operator

    def _check_not_sharded(self) -> None:
        self.loss = self.settings.ggn_loss
        self.outputs_fn = self.settings.outputs_fn or default_outputs
        self._graphs: list | None = None
        if self.sharded:
            raise ValueError(
                "the Gauss-Newton operator needs the graph of the outputs, which parameters "
                "sharded by fully_shard (FSDP2) do not keep: measure the Hessian with "
                "hvp='gradient_difference'"
            )

    def release(self) -> None:
        """Free the kept graphs of the outputs (rebuilt at the next product)."""
        self._graphs = None

    def _output_curvature(self, outputs: torch.Tensor, targets: Any):
        """``w ↦ H_out w`` for this batch's (flattened) outputs, reduction included."""
        f = outputs.detach()
        if self.loss == "cross_entropy":
            rows = f.reshape(-1, f.shape[-1])
            p = torch.softmax(rows, dim=1)
            kept = _rows_not_ignored(targets, rows)
            scale: torch.Tensor | float = 1.0
            if kept is not None:
                p = p * kept[:, None]  # H_out of an ignored row is 0
                if self.reduction == "mean":
                    count = kept.sum(dtype=torch.promote_types(rows.dtype, torch.float32))
                    scale = 1.0 / count.clamp(min=1.0)  # a tensor: no host sync
            elif self.reduction == "mean":
                scale = 1.0 / rows.shape[0]

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
                    outputs, targets = self.outputs_fn(self.model, fresh_batch(batch))
                    dummy = torch.zeros_like(outputs, requires_grad=True)
                    transposed = torch.autograd.grad(
                        outputs, self.params, dummy, create_graph=True, allow_unused=True
                    )
                curvature = self._output_curvature(outputs, targets)
                graphs.append((outputs, dummy, transposed, curvature))
            self.raise_if_non_finite([g[0].detach() for g in graphs], what="an output")
            self._graphs = graphs
        return self._graphs

    def _products(self, block: torch.Tensor) -> torch.Tensor:
        """``Σ_b w_b J_bᵀ H_out,b J_b v`` for each row, in the parameters' dtype."""
        rows = []
        split = self.split(block)  # parameter-shaped, in the products' dtype
        for index in range(block.shape[0]):
            pieces = [piece[index] for piece in split]
            total = torch.zeros(1, self.size, dtype=self.dtype, device=self.device)
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
                total += weight * self.flatten(list(back), 1)
            rows.append(total)
        return torch.cat(rows)


#: torch's default ``ignore_index`` of ``F.cross_entropy``: targets that add no loss term.
IGNORE_INDEX = -100


def _rows_not_ignored(targets: Any, rows: torch.Tensor) -> torch.Tensor | None:
    """A 0/1 mask (in the rows' dtype) of the ``rows`` whose class-index target is not
    :data:`IGNORE_INDEX`, or ``None`` where every row counts: targets that are probabilities
    (``H_out`` does not depend on them) or not one per row."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    if targets.numel() != rows.shape[0]:
        return None
    return (targets.reshape(-1) != IGNORE_INDEX).to(device=rows.device, dtype=rows.dtype)
