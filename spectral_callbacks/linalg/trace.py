"""Stochastic trace estimators: Hutchinson, Hutch++ (Meyer, Musco, Musco & Woodruff 2021) and
Hutchinson deflated by known eigenvectors.

Probes are Rademacher vectors (entries ±1 with equal probability), so ``E[zᵀ A z] = tr(A)``
and ``Var[zᵀ A z] = 2 (‖A‖_F² - Σ_i A_ii²)``. Sums are accumulated in float64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .._checks import check_choice, check_integer
from ..settings import TRACE_METHODS, TraceMethod
from ._precision import full_precision
from .operators import SymmetricOperator

__all__ = [
    "METHODS",
    "TraceEstimate",
    "TraceMethod",
    "block_traces",
    "deflated_hutchinson",
    "estimate_trace",
    "exact_trace",
    "hutchinson",
    "hutchpp",
]

#: Estimators of :func:`estimate_trace` (:data:`~spectral_callbacks.settings.TRACE_METHODS`).
METHODS = TRACE_METHODS

#: Largest ``|VVᵀ - I|`` entry up to which :func:`deflated_hutchinson` trusts given Ritz
#: values as the trace on the span of its rows (the error is about this squared, relative).
DEFLATION_GRAM_TOLERANCE = 1e-2


@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        estimate: The estimated trace.
        stderr: Its standard error (the sample standard deviation of the Hutchinson
            quadratic forms over ``sqrt`` of their count; 0 when the trace is exact).
        num_hvps: Operator products used.
        method: ``"hutch++"``, ``"hutchinson"``, ``"deflated hutchinson"`` or ``"exact"``.
    """

    estimate: float
    stderr: float
    num_hvps: int
    method: str


def _rademacher(rows: int, operator: SymmetricOperator, generator: torch.Generator) -> torch.Tensor:
    # Drawn in the operator's dtype and mapped in place: int64 bits and their temporaries
    # took six times the probes' float32 memory, the peak of a Hutch++ estimate.
    bits = torch.randint(
        0,
        2,
        (rows, operator.size),
        generator=generator,
        dtype=operator.dtype,
        device=operator.device,
    )
    return bits.mul_(2).sub_(1)


def _apply_in_chunks(
    operator: SymmetricOperator, rows: torch.Tensor, block_size: int
) -> torch.Tensor:
    # Filled in place: a concatenation would hold every chunk's product and the result.
    products = torch.empty_like(rows)
    for begin in range(0, rows.shape[0], block_size):
        products[begin : begin + block_size] = operator.matmat(rows[begin : begin + block_size])
    return products


