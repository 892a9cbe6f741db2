"""How many eigenvalues stand apart from the bulk: outliers from top-k values and a density.

Hessian spectra of trained networks are a bulk near zero plus a few outliers (Sagun et al.
2017/18; Papyan 2019, who ties the outliers to the class structure). The rule here:

1. Smooth the SLQ density with Gaussians of width ``σ = sigma_fraction · (θ_max − θ_min)``
   and turn it into a *local count*, ``c(x) = n ρ_σ(x) σ √(2π)``: for an isolated group of
   ``m`` eigenvalues it peaks near ``m``, inside a continuous bulk it is the number of
   eigenvalues within about ``σ`` of ``x``.
2. The bulk edge ``b`` is the largest ``x`` with ``c(x) ≥ min_count``: where eigenvalues are
   dense enough to form a bulk at that resolution. A soft edge (the square-root edge of a
   Marchenko–Pastur bulk) thins out below ``min_count`` before the bulk ends, so ``b`` then
   climbs the top-``k`` eigenvalues themselves: any top value within ``3σ`` above ``b``
   belongs to the bulk and becomes the new ``b``.
3. An outlier is a top-``k`` eigenvalue more than ``3σ`` above ``b``.

So an outlier is an eigenvalue that, at the density's resolution, has fewer than
``min_count`` neighbours: outliers closer together than ``σ`` in groups of ``min_count`` or
more read as bulk, and no more than ``k`` can be counted (ask for more top values than
outliers you expect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_integer, check_number
from .quadrature import SpectralDensity

__all__ = ["OutlierReport", "count_outliers"]


@dataclass
class OutlierReport:
    """Attributes:
    count: Top-``k`` eigenvalues more than ``3σ`` above ``bulk_edge``.
    bulk_edge: ``b``, the largest point whose local count reaches ``min_count``.
    sigma: The smoothing width ``σ``.
    outliers: The outlying eigenvalues, descending.
    """

    count: int
    bulk_edge: float
    sigma: float
    outliers: torch.Tensor


def count_outliers(
    top_eigenvalues: torch.Tensor,
    density: SpectralDensity,
    size: int,
    sigma_fraction: float = 0.01,
    min_count: float = 3.0,
    points: int = 4000,
) -> OutlierReport:
    """Count the top eigenvalues that stand apart from the bulk (module docstring).

    Args:
        top_eigenvalues: The top-``k`` eigenvalues (any order).
        density: An SLQ density of the same operator.
        size: The operator's dimension ``n``.
        sigma_fraction: Smoothing width as a fraction of the spectral range.
        min_count: Local count from which points belong to the bulk.
        points: Grid points on which the local count is evaluated.
    """
    check_integer("size", size, minimum=1)
    check_number("sigma_fraction", sigma_fraction, minimum=0.0, maximum=1.0, inclusive=False)
    check_number("min_count", min_count, minimum=0.0, inclusive=False)
    top = torch.as_tensor(top_eigenvalues, dtype=torch.float64).flatten()
    low, high = density.support
    finite = top[torch.isfinite(top)]
    if not (math.isfinite(low) and math.isfinite(high)) or finite.numel() == 0:
        return OutlierReport(0, math.nan, math.nan, torch.empty(0, dtype=torch.float64))
    high = max(high, float(finite.max()))
    sigma = sigma_fraction * max(high - low, torch.finfo(torch.float64).tiny)
    grid = torch.linspace(low - 3 * sigma, high + 3 * sigma, points, dtype=torch.float64)
    local = size * density.evaluate(grid, sigma) * sigma * math.sqrt(2 * math.pi)
    dense = grid[local >= min_count]
    edge = float(dense.max()) if dense.numel() else low
    for value in torch.sort(finite).values.tolist():  # climb a soft edge (step 2)
        if edge < value <= edge + 3 * sigma:
            edge = value
    outliers = torch.sort(finite[finite > edge + 3 * sigma], descending=True).values
    return OutlierReport(int(outliers.numel()), edge, sigma, outliers)
