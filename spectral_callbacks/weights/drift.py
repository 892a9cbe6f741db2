"""How far a layer's principal singular subspaces turned, and its singular values moved.

Fine-tuning methods differ less in a layer's spectrum than in how far they rotate its
principal singular subspaces ("The Path Not Taken: RLVR Provably Learns Off the Principals",
2025): this measures both against a reference weight (the first measurement, or a given
state dict). A weight is read as the matrix ``out × (in · k₁ ⋯)`` (a kernel flattened over
its inputs), so its left singular vectors live in the output space and its right ones in the
input space. A reference is kept as its top-``r`` singular vectors and all its singular
values (:class:`SingularBasis`), not as a copy of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg.subspace import principal_angles

__all__ = [
    "DRIFT_METRICS",
    "SingularBasis",
    "SubspaceDrift",
    "singular_basis",
    "singular_subspace_drift",
]

#: The metrics of :class:`SubspaceDrift` that the monitor logs.
DRIFT_METRICS = ("left_subspace_angle", "right_subspace_angle", "singular_value_change")


@dataclass(frozen=True)
class SingularBasis:
    """The top-``r`` singular vectors and all singular values of one weight (float64, CPU).

    Attributes:
        left: ``(r, out)`` left singular vectors, as rows.
        right: ``(r, in · k)`` right singular vectors, as rows.
        values: All singular values, descending.
    """

    left: torch.Tensor
    right: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class SubspaceDrift:
    """Drift of one weight from its reference.

    Attributes:
        left_subspace_angle: The largest principal angle (radians) between the spans of the
            top-``r`` left singular vectors now and at the reference.
        right_subspace_angle: The same for the right singular vectors.
        singular_value_change: ``‖σ − σ_ref‖₂ / ‖σ_ref‖₂`` over all singular values (NaN for
            a zero reference).
    """

    left_subspace_angle: float
    right_subspace_angle: float
    singular_value_change: float


def singular_basis(weight: torch.Tensor, rank: int = 10) -> SingularBasis:
    """The top-``rank`` singular vectors (``rank`` capped at the matrix's smaller dimension)
    and all singular values of ``weight`` read as ``out × (in · k)``, by a float64 SVD on the
    weight's device."""
    if weight.ndim < 2:
        raise ValueError(f"a weight of at least 2 dimensions is needed, got {tuple(weight.shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    return SingularBasis(u[:, :rank].T.cpu(), vh[:rank].cpu(), s.cpu())


def singular_subspace_drift(
    weight: torch.Tensor | SingularBasis,
    reference: torch.Tensor | SingularBasis,
    rank: int = 10,
) -> SubspaceDrift:
    """Principal angles between the top-``rank`` singular subspaces of ``weight`` and
    ``reference``, and the relative change of the singular values.

    Args:
        weight: The weight now, or its :func:`singular_basis`.
        reference: The weight to compare with (same shape), or its :func:`singular_basis`.
        rank: Singular vectors per subspace, for arguments given as weights (a basis brings
            its own; the smaller of the two ranks is used).

    Raises:
        ValueError: For shapes that differ.

    Example:
        >>> import torch
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> drift = singular_subspace_drift(2 * w, w, rank=2)
        >>> round(drift.left_subspace_angle, 6), drift.singular_value_change
        (0.0, 1.0)
    """
    now = weight if isinstance(weight, SingularBasis) else singular_basis(weight, rank)
    then = reference if isinstance(reference, SingularBasis) else singular_basis(reference, rank)
    if now.left.shape[1] != then.left.shape[1] or now.right.shape[1] != then.right.shape[1]:
        raise ValueError(
            f"weight and reference differ in shape: {now.left.shape[1]} x {now.right.shape[1]} "
            f"and {then.left.shape[1]} x {then.right.shape[1]}"
        )
    r = min(now.left.shape[0], then.left.shape[0])
    reference_norm = float(then.values.norm())
    change = (
        float((now.values - then.values).norm()) / reference_norm
        if reference_norm > 0
        else float("nan")
    )
    return SubspaceDrift(
        left_subspace_angle=float(principal_angles(now.left[:r], then.left[:r]).max()),
        right_subspace_angle=float(principal_angles(now.right[:r], then.right[:r]).max()),
        singular_value_change=change,
    )
