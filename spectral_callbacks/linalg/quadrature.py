"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

For a probe ``v`` and ``m`` Lanczos steps started from it, the tridiagonal ``T_m = U Θ Uᵀ``
gives a Gauss quadrature rule with nodes ``θ_i`` and weights ``τ_i = U_{1i}²`` (they sum to
1) such that ``vᵀ f(A) v / ‖v‖² ≈ Σ_i τ_i f(θ_i)``, exactly for polynomials ``f`` of degree
below ``2m``. Averaging the rules of several random probes estimates the spectral measure
``(1/n) Σ_j δ(λ - λ_j)`` (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_integer
from ._krylov import IndependentLanczos, ThreeTermLanczos, tridiagonal_matrix
from ._precision import full_precision
from .eigsh import product_error_floor
from .operators import SymmetricOperator

__all__ = [
    "DENSITY_PROBE_COORDINATES",
    "FULL_REORTHOGONALISATION_BYTES",
    "ZERO_TOLERANCE",
    "SpectralDensity",
    "default_density_probes",
    "slq",
]

#: :func:`slq` reorthogonalises fully while its Krylov bases, ``num_probes · (steps + 1) · n``
#: entries, take at most this many bytes; beyond, it keeps two vectors per probe. At the
#: defaults (8 probes, 64 steps, float32) the bases of a model with n parameters take 2 KB
#: per parameter: 1.4 GB for W1 (0.67 M), 23 GB for ResNet-18 (11 M).
FULL_REORTHOGONALISATION_BYTES = 2**30

#: Eigenvalues closer to zero than this fraction of the spectral radius count as zero in
#: :attr:`SpectralDensity.negative_mass` and :attr:`SpectralDensity.near_zero_mass`.
ZERO_TOLERANCE = 0.01


#: Probe coordinates (probes times the dimension) :func:`default_density_probes` asks for.
DENSITY_PROBE_COORDINATES = 2**14


def default_density_probes(size: int, least: int = 4, most: int = 8) -> int:
    """Probes for a density of an ``n = size`` operator: ``⌈2¹⁴ / n⌉``, from ``least`` to
    ``most``.

    A Rademacher probe ``z`` estimates the fraction ``p`` of eigenvalues in a set ``S`` by
    ``zᵀ P_S z / n`` (``P_S`` the projector on their eigenvectors), with variance
    ``2 (‖P_S‖_F² - Σ_i (P_S)_ii²) / n² ≤ 2 p (1 - p) / n``, divided by the number of
    probes; small models, whose products are cheap, get up to ``most``. For large models
    the quadrature, not the probe, sets the error: each probe's nodes fall differently, and
    the outlier count and bulk edge read off one or two probes' rules scatter between probe
    draws (docs/benchmarks.md), hence at least ``least``.
    """
    return max(least, min(most, math.ceil(DENSITY_PROBE_COORDINATES / size)))


@dataclass
class SpectralDensity:
    """Quadrature rules of stochastic Lanczos quadrature, one per probe.

    Attributes:
        nodes: ``(num_probes, m)`` float64 Ritz values of each probe's tridiagonal.
        weights: ``(num_probes, m)`` float64 quadrature weights; each row sums to 1.
        num_hvps: Operator products used (``num_probes · m``).
        residuals: ``(num_probes, m)`` float64 Ritz residual norms ``‖A y - θ y‖ =
            |β_m u_{m,i}|`` of the nodes (unit Ritz vectors ``y``), at least the error the
            products themselves carry (:func:`floor_at_product_error`), or ``None``.
        reorthogonalized: Whether the recurrences were fully reorthogonalised (else they
            kept two vectors each, and residuals hold up to rounding, Paige 1980).

    If the operator produced a non-finite value, nodes, weights and residuals are NaN.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_hvps: int
    residuals: torch.Tensor | None = None
    reorthogonalized: bool = True

    @classmethod
    def of_spectrum(cls, eigenvalues: torch.Tensor) -> SpectralDensity:
        """The exact spectral measure ``(1/n) Σ_j δ(λ - λ_j)`` of known eigenvalues, as one
        rule with a node of weight ``1/n`` per eigenvalue (the reference SLQ estimates)."""
        nodes = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(1, -1)
        return cls(nodes, torch.full_like(nodes, 1.0 / nodes.shape[1]), num_hvps=0)

    def evaluate(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid``, averaged over probes.

        ``ρ(x) = (1/P) Σ_p Σ_i τ_{p,i} N(x; θ_{p,i}, σ²)``; it integrates to 1 over the real
        line (so over a grid that covers the nodes by a few ``σ``).
        """
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        grid = torch.as_tensor(grid, dtype=torch.float64)
        offsets = (grid.reshape(-1, 1, 1) - self.nodes.unsqueeze(0)) / sigma
        kernel = torch.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights.unsqueeze(0)).sum(dim=2).mean(dim=1).reshape(grid.shape)

    def moment(self, order: int) -> torch.Tensor:
        """Per-probe quadrature moments ``Σ_i τ_i θ_i^order`` (``≈ vᵀAʲv/‖v‖²``)."""
        return (self.weights * self.nodes**order).sum(dim=1)

    def mass_below(self, threshold: float) -> float:
        """Estimated fraction of eigenvalues below ``x = threshold``.

        ``(1/P) Σ_p Σ_{i: θ_{p,i} < x} τ_{p,i}``, the quadrature's mass below ``x``.

        Accurate when little spectral mass lies within the quadrature's resolution of
        ``threshold`` (roughly the spectral range over the number of steps). A Gauss node
        stands for a whole cluster of eigenvalues, so at a threshold inside a dense cluster,
        such as the near-zero bulk of a Hessian, the estimate can be off by most of that
        cluster's mass.
        """
        return float((self.weights * (self.nodes < threshold)).sum(dim=1).mean())

    @property
    def spectral_radius(self) -> float:
        """Largest ``|θ|`` of a node with positive weight (an estimate of ``max |λ|``)."""
        low, high = self.support
        return max(abs(low), abs(high))

    @property
    def negative_mass(self) -> float:
        """Fraction of eigenvalues below ``-ZERO_TOLERANCE · spectral_radius``.

        Eigenvalues closer to zero than ``ZERO_TOLERANCE`` (1 %) of the spectral radius count
        as zero (:attr:`near_zero_mass`), because the quadrature cannot tell their sign: a
        Hessian's near-zero bulk of tiny positive and negative eigenvalues is represented by
        one or two nodes whose sign is arbitrary. docs/numerics.md compares the estimate with
        dense spectra.
        """
        radius = self.spectral_radius
        return self.mass_below(-ZERO_TOLERANCE * radius) if math.isfinite(radius) else math.nan

    @property
    def near_zero_mass(self) -> float:
        """Fraction of eigenvalues with ``|λ| ≤ ZERO_TOLERANCE · spectral_radius``."""
        radius = ZERO_TOLERANCE * self.spectral_radius
        if not math.isfinite(radius):
            return math.nan
        return float((self.weights * (self.nodes.abs() <= radius)).sum(dim=1).mean())

    @property
    def lambda_min(self) -> float:
        """The smallest node over all probes: an estimate of the smallest eigenvalue.

        Every node is a Ritz value, so ``λ_min ≤ lambda_min`` (Cauchy interlacing), and some
        eigenvalue lies within :attr:`lambda_min_residual` of it (both up to the products'
        error, which the residual is at least, and up to rounding when the recurrences kept
        two vectors: Paige 1980). Lanczos resolves the ends of a
        spectrum first, so with the default 64 steps it is close to a separate solve for the
        smallest eigenvalue (docs/benchmarks.md). Like any Krylov
        estimate it cannot reveal an eigenvalue that no probe has reached yet.
        """
        finite = self.nodes[torch.isfinite(self.nodes)]
        return float(finite.min()) if finite.numel() else math.nan

    @property
    def lambda_min_residual(self) -> float:
        """Ritz residual norm of :attr:`lambda_min`, at least the products' error (NaN
        without residuals)."""
        if self.residuals is None or not bool(torch.isfinite(self.nodes).any()):
            return math.nan
        index = torch.where(torch.isfinite(self.nodes), self.nodes, math.inf).argmin()
        return float(self.residuals.reshape(-1)[index])

    @property
    def support(self) -> tuple[float, float]:
        """Smallest and largest node with positive weight (estimates of λ_min and λ_max)."""
        present = self.weights > 0
        if not bool(present.any()):  # a non-finite operator: NaN nodes and weights
            return math.nan, math.nan
        return float(self.nodes[present].min()), float(self.nodes[present].max())


