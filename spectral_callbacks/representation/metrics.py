"""Dimensionality of representations from their eigenspectra.

Every function takes either embeddings ``Z`` (a 2-D ``(N, D)`` tensor, or ``(B, T, …, D)``
flattened to rows) or a precomputed 1-D spectrum. A 1-D input is always the
**eigenvalues** ``λ_i ≥ 0`` of the relevant ``D × D`` matrix (any order, any positive
scale): the raw second moment ``ZᵀZ/N`` for :func:`rankme`, the centred covariance for the
others. All arithmetic is float64; eigenvalues ``≤ 0`` carry no mass.

With ``p_i = λ_i / Σ_j λ_j`` (the covariance spectrum as a distribution) the covariance
measures are exponentials of Rényi entropies, so on one spectrum
``stable_rank (exp H_∞) ≤ participation_ratio (exp H_2) ≤ effective_rank (exp H_1)``.

A spectrum with no positive eigenvalue (every embedding zero, or, for the centred
measures, every embedding equal) has no dimension at all: :func:`rankme`,
:func:`effective_rank`, :func:`participation_ratio` and :func:`stable_rank` return
:data:`COLLAPSED` (0), the bottom of their scale (any other spectrum gives at least 1), and
:func:`von_neumann_entropy` returns 0. A dead layer reads as the collapse it is.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._checks import check_fit_range
from .spectra import Pool, covariance_spectrum, second_moment_spectrum

__all__ = [
    "COLLAPSED",
    "AlphaReqFit",
    "alpha_req",
    "alpha_req_fit",
    "effective_rank",
    "participation_ratio",
    "rankme",
    "stable_rank",
    "von_neumann_entropy",
]


def _spectrum(
    z_or_eigs: torch.Tensor, center_by_default: bool, center: bool | None, pool: Pool
) -> torch.Tensor:
    """Descending non-negative float64 eigenvalues from embeddings or a given spectrum."""
    z_or_eigs = torch.as_tensor(z_or_eigs)
    if z_or_eigs.is_complex():
        raise ValueError(
            "the input is complex; the spectra are defined for real embeddings or eigenvalues "
            "(pass torch.view_as_real(z).flatten(-2) or z.abs())"
        )
    if z_or_eigs.numel() == 0:
        raise ValueError(f"the input is empty (shape {tuple(z_or_eigs.shape)}): nothing to measure")
    if z_or_eigs.ndim == 1:
        values = z_or_eigs.detach().to(torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the spectrum holds non-finite values")
        return torch.sort(values.clamp_min(0), descending=True).values
    use_center = center_by_default if center is None else center
    return (
        covariance_spectrum(z_or_eigs, pool)
        if use_center
        else second_moment_spectrum(z_or_eigs, pool)
    )


#: The dimension of a spectrum with no positive eigenvalue (module docstring).
COLLAPSED = 0.0


def _distribution(values: torch.Tensor) -> torch.Tensor | None:
    """``values / Σ values``, or ``None`` for a spectrum with no positive eigenvalue."""
    total = values.sum()
    return values / total if total > 0 else None


def rankme(
    z_or_eigs: torch.Tensor, eps: float = 1e-7, center: bool = False, pool: Pool = "flatten"
) -> float:
    """RankMe (Garrido et al. 2023): ``exp(-Σ p_k log p_k)``, ``p_k = σ_k / Σ σ + ε``.

    ``σ_k`` are the singular values of the raw (uncentred, unless ``center=True``) embedding
    matrix, obtained as ``sqrt`` of the second-moment eigenvalues (a 1-D input is taken as
    those eigenvalues). ``ε = 1e-7`` as in the paper. Ranges over ``[1, min(N, D)]``, and is
    :data:`COLLAPSED` (0) for embeddings that are all zero.

    Example:
        Three equal singular values and no others give RankMe 3 (up to ``ε``):

        >>> import torch
        >>> round(rankme(torch.tensor([4.0, 4.0, 4.0, 0.0])), 4)
        3.0
    """
    values = _spectrum(z_or_eigs, center_by_default=False, center=center, pool=pool)
    p = _distribution(values.sqrt())
    if p is None:
        return COLLAPSED
    p = p + eps
    return float(torch.exp(-(p * p.log()).sum()))


def von_neumann_entropy(
    z_or_eigs: torch.Tensor, center: bool | None = None, pool: Pool = "flatten"
) -> float:
    """Von Neumann entropy of the trace-normalised covariance, ``-Σ p_i log p_i`` in nats
    (0 for a spectrum with no positive eigenvalue)."""
    p = _distribution(_spectrum(z_or_eigs, center_by_default=True, center=center, pool=pool))
    return 0.0 if p is None else _entropy(p)


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_rank(
    z_or_eigs: torch.Tensor, center: bool | None = None, pool: Pool = "flatten"
) -> float:
    """Effective rank (Roy & Vetterli 2007) of the covariance: ``exp(H_1(p))``.

    The exponential of :func:`von_neumann_entropy`; ranges over ``[1, rank]``, and is
    :data:`COLLAPSED` (0) for a spectrum with no positive eigenvalue.
    """
    p = _distribution(_spectrum(z_or_eigs, center_by_default=True, center=center, pool=pool))
    return COLLAPSED if p is None else math.exp(_entropy(p))


def participation_ratio(
    z_or_eigs: torch.Tensor, center: bool | None = None, pool: Pool = "flatten"
) -> float:
    """Participation ratio ``(Σ λ)² / Σ λ²`` = ``exp(H_2(p))`` of the covariance spectrum."""
    values = _spectrum(z_or_eigs, center_by_default=True, center=center, pool=pool)
    p = _distribution(values)
    return COLLAPSED if p is None else float(1.0 / (p * p).sum())


def stable_rank(
    z_or_eigs: torch.Tensor, center: bool | None = None, pool: Pool = "flatten"
) -> float:
    """Stable rank ``‖Z_c‖_F² / ‖Z_c‖_2² = Σ λ / λ_max`` = ``exp(H_∞(p))``."""
    values = _spectrum(z_or_eigs, center_by_default=True, center=center, pool=pool)
    p = _distribution(values)
    return COLLAPSED if p is None else float(1.0 / p.max())


class AlphaReqFit:
    """A power-law fit ``λ_i ≈ c · i^{-α}`` of a descending spectrum (ranks from 1).

    Attributes:
        alpha: The decay exponent α.
        log_intercept: ``log c``.
        ranks: The 1-based ranks used in the fit.
    """

    def __init__(self, alpha: float, log_intercept: float, ranks: torch.Tensor) -> None:
        self.alpha = alpha
        self.log_intercept = log_intercept
        self.ranks = ranks

    def predict(self, ranks: torch.Tensor) -> torch.Tensor:
        """``c · i^{-α}`` at the given ranks."""
        ranks = torch.as_tensor(ranks, dtype=torch.float64)
        return torch.exp(self.log_intercept - self.alpha * ranks.log())


def alpha_req_fit(
    z_or_eigs: torch.Tensor,
    fit_range: tuple[int, int] = (11, 100),
    center: bool | None = None,
    pool: Pool = "flatten",
) -> AlphaReqFit:
    """Fit α of α-ReQ; see :func:`alpha_req`."""
    low, high = check_fit_range("fit_range", fit_range)
    values = _spectrum(z_or_eigs, center_by_default=True, center=center, pool=pool)
    ranks = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    keep = (ranks >= low) & (ranks <= high) & (values > 0)
    if int(keep.sum()) < 2:
        raise ValueError(
            f"fit_range={fit_range} leaves {int(keep.sum())} positive eigenvalues of "
            f"{values.numel()}: a fit needs at least 2 (lower the range or use more dimensions)"
        )
    if high > values.numel():
        warnings.warn(
            f"fit_range={fit_range} reaches past the {values.numel()} eigenvalues; fitting ranks "
            f"{low}..{values.numel()}",
            RuntimeWarning,
            stacklevel=3,
        )
    x, y, w = ranks[keep].log(), values[keep].log(), 1.0 / ranks[keep]
    # Weighted least squares of y = b - α x with weights 1/i: each decade of ranks gets
    # about equal say, as points are spaced evenly in i but the fit is in log i.
    w_sum = w.sum()
    x_mean, y_mean = (w * x).sum() / w_sum, (w * y).sum() / w_sum
    slope = (w * (x - x_mean) * (y - y_mean)).sum() / (w * (x - x_mean) ** 2).sum()
    return AlphaReqFit(
        alpha=float(-slope), log_intercept=float(y_mean - slope * x_mean), ranks=ranks[keep]
    )


def alpha_req(
    z_or_eigs: torch.Tensor,
    fit_range: tuple[int, int] = (11, 100),
    center: bool | None = None,
    pool: Pool = "flatten",
) -> float:
    """α-ReQ (Agrawal et al. 2022): the decay exponent of the covariance eigenspectrum.

    Eigenvalues of the centred covariance sorted descending, ``λ_i`` for ranks ``i`` in
    ``fit_range`` (inclusive, 1-based), fitted as ``log λ_i = log c - α log i`` by weighted
    least squares with weights ``1/i`` (Stringer et al. 2019 fit the same power law). An exact
    power law ``λ_i = i^{-α}`` returns α to rounding. Larger α means faster decay (lower
    effective dimension); α ≈ 1 is the critical value of Agrawal et al.
    """
    return alpha_req_fit(z_or_eigs, fit_range, center, pool).alpha
