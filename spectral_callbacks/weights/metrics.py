"""Heavy-tailed self-regularisation metrics of one layer's ESD (Martin & Mahoney 2021).

For the eigenvalues ``λ`` of a layer (:mod:`spectral_callbacks.weights.esd`) and the
power-law exponent ``α`` of their tail (:mod:`spectral_callbacks.weights.powerlaw`):

* ``alpha``: ``α``; near 2 for well-trained layers, above about 6 for under-trained ones,
  below 2 for over-fitted ones.
* ``alpha_weighted``: ``α̂ = α · log₁₀ λ_max``.
* ``spectral_norm``: ``λ_max`` (the squared largest singular value, weightwatcher's name);
  ``log_spectral_norm``: ``log₁₀ λ_max``.
* ``norm``: ``Σ λ = ‖W‖_F²`` (times 1/2 for a kernel); ``log_norm``: ``log₁₀ Σ λ``, the
  Frobenius log norm.
* ``log_alpha_norm``: ``log₁₀ Σ λ^α``.
* ``stable_rank``: ``Σ λ / λ_max``.
* ``mp_softrank`` and ``num_spikes``: from the Marchenko–Pastur bulk
  (:func:`marchenko_pastur_bulk`): ``λ₊ / λ_max`` and the eigenvalues above the bulk edge.
* ``farms_alpha``: ``α`` of the ESD averaged over submatrices of one aspect ratio
  (:func:`farms_eigenvalues`), which removes the bias that a matrix's shape puts on ``α``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .esd import eigenvalue_scale, esd, weight_matrices
from .powerlaw import PowerLawFit, fit_power_law

__all__ = [
    "FARMS_MAX_WINDOWS",
    "FIT_METRICS",
    "LAYER_METRICS",
    "ZERO_WEIGHT_METRICS",
    "MarchenkoPasturBulk",
    "farms_eigenvalues",
    "farms_windows",
    "layer_metrics",
    "marchenko_pastur_bulk",
]

#: The metrics :func:`layer_metrics` returns, in order.
LAYER_METRICS = (
    "alpha",
    "alpha_weighted",
    "spectral_norm",
    "log_spectral_norm",
    "norm",
    "log_norm",
    "log_alpha_norm",
    "stable_rank",
    "mp_softrank",
    "num_spikes",
    "num_pl_spikes",
    "xmin",
    "ks_distance",
    "farms_alpha",
)

#: The metrics that need a power-law fit: NaN by definition for a layer without one (fewer
#: than 2 eigenvalues above the floor).
FIT_METRICS = (
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "num_pl_spikes",
    "xmin",
    "ks_distance",
    "farms_alpha",
)

#: The metrics with no finite value for an all-zero weight (LoRA's ``B`` at initialisation,
#: zero-initialised output layers), besides :data:`FIT_METRICS`: it has no scale, so its
#: logarithms are ``-inf`` and its ratios ``0 / 0`` (NaN).
ZERO_WEIGHT_METRICS = ("log_spectral_norm", "log_norm", "stable_rank", "mp_softrank", "num_spikes")

#: Most FARMS windows per matrix: a tall matrix (a 50257 × 768 token embedding) is sampled
#: by this many evenly spaced windows instead of covered by all of them.
FARMS_MAX_WINDOWS = 8

#: Tracy–Widom (β = 1) 0.99 quantile: the bulk edge's margin for the largest bulk eigenvalue.
_TRACY_WIDOM_99 = 2.02


@dataclass(frozen=True)
class MarchenkoPasturBulk:
    """The Marchenko–Pastur bulk fitted to an ESD, in units of the ESD's mean eigenvalue.

    Attributes:
        variance: ``σ²``, the bulk's mean eigenvalue (MP's scale) over the ESD's mean.
        bulk_min: ``σ² (1 − 1/√Q)²``.
        bulk_max: ``λ₊ = σ² (1 + 1/√Q)²``.
        threshold: ``λ₊`` plus 2.02 Tracy–Widom scales: eigenvalues above it are spikes.
        num_spikes: Eigenvalues above ``threshold``.
        soft_rank: ``λ₊ / λ_max`` (weightwatcher's ``mp_softrank``): about 1 for a random
            matrix, small when a few directions dominate.
    """

    variance: float
    bulk_min: float
    bulk_max: float
    threshold: float
    num_spikes: int
    soft_rank: float


def marchenko_pastur_bulk(
    eigenvalues: torch.Tensor, rows: int, columns: int, max_rounds: int = 100
) -> MarchenkoPasturBulk:
    """Fit the Marchenko–Pastur bulk of an ``N × M`` matrix's ESD and count its spikes.

    The eigenvalues are divided by their mean first (so the result does not depend on the
    weights' scale). For i.i.d. entries the ESD of ``Wᵀ W`` follows MP with aspect ratio
    ``Q = N/M`` and scale ``σ²`` = its mean, supported on ``σ² (1 ± 1/√Q)²``. Spikes pull
    the mean up, so ``σ²`` is re-estimated as the mean of the eigenvalues below the spike
    threshold until the spike count stops changing. The threshold adds to ``λ₊`` 2.02
    (the 0.99 quantile of Tracy–Widom, β = 1) times the largest eigenvalue's fluctuation
    scale ``σ² (1 + 1/√Q) (N^{−1/2} + M^{−1/2})^{1/3} N^{−1/2}`` (Johnstone 2001), so a
    Gaussian matrix shows a spike in about 1 % of draws.

    Args:
        eigenvalues: The ESD (for a kernel, the pooled ESD of its ``N × M`` slices).
        rows: ``N`` of each matrix (``N ≥ M``).
        columns: ``M``.
        max_rounds: Bound on the re-estimation rounds.

    Example:
        >>> import torch
        >>> noise = torch.randn(400, 100, generator=torch.Generator().manual_seed(0))
        >>> bulk = marchenko_pastur_bulk(torch.linalg.svdvals(noise) ** 2, 400, 100)
        >>> bulk.num_spikes, round(bulk.soft_rank, 1)
        (0, 1.0)
    """
    if rows < columns:
        rows, columns = columns, rows
    x = eigenvalues.detach().reshape(-1).to(torch.float64)
    x = x / x.mean()
    q = rows / columns
    edge = (1.0 + 1.0 / math.sqrt(q)) ** 2
    low_edge = (1.0 - 1.0 / math.sqrt(q)) ** 2
    fluctuation = (1.0 + 1.0 / math.sqrt(q)) * (rows**-0.5 + columns**-0.5) ** (1 / 3) * rows**-0.5
    bulk = torch.ones_like(x, dtype=torch.bool)
    variance = 1.0
    for _ in range(max_rounds):
        variance = float(x[bulk].mean())
        threshold = variance * (edge + _TRACY_WIDOM_99 * fluctuation)
        inside = x <= threshold
        if torch.equal(inside, bulk):
            break
        bulk = inside
    threshold = variance * (edge + _TRACY_WIDOM_99 * fluctuation)
    return MarchenkoPasturBulk(
        variance=variance,
        bulk_min=variance * low_edge,
        bulk_max=variance * edge,
        threshold=threshold,
        num_spikes=int((x > threshold).sum()),
        soft_rank=variance * edge / float(x.max()),
    )


def _windows(length: int, window: int) -> list[int]:
    """Evenly spaced starts of ``ceil(length / window)`` windows that cover ``[0, length)``,
    or of :data:`FARMS_MAX_WINDOWS` when more would be needed."""
    count = min(math.ceil(length / window), FARMS_MAX_WINDOWS)
    if count == 1:
        return [0]
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def farms_eigenvalues(
    weight: torch.Tensor,
    aspect_ratio: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The ESD averaged over submatrices of one aspect ratio (FARMS, Hu et al. 2025).

    A matrix's shape biases its fitted ``α``: the MP bulk of an ``N × M`` random matrix
    changes with ``Q = N/M``. FARMS fits the average ESD of submatrices of a fixed aspect
    ratio instead. Here each ``N × M`` matrix of the layer (``N ≥ M``; a kernel's slices
    each) is cut into windows of ``round(Q·M) × M`` rows slid along ``N`` (when
    ``N/M ≥ Q``), or ``N × round(N/Q)`` columns slid along ``M`` (when ``N/M < Q``): the
    fewest evenly spaced windows that cover the matrix, overlapping where they must, but at
    most :data:`FARMS_MAX_WINDOWS` (8) evenly spaced ones, which then sample it. All
    windows have one size, so pooling their eigenvalues is averaging their ESDs. Scale as
    in :func:`~spectral_callbacks.weights.esd`.

    Args:
        weight: A 2-d weight or a convolution kernel.
        aspect_ratio: ``Q ≥ 1`` of the windows (default 1: square).
        dtype: Precision of the SVDs.

    Returns:
        The pooled eigenvalues, ascending.
    """
    matrices = weight_matrices(weight)
    windows = farms_windows(*matrices.shape[1:], aspect_ratio)
    stacked = torch.stack([matrices[:, rows, columns] for rows, columns in windows])
    singular = torch.linalg.svdvals(stacked.to(dtype))
    return (singular.square().reshape(-1) * eigenvalue_scale(weight)).sort().values


def farms_windows(rows: int, columns: int, aspect_ratio: float = 1.0) -> list[tuple[slice, slice]]:
    """The (row, column) windows of :func:`farms_eigenvalues` for an ``N × M`` matrix
    (``N ≥ M``); one window is the whole matrix when its aspect ratio rounds to ``Q``."""
    if isinstance(aspect_ratio, bool) or not aspect_ratio >= 1.0:
        raise ValueError(f"aspect_ratio must be a number >= 1, got {aspect_ratio!r}")
    if rows / columns >= aspect_ratio:
        height = min(rows, max(1, round(aspect_ratio * columns)))
        return [(slice(s, s + height), slice(None)) for s in _windows(rows, height)]
    width = max(1, round(rows / aspect_ratio))
    return [(slice(None), slice(s, s + width)) for s in _windows(columns, width)]


def layer_metrics(
    weight: torch.Tensor,
    eigenvalues: torch.Tensor | None = None,
    fit: PowerLawFit | None = None,
    farms: bool = True,
    aspect_ratio: float = 1.0,
) -> dict[str, float]:
    """Every metric of :data:`LAYER_METRICS` for one weight (module docstring).

    Args:
        weight: A 2-d weight or a convolution kernel.
        eigenvalues: Its ESD if already computed (:func:`~spectral_callbacks.weights.esd`).
        fit: Its power-law fit if already computed.
        farms: Whether to compute ``farms_alpha`` (SVDs of the windows; NaN otherwise).
        aspect_ratio: The windows' aspect ratio for ``farms_alpha``.

    Returns:
        metric -> value. ``alpha`` and what depends on it are NaN when fewer than 2
        eigenvalues lie above the fit's floor.
    """
    x = esd(weight) if eigenvalues is None else eigenvalues.to(torch.float64)
    matrices = weight_matrices(weight)
    rows, columns = matrices.shape[1:]
    lambda_max = float(x.max())
    total = float(x.sum())
    if fit is None:
        try:
            fit = fit_power_law(x)
        except ValueError:
            fit = None
    alpha = fit.alpha if fit is not None else math.nan
    bulk = marchenko_pastur_bulk(x, rows, columns) if total > 0 else None
    farms_alpha = math.nan
    if farms:
        with contextlib.suppress(ValueError):  # fewer than 2 eigenvalues above the floor
            if len(farms_windows(rows, columns, aspect_ratio)) == 1:
                farms_alpha = alpha  # the one window is the matrix itself
            else:
                farms_alpha = fit_power_law(farms_eigenvalues(weight, aspect_ratio)).alpha
    return {
        "alpha": alpha,
        "alpha_weighted": alpha * math.log10(lambda_max) if lambda_max > 0 else math.nan,
        "spectral_norm": lambda_max,
        "log_spectral_norm": math.log10(lambda_max) if lambda_max > 0 else -math.inf,
        "norm": total,
        "log_norm": math.log10(total) if total > 0 else -math.inf,
        "log_alpha_norm": (
            math.log10(float(x.clamp_min(0.0).pow(alpha).sum()))
            if math.isfinite(alpha)
            else math.nan
        ),
        "stable_rank": total / lambda_max if lambda_max > 0 else math.nan,
        "mp_softrank": bulk.soft_rank if bulk is not None else math.nan,
        "num_spikes": float(bulk.num_spikes) if bulk is not None else math.nan,
        "num_pl_spikes": float(fit.num_tail) if fit is not None else math.nan,
        "xmin": fit.xmin if fit is not None else math.nan,
        "ks_distance": fit.ks_distance if fit is not None else math.nan,
        "farms_alpha": farms_alpha,
    }
