"""Eigenspectra of embeddings, accumulated in float64 without holding all of them.

For embeddings ``Z ∈ R^{N×D}`` (rows are samples) two ``D × D`` matrices matter:

* the raw second moment ``M = ZᵀZ / N``, whose eigenvalues are ``σ_i² / N`` for the singular
  values ``σ_i`` of the raw ``Z`` (RankMe uses these);
* the centred covariance ``C = (Z - 1μᵀ)ᵀ(Z - 1μᵀ) / N`` with ``μ`` the mean row (α-ReQ,
  effective rank, stable rank, participation ratio and entropy use these).

:class:`CovarianceAccumulator` streams chunks of rows into float64 sums on the chunks'
device, so ``N × D`` is never held; the all-at-once functions below feed one chunk through
the same code, so both give the same numbers up to summation order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch

__all__ = [
    "LAYOUTS",
    "CovarianceAccumulator",
    "Layout",
    "as_embedding_matrix",
    "covariance_spectrum",
    "second_moment_spectrum",
]

Pool = str | Callable[[torch.Tensor], torch.Tensor]
POOLS = ("flatten", "mean")
#: Where the feature axis of a ``(B, …)`` tensor is: last (tokens ``(B, T, D)``) or second
#: (convolutions ``(N, C, H, W)``).
Layout = Literal["channels_last", "channels_first"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def as_embedding_matrix(
    features: torch.Tensor,
    pool: Pool = "flatten",
    layout: Layout = "channels_last",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn layer outputs into an ``(N, D)`` matrix of embeddings.

    ``(N, D)`` is returned as is. A tensor of more dimensions has a batch axis first and one
    feature axis, the last (``layout="channels_last"``: tokens ``(B, T, D)``, the default)
    or the second (``layout="channels_first"``: a convolution's ``(N, C, H, W)`` or
    ``(N, C, L)``, whose ``C`` channels are the features); the other axes are positions.
    ``pool="flatten"`` (default) treats every position as a sample, ``(B·T·…, D)``;
    ``pool="mean"`` averages over positions, ``(B, D)``; a callable receives the tensor with
    the features last, ``(B, T, …, D)``, and returns ``(B, D)`` itself.

    ``mask`` (booleans, or 0/1, of the shape of the positions: the features' shape without
    the feature axis, ``(B, T)`` for tokens, ``(N,)`` for rows) keeps only the positions
    where it is true, as padding is left out: the rows ``"flatten"`` gives, the terms of
    ``"mean"`` (a sample with none left gives no row). A callable ``pool`` takes no mask.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not callable(pool) and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} or a callable, got {pool!r}")
    if features.ndim == 1:
        raise ValueError("embeddings must have a feature dimension: got a 1-D tensor")
    if features.is_complex():
        raise ValueError(
            "embeddings are complex; the spectra are defined for real embeddings: pass "
            "torch.view_as_real(z).flatten(-2) (real and imaginary parts as features) or z.abs()"
        )
    if layout == "channels_first" and features.ndim > 2:
        features = features.movedim(1, -1)
    if mask is not None:
        return _masked_rows(features, pool, mask)
    if callable(pool):
        features = pool(features)
    elif features.ndim > 2 and pool == "mean":
        features = features.reshape(features.shape[0], -1, features.shape[-1]).mean(dim=1)
    return features.reshape(-1, features.shape[-1])


def _masked_rows(features: torch.Tensor, pool: Pool, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``features`` (features last) at the positions ``mask`` keeps."""
    if callable(pool):
        raise ValueError("a mask does not combine with a callable pool: mask inside the pool")
    positions = tuple(features.shape[:-1])
    if tuple(mask.shape) != positions:
        raise ValueError(
            f"the mask has shape {tuple(mask.shape)}, the positions of the features "
            f"{tuple(features.shape)} have {positions} (the shape without the feature axis)"
        )
    keep = mask.to(device=features.device, dtype=torch.bool)
    if features.ndim == 2 or pool == "flatten":
        return features[keep]
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    keep = keep.reshape(features.shape[0], -1)
    counts = keep.sum(dim=1)
    sums = (flat * keep.unsqueeze(-1).to(flat.dtype)).sum(dim=1)
    return sums[counts > 0] / counts[counts > 0].unsqueeze(-1).to(flat.dtype)


