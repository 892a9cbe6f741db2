"""Batch sharpness: the curvature of a mini-batch's loss along its own gradient.

Andreyev & Beneventano (Edge of Stochastic Stability, 2024) show that under mini-batch SGD
it is not the full-batch λ_max that settles at ``2/η`` but the expected directional
curvature of the mini-batch Hessian along the mini-batch gradient:

    q(B) = g_Bᵀ H_B g_B / ‖g_B‖²,    batch sharpness = E_B[q(B)],

with ``g_B`` and ``H_B`` the gradient and Hessian of the batch's loss at the parameters the
batch's gradient is taken at. ``q(B) ≤ λ_max(H_B)``, with equality when ``g_B`` is an
eigenvector of the top eigenvalue.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hessian import HessianOperator

__all__ = ["BatchSharpness", "batch_sharpness_of"]


@dataclass
class BatchSharpness:
    """``q(B)`` of one batch.

    Attributes:
        value: ``g_Bᵀ H_B g_B / ‖g_B‖²`` (NaN for a zero gradient: no direction).
        gradient_norm: ``‖g_B‖``.
        num_hvps: Hessian-vector products spent (one).
    """

    value: float
    gradient_norm: float
    num_hvps: int


def batch_sharpness_of(operator: HessianOperator) -> BatchSharpness:
    """``q(B)`` for the batch(es) ``operator`` is taken over (summed over processes when it is
    distributed: the global batch).

    One product: on the reused-graph path the first-order graph that gives the gradient also
    carries the product, so the cost is one forward pass, one backward pass that keeps its
    graph and one backward pass through it. Reduced in float64.
    """
    before = operator.num_hvps
    gradient = operator.gradient(for_products=True)
    norm_squared = float(gradient.double().pow(2).sum())
    if norm_squared == 0.0:
        return BatchSharpness(float("nan"), 0.0, 0)
    product = operator.matvec(gradient)
    value = float((gradient.double() * product.double()).sum()) / norm_squared
    return BatchSharpness(value, norm_squared**0.5, operator.num_hvps - before)
