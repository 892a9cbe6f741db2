"""Empirical spectral densities (ESDs) of weight matrices and convolution kernels.

A layer's ESD is the set of eigenvalues of ``Wᵀ W`` for its weight matrix ``W`` (``N × M``,
``N ≥ M`` after a transpose), that is the squared singular values ``λ_i = σ_i²``, with no
normalisation by ``N``. This is weightwatcher's convention (Martin & Mahoney), kept so that
values can be compared with it:

* A linear layer's ``out × in`` weight (also an embedding's ``vocab × d`` and a Hugging
  Face ``Conv1D``'s ``in × out``) is one matrix: ``M = min(out, in)`` eigenvalues.
* A convolution kernel ``out × in × k₁ × … `` is ``k₁ · k₂ ⋯`` matrices ``W[:, :, i, j]`` of
  ``out × in``, one per kernel position (weightwatcher's "channels last" slicing, which it
  picks for every PyTorch kernel with ``out + in ≥ k₁ + k₂``). The layer's ESD pools the
  eigenvalues of all of them (``M · k₁k₂`` values) and, as weightwatcher's default
  ``conv2d_norm=True`` scales each slice by ``1/√2``, they are multiplied by
  :data:`CONV_EIGENVALUE_SCALE` ``= 1/2``.

Singular values come from ``torch.linalg.svdvals`` on the weights' device, in float64 by
default, batched over every matrix of one shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["CONV_EIGENVALUE_SCALE", "esd", "layer_esds", "weight_matrices"]

#: Factor on a convolution's eigenvalues (weightwatcher's ``conv2d_norm``: slices × 1/√2).
CONV_EIGENVALUE_SCALE = 0.5

#: Bytes of stacked matrices one batched ``svdvals`` call may hold.
_BATCH_BYTES = 256 * 2**20


def weight_matrices(weight: torch.Tensor) -> torch.Tensor:
    """The matrices whose singular values make a layer's ESD, as one ``(S, N, M)`` tensor.

    ``S = 1`` for a 2-d weight; ``S = k₁ · k₂ ⋯`` kernel positions for a convolution kernel
    ``out × in × k₁ × …`` (slice ``s`` is ``W[:, :, i, j]``). Each matrix is transposed if
    needed so that ``N ≥ M``.

    Raises:
        ValueError: For a weight of fewer than 2 dimensions or with an empty one.
    """
    if weight.ndim < 2 or weight.numel() == 0:
        raise ValueError(
            f"a weight spectrum needs a weight of at least 2 non-empty dimensions, got shape "
            f"{tuple(weight.shape)}"
        )
    weight = weight.detach()
    matrices = weight.unsqueeze(0) if weight.ndim == 2 else weight.flatten(2).permute(2, 0, 1)
    if matrices.shape[1] < matrices.shape[2]:
        matrices = matrices.transpose(1, 2)
    return matrices


def eigenvalue_scale(weight: torch.Tensor) -> float:
    """The factor on ``σ²``: :data:`CONV_EIGENVALUE_SCALE` for a kernel, 1 for a matrix."""
    return CONV_EIGENVALUE_SCALE if weight.ndim > 2 else 1.0


def esd(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ESD of one weight: eigenvalues ``λ = scale · σ²`` of its matrices, ascending.

    Args:
        weight: A 2-d weight or a convolution kernel (module docstring for the convention).
        dtype: Precision of the SVD (float64 by default; the result has this dtype).

    Returns:
        The ``S · M`` eigenvalues, ascending, on ``weight``'s device.

    Example:
        >>> import torch
        >>> esd(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
        [1.0, 4.0, 9.0]
    """
    return layer_esds({"weight": weight}, dtype)["weight"]


def layer_esds(
    weights: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """The ESD of every weight in ``weights`` (name -> weight), computed in batches.

    Matrices of one shape and device share ``torch.linalg.svdvals`` calls of at most
    256 MiB of stacked input each, so a transformer's twelve blocks cost a handful of calls.

    Returns:
        name -> ascending eigenvalues (see :func:`esd`), in the order of ``weights``.
    """
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, weight in weights.items():
        matrices = weight_matrices(weight)
        key = (tuple(matrices.shape[1:]), matrices.device)
        groups.setdefault(key, []).append((name, matrices))
    singular: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
    for members in groups.values():
        per_matrix = members[0][1][0].numel() * torch.finfo(dtype).bits // 8
        limit = max(1, _BATCH_BYTES // per_matrix)
        queue = [(name, m) for name, stack in members for m in stack.unbind(0)]
        for start in range(0, len(queue), limit):
            chunk = queue[start : start + limit]
            values = torch.linalg.svdvals(torch.stack([m for _, m in chunk]).to(dtype))
            for (name, _), row in zip(chunk, values, strict=True):
                singular[name].append(row)
    return {
        name: (torch.cat(singular[name]).square() * eigenvalue_scale(weights[name])).sort().values
        for name in weights
    }
