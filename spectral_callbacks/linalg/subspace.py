"""How a vector sits in a subspace, and how two subspaces sit to each other.

Subspaces are given by ``(k, n)`` rows (the Ritz vectors of an eigensolver); they are
orthonormalised here in float64, so near-orthonormal Ritz vectors give exact answers.
"""

from __future__ import annotations

import math

import torch

__all__ = ["principal_angles", "subspace_fraction", "subspace_overlap"]


def _orthonormal(rows: torch.Tensor) -> torch.Tensor:
    if rows.ndim == 1:
        rows = rows.unsqueeze(0)
    q, _ = torch.linalg.qr(rows.to(torch.float64).T)
    return q.T


def subspace_fraction(rows: torch.Tensor, vector: torch.Tensor) -> float:
    """``‖P v‖² / ‖v‖²``: the fraction of ``vector``'s squared norm in the span of ``rows``.

    With the top-``k`` Hessian eigenvectors as ``rows`` and the gradient as ``vector`` this is
    the *gradient overlap* of Gur-Ari et al. (2018), ``‖V_kᵀ g‖² / ‖g‖²``, which they found
    close to 1 for ``k`` the number of classes: gradient descent happens in a tiny subspace.
    NaN for a zero vector.

    Example:
        >>> import torch
        >>> plane = torch.eye(3)[:2]                   # the span of e₁ and e₂
        >>> subspace_fraction(plane, torch.tensor([3.0, 0.0, 4.0]))
        0.36
    """
    v = vector.reshape(-1).to(device=rows.device, dtype=torch.float64)
    norm = float(v.pow(2).sum())
    if norm == 0.0:
        return math.nan
    q = _orthonormal(rows)
    return float((q @ v).pow(2).sum()) / norm


def principal_angles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of two ``(k, n)`` row sets:
    ``arccos`` of the singular values of ``Q₁ Q₂ᵀ``, float64 on the CPU.

    Example:
        >>> import math, torch
        >>> turned = torch.tensor([[math.cos(0.3), math.sin(0.3), 0.0]])
        >>> principal_angles(torch.eye(3)[:1], turned).tolist()  # doctest: +ELLIPSIS
        [0.3000...]
    """
    q1, q2 = _orthonormal(first), _orthonormal(second.to(first.device))
    cosines = torch.linalg.svdvals(q1 @ q2.T).clamp(0.0, 1.0)
    return torch.arccos(cosines).cpu()


def subspace_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """``‖Q₁ Q₂ᵀ‖_F² / k``: 1 for one subspace, 0 for orthogonal ones, ``k/n`` on average for
    random ones (``k`` the larger of the two dimensions). Between the top-``k`` eigenspaces of
    consecutive measurements it says how far the sharp directions rotated."""
    q1, q2 = _orthonormal(first), _orthonormal(second.to(first.device))
    return float((q1 @ q2.T).pow(2).sum()) / max(q1.shape[0], q2.shape[0])