@full_precision
def slq(
    operator: SymmetricOperator,
    num_probes: int = 8,
    steps: int = 64,
    seed: int = 0,
    probes: torch.Tensor | None = None,
    reorthogonalize: bool | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher probes.

    All probes run their Lanczos recurrences side by side, so each step is one ``matmat`` of
    ``num_probes`` vectors, with a float64 tridiagonal. With full reorthogonalisation, when
    a Krylov space becomes invariant the rule is exact and the extra nodes carry zero
    weight. Without it (two vectors kept per probe, memory ``3 · num_probes · n``), the rule
    stays a Gauss rule of a nearby spectral measure (Greenbaum 1989); docs/numerics.md
    compares the two against exact spectra.

    Args:
        operator: The symmetric operator.
        num_probes: Number of random probes ``P``.
        steps: Lanczos steps per probe ``m`` (capped at ``n``).
        seed: Seed of the Rademacher probes.
        probes: Explicit ``(P, n)`` probes instead of random ones.
        reorthogonalize: Full reorthogonalisation (``True``), two vectors per probe
            (``False``), or ``None``: full while the bases fit in
            :data:`FULL_REORTHOGONALISATION_BYTES`.
    """
    if probes is None:
        check_integer("num_probes", num_probes, minimum=1)
        generator = torch.Generator(device=operator.device).manual_seed(seed)
        bits = torch.randint(
            0, 2, (num_probes, operator.size), generator=generator, device=operator.device
        )
        probes = (2 * bits - 1).to(operator.dtype)
    else:
        generator = torch.Generator(device=operator.device).manual_seed(seed)
        probes = probes.reshape(-1, operator.size).to(dtype=operator.dtype, device=operator.device)
    check_integer("steps", steps, minimum=1)
    steps = min(steps, operator.size)
    if reorthogonalize is None:
        basis_bytes = probes.shape[0] * (steps + 1) * operator.size * probes.element_size()
        reorthogonalize = basis_bytes <= FULL_REORTHOGONALISATION_BYTES
    if reorthogonalize:
        recurrence = IndependentLanczos(operator, probes, steps, generator, preallocate=True)
    else:
        recurrence = ThreeTermLanczos(operator, probes, steps, generator)
    for _ in range(steps):
        recurrence.step()
    alpha, beta = recurrence.tridiagonal()
    num_hvps = steps * probes.shape[0]
    if not bool(torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
        nan = torch.full_like(alpha, math.nan)
        return SpectralDensity(nan, nan.clone(), num_hvps, nan, bool(reorthogonalize))
    values, vectors = torch.linalg.eigh(tridiagonal_matrix(alpha, beta))
    weights = vectors[:, 0, :] ** 2
    # beta[:, m-1] couples the basis to the next direction: A Q = Q T + β_m q_{m+1} e_mᵀ.
    residuals = floor_at_product_error(operator, values, (beta[:, -1:] * vectors[:, -1, :]).abs())
    return SpectralDensity(values, weights, num_hvps, residuals, bool(reorthogonalize))


def floor_at_product_error(
    operator: SymmetricOperator, nodes: torch.Tensor, residuals: torch.Tensor
) -> torch.Tensor:
    """Ritz ``residuals`` no smaller than the error of ``operator``'s products,
    :func:`~spectral_callbacks.linalg.eigsh.product_error_floor` at the largest ``|θ|`` of
    ``nodes``: a converged node's ``|β_m u_{m,i}|`` falls to the rounding of the float64
    recurrence (often 0), far below what float32 or 16-bit products resolve."""
    finite = nodes[torch.isfinite(nodes)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return residuals.clamp_min(product_error_floor(operator, scale))
