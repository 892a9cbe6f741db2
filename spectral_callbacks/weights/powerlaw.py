"""The power-law fit of an ESD's tail: continuous maximum likelihood, ``xmin`` by KS distance.

For eigenvalues ``x₁ ≤ … ≤ x_N`` and a candidate lower bound ``xmin = x_i`` the tail
``x_i … x_N`` (``n = N − i + 1`` values) has the continuous maximum-likelihood exponent
(Clauset, Shalizi & Newman 2009, eq. 3.1)

    α_i = 1 + n / Σ_{j ≥ i} ln(x_j / x_i),

with standard error ``(α_i − 1) / √n``, and Kolmogorov–Smirnov distance between the
fitted CDF ``1 − (x / x_i)^{1−α_i}`` and the tail's empirical CDF ``(j − i) / n`` at ``x_j``

    D_i = max_{j ≥ i} |1 − (x_j / x_i)^{1−α_i} − (j − i) / n|     (D_i = 1 when α_i ≤ 1,
                                                                    or is infinite: ties).

``xmin`` is the candidate of smallest ``D_i`` (the first of equals), over every eigenvalue
but the largest. These are the formulas of the ``powerlaw`` package and of weightwatcher's
own fit (its default ``pl_package="ww"`` for 20 or more eigenvalues), so given the same
eigenvalues the same ``xmin`` and ``α`` come out. Eigenvalues at or below
:data:`EIGENVALUE_FLOOR` are left out first, as weightwatcher does. Everything runs in
float64 torch on the eigenvalues' device; the ``D_i`` are computed for blocks of candidates
at once (memory ``O(block · N)``, time ``O(N²)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["EIGENVALUE_FLOOR", "PowerLawFit", "fit_power_law"]

#: Eigenvalues at or below this are not part of the fit (weightwatcher's ``EVALS_THRESH``).
EIGENVALUE_FLOOR = 1e-5

#: Candidates whose KS distances are computed in one block (memory: block × N float64).
_BLOCK_ELEMENTS = 2**22


@dataclass(frozen=True)
class PowerLawFit:
    """A power law fitted to the tail of an ESD.

    Attributes:
        alpha: The exponent α of the density ``p(λ) ∝ λ^{−α}`` for ``λ ≥ xmin``.
        xmin: The lower bound of the tail (an eigenvalue).
        xmax: The largest eigenvalue.
        ks_distance: The KS distance ``D`` at ``xmin``.
        sigma: The standard error ``(α − 1) / √n`` of α.
        num_tail: ``n``, eigenvalues at or above ``xmin`` (weightwatcher's ``num_pl_spikes``).
        num_fitted: Eigenvalues above the floor that the fit saw.
    """

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    sigma: float
    num_tail: int
    num_fitted: int


def _tail_exponents(log_x: torch.Tensor) -> torch.Tensor:
    """``α_i`` for every candidate ``i`` of ascending log-eigenvalues (the last excluded)."""
    count = log_x.numel()
    tail_sizes = torch.arange(count, 0, -1, dtype=log_x.dtype, device=log_x.device)
    tail_log_sums = log_x.flip(0).cumsum(0).flip(0)
    excess = (tail_log_sums - tail_sizes * log_x)[:-1]
    with torch.no_grad():
        alphas = 1.0 + tail_sizes[:-1] / excess
    return torch.where(excess > 0, alphas, torch.full_like(alphas, math.inf))


def _ks_distances(
    log_x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """``D_i`` of the given candidate indices (ascending), computed as one block.

    Columns ``j < i`` get ratio 1 and empirical CDF 0, so their gap is 0 and the maximum is
    that over the tail (in-place steps: two ``block × N`` buffers)."""
    count = log_x.numel()
    first = int(candidates[0])
    alpha = alphas[candidates].unsqueeze(1)
    tail_sizes = (count - candidates).to(log_x.dtype).unsqueeze(1)
    gaps = (log_x[first:].unsqueeze(0) - log_x[candidates].unsqueeze(1)).clamp_(min=0.0)
    gaps.mul_(1.0 - alpha).exp_()  # (x_j / x_i)^{1-α}
    positions = torch.arange(first, count, device=log_x.device).unsqueeze(0)
    empirical = (positions - candidates.unsqueeze(1)).clamp_(min=0).to(log_x.dtype)
    empirical.div_(tail_sizes)
    gaps.neg_().add_(1.0).sub_(empirical).abs_()  # |fitted CDF - empirical CDF|
    distances = gaps.amax(dim=1)
    # A tail of equal values (ties at the top, as rounding to 16 bits makes them) has no
    # finite α and a NaN distance, which would win the minimum: it is no candidate.
    fitted = (alphas[candidates] > 1.0) & torch.isfinite(alphas[candidates])
    return torch.where(fitted, distances, torch.ones_like(distances))


def fit_power_law(
    eigenvalues: torch.Tensor,
    xmin: float | None = None,
    floor: float = EIGENVALUE_FLOOR,
) -> PowerLawFit:
    """Fit ``p(λ) ∝ λ^{−α}`` to the tail of an ESD (module docstring for the formulas).

    Args:
        eigenvalues: The ESD (any order, any floating dtype; computed in float64).
        xmin: Fix the tail's lower bound at the eigenvalue closest to this value instead of
            choosing it by the KS distance.
        floor: Eigenvalues at or below it are left out (default :data:`EIGENVALUE_FLOOR`).

    Returns:
        The :class:`PowerLawFit`.

    Raises:
        ValueError: If fewer than 2 eigenvalues lie above ``floor``.

    Example:
        >>> import torch
        >>> generator = torch.Generator().manual_seed(0)
        >>> pareto = (1 - torch.rand(5000, generator=generator, dtype=torch.float64)) ** (-1 / 2.0)
        >>> round(fit_power_law(pareto).alpha, 1)                 # density ∝ λ^-3
        3.0
    """
    x = eigenvalues.detach().reshape(-1).to(torch.float64)
    x = x[x > floor].sort().values
    count = x.numel()
    if count < 2:
        raise ValueError(
            f"a power-law fit needs at least 2 eigenvalues above floor={floor}, got {count}"
        )
    log_x = x.log()
    alphas = _tail_exponents(log_x)
    if xmin is not None:
        best = int((x[:-1] - float(xmin)).abs().argmin())
        distance = _ks_distances(log_x, alphas, torch.tensor([best], device=x.device))[0]
    else:
        block = max(1, _BLOCK_ELEMENTS // count)
        distances = torch.cat(
            [
                _ks_distances(
                    log_x, alphas, torch.arange(s, min(s + block, count - 1), device=x.device)
                )
                for s in range(0, count - 1, block)
            ]
        )
        best = int(distances.argmin())
        distance = distances[best]
    alpha = float(alphas[best])
    tail = count - best
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[best]),
        xmax=float(x[-1]),
        ks_distance=float(distance),
        sigma=(alpha - 1.0) / math.sqrt(tail),
        num_tail=tail,
        num_fitted=count,
    )