def _quadratic_forms(
    operator: SymmetricOperator, probes: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``zᵢᵀ A zᵢ`` for each row ``zᵢ`` of ``probes``, summed in float64.

    The entrywise products are rounded to the operator's dtype (a relative ``eps`` each, far
    inside the estimator's standard error) and accumulated in float64; float64 copies of a
    block and of its product took four times the block's float32 memory, the peak of Hutch++.
    """
    forms = [
        (chunk * operator.matmat(chunk)).sum(dim=1, dtype=torch.float64)
        for chunk in probes.split(block_size)
    ]
    return torch.cat(forms)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    mean = float(samples.mean())
    if samples.numel() < 2:
        return mean, math.inf
    return mean, float(samples.std(unbiased=True)) / math.sqrt(samples.numel())


@full_precision
def exact_trace(operator: SymmetricOperator, block_size: int = 16) -> TraceEstimate:
    """``Σ_i e_iᵀ A e_i`` with all ``n`` unit vectors (``n`` operator products)."""
    n = operator.size
    total = 0.0
    for begin in range(0, n, block_size):
        end = min(n, begin + block_size)
        basis = torch.zeros(end - begin, n, dtype=operator.dtype, device=operator.device)
        basis[torch.arange(end - begin), torch.arange(begin, end)] = 1
        products = operator.matmat(basis)
        total += float(products[torch.arange(end - begin), torch.arange(begin, end)].double().sum())
    return TraceEstimate(estimate=total, stderr=0.0, num_hvps=n, method="exact")


@full_precision
def hutchinson(
    operator: SymmetricOperator, num_hvps: int = 100, seed: int = 0, block_size: int = 16
) -> TraceEstimate:
    """Hutchinson's estimator ``(1/m) Σ zᵢᵀ A zᵢ`` with ``m = num_hvps`` Rademacher probes.

    When ``num_hvps >= n`` the exact trace is returned instead (``n`` products, zero error).
    """
    _validate(num_hvps, 1, block_size)
    if num_hvps >= operator.size:
        return exact_trace(operator, block_size)
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    forms = _quadratic_forms(operator, _rademacher(num_hvps, operator, generator), block_size)
    estimate, stderr = _mean_and_stderr(forms)
    return TraceEstimate(estimate=estimate, stderr=stderr, num_hvps=num_hvps, method="hutchinson")


@full_precision
def hutchpp(
    operator: SymmetricOperator, num_hvps: int = 99, seed: int = 0, block_size: int = 16
) -> TraceEstimate:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With ``s = num_hvps // 3``: a Rademacher sketch ``S`` (``s`` probes) gives ``Q``, an
    orthonormal basis of ``range(A S)``; then ``tr(A) = tr(Qᵀ A Q) + tr((I-QQᵀ) A (I-QQᵀ))``,
    the first term exact (``s`` products), the second by Hutchinson with the remaining
    ``g = num_hvps - 2s`` probes projected by ``I - QQᵀ``. The reported standard error is
    that of the Hutchinson part (conditional on the sketch). Needs ``num_hvps >= 3``; when
    ``num_hvps >= n`` the exact trace is returned instead.
    """
    _validate(num_hvps, 3, block_size)
    if num_hvps >= operator.size:
        return exact_trace(operator, block_size)
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    sketch_size = num_hvps // 3
    num_probes = num_hvps - 2 * sketch_size
    sketch = _apply_in_chunks(operator, _rademacher(sketch_size, operator, generator), block_size)
    # Householder QR in the operator's dtype: Q is orthonormal to that precision whatever the
    # sketch's conditioning, which is all the estimator needs (it is unbiased for any
    # orthonormal Q); a float64 QR holds float64 copies of the sketch.
    basis = torch.linalg.qr(sketch.T).Q.T
    del sketch
    top_part = float(_quadratic_forms(operator, basis, block_size).sum())
    probes = project_out(_rademacher(num_probes, operator, generator), basis, block_size)
    forms = _quadratic_forms(operator, probes, block_size)
    rest, stderr = _mean_and_stderr(forms)
    return TraceEstimate(
        estimate=top_part + rest,
        stderr=stderr,
        num_hvps=2 * sketch_size + num_probes,
        method="hutch++",
    )


@full_precision
def deflated_hutchinson(
    operator: SymmetricOperator,
    eigenvectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    num_hvps: int = 33,
    seed: int = 0,
    block_size: int = 16,
) -> TraceEstimate:
    """Hutchinson on the complement of known eigenvectors: Hutch++ with a free sketch.

    For orthonormal rows ``V`` (``k × n``) with Rayleigh quotients ``θ_i = v_iᵀ A v_i``,
    ``tr(A) = Σ_i θ_i + tr(P A P)`` with ``P = I - VᵀV``, exactly; the second term is
    estimated by Hutchinson with ``num_hvps`` Rademacher probes projected by ``P``, with
    variance at most ``2 ‖P A P‖_F² / num_hvps``. Hutch++ spends two thirds of its products
    on finding a top subspace ``Q`` and its exact trace, leaving a third for Hutchinson on
    ``(I - QQᵀ) A (I - QQᵀ)``; where ``V`` holds the top eigenvectors a solve has already
    found (a Hessian's outliers carry most of ``‖A‖_F``), every product goes to the
    Hutchinson part.

    ``eigenvectors`` are meant to be Ritz vectors of a solve and ``eigenvalues`` their Ritz
    values (Rayleigh quotients of unit rows, so ``v_iᵀ r_i = 0`` for the residuals
    ``r_i = A v_i - θ_i v_i``). The rows are orthonormalised (QR) and ``Σ_i θ_i`` is taken as
    the trace on their span: with ``G = V Vᵀ`` that trace is ``tr(V A Vᵀ G⁻¹)``, which
    differs from ``Σ_i θ_i`` by ``O(max|θ| ‖G - I‖² + max‖r_i‖ ‖G - I‖)`` (a float32 Lanczos
    basis of half a million parameters has ``‖G - I‖`` near 1e-3). Rows further from
    orthonormal than :data:`DEFLATION_GRAM_TOLERANCE` get their quotients computed instead,
    at ``k`` more products (counted in ``num_hvps``). With ``num_hvps >= n`` the exact trace
    is returned instead.
    """
    _validate(num_hvps, 2, block_size)
    if num_hvps >= operator.size:
        return exact_trace(operator, block_size)
    basis, values, extra = deflation_basis(operator, eigenvectors, eigenvalues, block_size)
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    probes = project_out(_rademacher(num_hvps, operator, generator), basis, block_size)
    forms = _quadratic_forms(operator, probes, block_size)
    return deflated_estimate(values, forms, num_hvps=num_hvps + extra)


def deflation_basis(
    operator: SymmetricOperator,
    eigenvectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Orthonormal rows spanning ``eigenvectors`` and the Rayleigh quotients on them.

    Returns ``(basis, values, products)``: the ``(k, n)`` QR basis of the rows, float64
    quotients (the given ``eigenvalues`` while the rows are within
    :data:`DEFLATION_GRAM_TOLERANCE` of orthonormal, else ``basis_iᵀ A basis_i`` computed),
    and the products that took (0 or ``k``). See :func:`deflated_hutchinson`.
    """
    rows = eigenvectors.reshape(-1, operator.size).to(operator.device, operator.dtype)
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1).cpu()
    if values.numel() != rows.shape[0]:
        raise ValueError(
            f"eigenvalues has {values.numel()} entries for {rows.shape[0]} eigenvectors"
        )
    gram = (rows @ rows.T).double()
    identity = torch.eye(rows.shape[0], dtype=torch.float64, device=gram.device)
    far = not float((gram - identity).abs().max()) <= DEFLATION_GRAM_TOLERANCE
    basis = torch.linalg.qr(rows.T).Q.T
    if not far:
        return basis, values, 0
    return basis, _quadratic_forms(operator, basis, block_size).cpu(), basis.shape[0]


def project_out(rows: torch.Tensor, basis: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """``rows (I - basisᵀ basis)`` for orthonormal ``basis`` rows, in place, block by block
    (no temporaries of the rows' whole size)."""
    for chunk in rows.split(block_size):
        chunk -= (chunk @ basis.T) @ basis
    return rows


def deflated_estimate(values: torch.Tensor, forms: torch.Tensor, num_hvps: int) -> TraceEstimate:
    """``Σ values`` plus the mean of the complement's quadratic forms, as a
    :class:`TraceEstimate` that used ``num_hvps`` products."""
    rest, stderr = _mean_and_stderr(forms)
    return TraceEstimate(
        estimate=float(values.sum()) + rest,
        stderr=stderr,
        num_hvps=num_hvps,
        method="deflated hutchinson",
    )


def estimate_trace(
    operator: SymmetricOperator,
    num_hvps: int = 99,
    method: TraceMethod = "hutch++",
    seed: int = 0,
    block_size: int = 16,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with ``method`` in ``("hutch++", "hutchinson")``."""
    estimator = hutchpp if check_choice("method", method, METHODS) == "hutch++" else hutchinson
    return estimator(operator, num_hvps, seed, block_size)


def _validate(num_hvps: int, minimum: int, block_size: int) -> None:
    check_integer("num_hvps", num_hvps, minimum=minimum)
    check_integer("block_size", block_size, minimum=1)


@full_precision
def block_traces(
    operator: SymmetricOperator,
    sizes: list[int],
    num_hvps: int = 30,
    seed: int = 0,
    block_size: int = 16,
) -> list[TraceEstimate]:
    """Traces of the diagonal blocks ``A_ll`` of consecutive index ranges of ``sizes``.

    Hutchinson's estimator restricted to each block: with Rademacher probes ``z``,
    ``E[z_lᵀ (A z)_l] = tr(A_ll)`` (cross terms have mean zero), so every probe's one product
    serves all blocks at once; each block gets its own standard error. With
    ``num_hvps >= n`` the ``n`` unit vectors give every block's trace exactly. For a Hessian
    split by layer this is HAWQ-V2's per-layer sensitivity (Dong et al. 2020).
    """
    _validate(num_hvps, 2, block_size)
    if sum(sizes) != operator.size or any(size < 1 for size in sizes):
        raise ValueError(f"sizes must be positive and sum to {operator.size}, got {sizes}")
    n = operator.size
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    if num_hvps >= n:
        diagonal = torch.empty(n, dtype=torch.float64)
        for begin in range(0, n, block_size):
            end = min(n, begin + block_size)
            basis = torch.zeros(end - begin, n, dtype=operator.dtype, device=operator.device)
            rows = torch.arange(end - begin)
            basis[rows, torch.arange(begin, end)] = 1
            diagonal[begin:end] = operator.matmat(basis)[rows, torch.arange(begin, end)].double()
        return [
            TraceEstimate(float(diagonal[a:b].sum()), 0.0, n, "exact")
            for a, b in itertools.pairwise(bounds)
        ]
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    forms = torch.empty(num_hvps, len(sizes), dtype=torch.float64)
    for begin in range(0, num_hvps, block_size):
        chunk = _rademacher(min(block_size, num_hvps - begin), operator, generator)
        weighted = (chunk * operator.matmat(chunk)).double().cpu()
        for index, (a, b) in enumerate(itertools.pairwise(bounds)):
            forms[begin : begin + chunk.shape[0], index] = weighted[:, a:b].sum(dim=1)
    estimates = []
    for index in range(len(sizes)):
        estimate, stderr = _mean_and_stderr(forms[:, index])
        estimates.append(TraceEstimate(estimate, stderr, num_hvps, "hutchinson"))
    return estimates