class CovarianceAccumulator:
    """Streaming float64 first and second moments of rows, and their eigenspectra.

    Rows are shifted by a reference point (the mean of the first chunk) before accumulation,
    so centring does not cancel catastrophically when the mean is large against the spread.

    Args:
        dim: Embedding dimension ``D`` (taken from the first chunk when ``None``).
        device: Where the sums live (default: the first chunk's device).
    """

    def __init__(self, dim: int | None = None, device: torch.device | None = None) -> None:
        self.dim = dim
        self.device = device
        self.count = 0
        self._reference: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._warned = False

    def update(self, rows: torch.Tensor) -> None:
        """Add a chunk of rows ``(n, D)``."""
        if rows.ndim != 2:
            raise ValueError(f"rows must be (n, D), got shape {tuple(rows.shape)}")
        if rows.is_complex():
            raise ValueError("rows are complex; the accumulator holds real embeddings")
        if self.dim is None:
            self.dim = rows.shape[1]
        if rows.shape[1] != self.dim:
            raise ValueError(f"rows have dimension {rows.shape[1]}, expected {self.dim}")
        if rows.shape[0] == 0:
            return
        device = self.device or rows.device
        rows = rows.detach().to(device=device, dtype=torch.float64)
        if self._reference is None:
            self._reference = rows.mean(dim=0)
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        shifted = rows - self._reference
        self._sum += shifted.sum(dim=0)
        self._outer += shifted.T @ shifted
        self.count += rows.shape[0]

    def all_reduce(self) -> None:
        """Merge the sums of every ``torch.distributed`` process: each then holds the moments
        of the union of all processes' rows (a no-op without a group of several processes).

        Each process's sums are first rebased to one common reference point (the
        count-weighted mean of the processes' references), so the merge keeps the
        cancellation-free centring.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        self._require_data()
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self._sum.device)
        weighted_reference = self._reference * count
        dist.all_reduce(count)
        dist.all_reduce(weighted_reference)
        common = weighted_reference / count
        delta = self._reference - common
        n = float(self.count)
        rebased_sum = self._sum + n * delta
        rebased_outer = (
            self._outer
            + torch.outer(delta, self._sum)
            + torch.outer(self._sum, delta)
            + n * torch.outer(delta, delta)
        )
        dist.all_reduce(rebased_sum)
        dist.all_reduce(rebased_outer)
        self._reference, self._sum, self._outer = common, rebased_sum, rebased_outer
        self.count = round(float(count))

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no rows were accumulated")

    def covariance(self) -> torch.Tensor:
        """``C = Σ (z - μ)(z - μ)ᵀ / N`` in float64."""
        self._require_data()
        mean_shift = self._sum / self.count
        cov = self._outer / self.count - torch.outer(mean_shift, mean_shift)
        return 0.5 * (cov + cov.T)

    def second_moment(self) -> torch.Tensor:
        """``M = Σ z zᵀ / N`` (uncentred) in float64."""
        self._require_data()
        r = self._reference
        moment = (
            self._outer / self.count
            + torch.outer(r, self._sum / self.count)
            + torch.outer(self._sum / self.count, r)
            + torch.outer(r, r)
        )
        return 0.5 * (moment + moment.T)

    def _spectrum(self, matrix: torch.Tensor, centred: bool) -> torch.Tensor:
        """Descending eigenvalues; ``FloatingPointError`` for non-finite embeddings (or an
        eigensolver failure), which the monitors log as NaN."""
        if not bool(torch.isfinite(matrix).all()):
            raise FloatingPointError("the embeddings hold NaN or infinite values")
        try:
            values = torch.linalg.eigvalsh(matrix).flip(0).clamp_min(0)
        except torch.linalg.LinAlgError as error:
            raise FloatingPointError(f"eigvalsh failed: {error}") from error
        # Below D ε tr(ZᵀZ/N) an eigenvalue is rounding (the covariance cancels the mean out
        # of the second moment): zero, so equal embeddings have no dimension, not noise's.
        floor = self.dim * torch.finfo(torch.float64).eps * self.second_moment().trace()
        values[values <= floor] = 0.0
        rank_cap = self.count - 1 if centred else self.count
        if rank_cap < self.dim:
            if not self._warned:
                warnings.warn(
                    f"{self.count} samples for {self.dim} dimensions: the spectrum has at most "
                    f"{max(rank_cap, 0)} non-zero eigenvalues, so rank measures are capped at "
                    f"min(N, D); use more probe samples for a meaningful value",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned = True
            values[max(rank_cap, 0) :] = 0.0
        return values

    def covariance_spectrum(self) -> torch.Tensor:
        """Eigenvalues of the centred covariance, descending, float64, on the sums' device."""
        return self._spectrum(self.covariance(), centred=True)

    def second_moment_spectrum(self) -> torch.Tensor:
        """Eigenvalues of the raw second moment (``σ_i² / N`` of raw ``Z``), descending."""
        return self._spectrum(self.second_moment(), centred=False)


def covariance_spectrum(
    embeddings: torch.Tensor, pool: Pool = "flatten", layout: Layout = "channels_last"
) -> torch.Tensor:
    """Descending float64 eigenvalues of the centred covariance of ``embeddings``
    (rows by :func:`as_embedding_matrix`)."""
    accumulator = CovarianceAccumulator()
    accumulator.update(as_embedding_matrix(embeddings, pool, layout))
    return accumulator.covariance_spectrum()


def second_moment_spectrum(
    embeddings: torch.Tensor, pool: Pool = "flatten", layout: Layout = "channels_last"
) -> torch.Tensor:
    """Descending float64 eigenvalues of ``ZᵀZ / N`` (squared singular values of raw Z over N;
    rows by :func:`as_embedding_matrix`)."""
    accumulator = CovarianceAccumulator()
    accumulator.update(as_embedding_matrix(embeddings, pool, layout))
    return accumulator.second_moment_spectrum()
