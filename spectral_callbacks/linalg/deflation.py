"""Trace and density on the complement of known eigenpairs, from one set of probes.

A top-``k`` solve gives Ritz pairs ``(θ_i, v_i)``; with ``Q`` their orthonormal span and
``P = I - QQᵀ``, the operator splits as ``A = Q Θ Qᵀ + P A P + (cross terms)``, where the
cross terms ``P A Q`` are the Ritz residuals (zero for exact eigenvectors). So

- the trace is ``Σ θ_i + tr(P A P)``, exactly (:func:`~.trace.deflated_hutchinson`), and
- the spectral measure ``(1/n) Σ_j δ(λ - λ_j)`` is ``k`` point masses ``1/n`` at the
  ``θ_i`` plus ``(n - k)/n`` times the measure of ``P A P`` on the complement, up to the
  residuals: each eigenvalue of the split operator lies within ``max_i ‖r_i‖`` of one of
  ``A`` (Weyl).

Stochastic Lanczos quadrature on the complement (probes ``P z``, products with ``P A P``)
then meets a spectrum without its outliers: they enter as exact nodes instead of through
each probe's random weight on them, and the low end of the spectrum converges sooner (an
extreme Ritz value converges at a rate set by its gap over the range of the rest). The
quadrature's resolution inside the bulk stays what the number of steps gives, as without
deflation. And the first step of each probe's recurrence computes
``(P z)ᵀ A (P z) = ‖P z‖² α_1``, one sample of the deflated Hutchinson estimator:
:func:`deflated_spectrum` draws the trace's probes and runs the density on the first of
them, so those samples cost nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_integer
from ._precision import full_precision
from .operators import DerivedOperator, SymmetricOperator
from .quadrature import SpectralDensity, floor_at_product_error, slq
from .trace import (
    TraceEstimate,
    _quadratic_forms,
    _rademacher,
    deflated_estimate,
    deflation_basis,
    exact_trace,
    project_out,
)

__all__ = ["ComplementOperator", "DeflatedSpectrum", "deflated_spectrum"]


class ComplementOperator(DerivedOperator):
    """``P A P`` with ``P = I - QᵀQ`` for orthonormal rows ``Q``: ``A`` on the complement.

    Both projections are applied, so the products stay in the complement whatever rounding
    or inexact eigenvectors put into ``A``'s output; ``Q``'s own span maps to zero.
    """

    congruent = True

    def __init__(self, operator: SymmetricOperator, basis: torch.Tensor) -> None:
        super().__init__(operator)
        self.basis = basis

    def congruence(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block P`` for a ``(b, n)`` block."""
        return block - (block @ self.basis.T) @ self.basis

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block P A P`` for a ``(b, n)`` block."""
        return self.congruence(self.operator.matmat(self.congruence(block)))


@dataclass
class DeflatedSpectrum:
    """What :func:`deflated_spectrum` returns.

    Attributes:
        trace: The deflated Hutchinson estimate, or ``None`` if not asked for.
        density: The deflated density, or ``None`` if not asked for.
        num_hvps: Operator products of both together.
    """

    trace: TraceEstimate | None
    density: SpectralDensity | None
    num_hvps: int


def _complement_density(
    operator: SymmetricOperator,
    basis: torch.Tensor,
    values: torch.Tensor,
    probes: torch.Tensor,
    steps: int,
    reorthogonalize: bool | None,
    residuals: torch.Tensor | None,
) -> tuple[SpectralDensity, torch.Tensor]:
    """The deflated density from projected ``probes``, and their forms ``(Pz)ᵀ A (Pz)``."""
    n, k = operator.size, basis.shape[0]
    ritz_nodes = values.to(torch.float64).reshape(1, -1).expand(probes.shape[0], -1)
    ritz_residuals = (
        torch.full_like(ritz_nodes, torch.nan)
        if residuals is None
        else torch.as_tensor(residuals, dtype=torch.float64).reshape(1, -1).expand_as(ritz_nodes)
    )
    ritz_weights = torch.full_like(ritz_nodes, 1.0 / n)
    if k >= n:  # nothing left: the Ritz pairs are the whole spectrum
        forms = torch.zeros(probes.shape[0], dtype=torch.float64)
        return SpectralDensity(ritz_nodes, ritz_weights, 0, ritz_residuals), forms
    squared_norms = (probes * probes).sum(dim=1, dtype=torch.float64).cpu()  # no float64 copy
    rest = slq(
        ComplementOperator(operator, basis),
        steps=min(steps, n - k),
        probes=probes,
        reorthogonalize=reorthogonalize,
    )
    # The Gauss rule is exact for degree 1: Σ τ θ = α_1 = (Pz)ᵀ A (Pz) / ‖Pz‖².
    forms = squared_norms * rest.moment(1)
    if not bool(torch.isfinite(rest.nodes).all()):
        return rest, forms
    nodes = torch.cat([rest.nodes, ritz_nodes], dim=1)
    # The complement's products carry the whole operator's rounding, not its own radius's.
    residuals = floor_at_product_error(
        operator, nodes, torch.cat([rest.residuals, ritz_residuals], 1)
    )
    density = SpectralDensity(
        nodes=nodes,
        weights=torch.cat([rest.weights * ((n - k) / n), ritz_weights], dim=1),
        num_hvps=rest.num_hvps,
        residuals=residuals,
        reorthogonalized=rest.reorthogonalized,
    )
    return density, forms


@full_precision
def deflated_spectrum(
    operator: SymmetricOperator,
    eigenvectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    trace_hvps: int | None = 33,
    density_probes: int | None = 4,
    density_steps: int = 64,
    seed: int = 0,
    residuals: torch.Tensor | None = None,
    reorthogonalize: bool | None = None,
    block_size: int = 16,
) -> DeflatedSpectrum:
    """The deflated trace and density from shared probes (module docstring).

    The trace is :func:`~.trace.deflated_hutchinson` with ``trace_hvps`` probes, the same
    probes for the same ``seed``: the first ``density_probes`` of them start the density's
    recurrences, whose first steps give their quadratic forms, so the
    trace costs ``max(0, trace_hvps - density_probes)`` products beyond the density's
    ``density_probes · density_steps``. The trace's ``num_hvps`` counts its probes as
    :func:`~.trace.deflated_hutchinson` would, shared ones included; the result's
    ``num_hvps`` counts each product once. With ``trace_hvps >= n`` the trace is exact
    (``n`` products) and the density draws its own probes.

    Args:
        operator: The symmetric operator ``A``.
        eigenvectors: ``(k, n)`` Ritz vectors of a solve.
        eigenvalues: Their Ritz values.
        trace_hvps: Hutchinson probes of the trace, or ``None`` for no trace.
        density_probes: Probes of the density, or ``None`` for no density.
        density_steps: Lanczos steps per density probe.
        seed: Seed of the probes.
        residuals: Optional Ritz residual norms for the density's Ritz nodes.
        reorthogonalize: As for :func:`~.quadrature.slq`.
        block_size: Probes per product block of the trace's remaining probes.
    """
    check_integer("trace_hvps", trace_hvps, minimum=2, allow_none=True)
    check_integer("density_probes", density_probes, minimum=1, allow_none=True)
    check_integer("density_steps", density_steps, minimum=1)
    if trace_hvps is not None and trace_hvps >= operator.size:
        trace = exact_trace(operator, block_size)
        rest = DeflatedSpectrum(None, None, 0)
        if density_probes is not None:
            rest = deflated_spectrum(
                operator,
                eigenvectors,
                eigenvalues,
                None,
                density_probes,
                density_steps,
                seed,
                residuals,
                reorthogonalize,
                block_size,
            )
        return DeflatedSpectrum(trace, rest.density, trace.num_hvps + rest.num_hvps)
    basis, values, extra = deflation_basis(operator, eigenvectors, eigenvalues, block_size)
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    shared = max(trace_hvps or 0, density_probes or 0)
    probes = project_out(_rademacher(shared, operator, generator), basis, block_size)
    density, forms, products = None, torch.empty(0, dtype=torch.float64), extra
    if density_probes is not None:
        density, forms = _complement_density(
            operator,
            basis,
            values,
            probes[:density_probes],
            density_steps,
            reorthogonalize,
            residuals,
        )
        products += density.num_hvps
        density.num_hvps += extra
    trace = None
    if trace_hvps is not None:
        forms = forms[:trace_hvps]
        remaining = probes[forms.numel() : trace_hvps]
        if remaining.shape[0]:
            forms = torch.cat([forms, _quadratic_forms(operator, remaining, block_size).cpu()])
            products += remaining.shape[0]
        trace = deflated_estimate(values, forms, num_hvps=trace_hvps + extra)
    return DeflatedSpectrum(trace, density, products)
