"""Sharpness as SAM measures it: the loss a small step uphill adds.

Sharpness-aware minimisation (Foret et al. 2021) minimises ``max_{‖ε‖ ≤ ρ} L(θ + ε)``, with
the maximiser approximated to first order by ``ε = ρ g / ‖g‖``. Its sharpness is the loss
that step adds, and first-order flatness (GAM, Zhang et al. 2023) the gradient's norm there;
comparing runs with and without SAM on the measure SAM optimises needs exactly these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._checks import check_number
from .hessian import HessianOperator

__all__ = ["SamSharpness", "sam_sharpness_of"]


@dataclass
class SamSharpness:
    """What one step ``ρ g/‖g‖`` uphill does.

    Attributes:
        radius: ``ρ``.
        loss: ``L(θ)``, the dataset loss on the operator's data.
        sharpness: ``L(θ + ρ g/‖g‖) − L(θ)``.
        gradient_norm: ``‖g‖ = ‖∇L(θ)‖``.
        perturbed_gradient_norm: ``‖∇L(θ + ρ g/‖g‖)‖`` (first-order flatness).
    """

    radius: float
    loss: float
    sharpness: float
    gradient_norm: float
    perturbed_gradient_norm: float


def sam_sharpness_of(operator: HessianOperator, radius: float) -> SamSharpness:
    """SAM's sharpness and first-order flatness at radius ``radius`` on ``operator``'s data.

    Three forward and two backward passes (the gradient, then the loss and the gradient at
    the moved parameters, which are copied back bit for bit); no Hessian-vector products.
    On a quadratic ``½ θᵀAθ`` the sharpness is ``ρ ‖g‖ + ½ ρ² ĝᵀAĝ`` exactly (``ĝ = g/‖g‖``).
    A zero gradient gives NaN (no uphill direction).
    """
    radius = check_number("radius", radius, minimum=0.0, inclusive=False)
    gradient = operator.gradient().double()
    norm = float(gradient.norm())
    loss = operator.loss()
    if norm == 0.0:
        return SamSharpness(radius, loss, math.nan, 0.0, math.nan)
    with operator.moved((radius / norm) * gradient):
        moved_loss = operator.loss()
        moved_norm = float(operator.gradient().double().norm())
    return SamSharpness(radius, loss, moved_loss - loss, norm, moved_norm)
