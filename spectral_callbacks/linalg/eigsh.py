"""Matrix-free symmetric eigensolvers: Lanczos and block Lanczos with full reorthogonalisation.

Both solvers find ``k`` eigenpairs of a :class:`~spectral_callbacks.linalg.SymmetricOperator`
selected by ``which``:

* ``"LA"``: the largest algebraic eigenvalues, returned in descending order;
* ``"SA"``: the smallest algebraic eigenvalues, ascending;
* ``"LM"``: the largest in magnitude, by descending ``|λ|``.

Convergence is judged by a bound on the eigenvalue error. A Ritz pair ``(θ_i, y_i)`` from an
``m``-step Krylov basis has the residual ``r_i = ‖A y_i - θ_i y_i‖ = |β_m s_{m,i}|``
(``s_{m,i}`` the last component of the ``i``-th eigenvector of the projected matrix), so
some eigenvalue lies within ``r_i`` of ``θ_i``. Where the neighbouring Ritz values, widened by
their own residuals, leave a gap ``δ_i`` around ``θ_i``, the Kato–Temple inequality bounds the
error of the eigenvalue it approximates by ``r_i² / δ_i``, which is far smaller once
``r_i ≪ δ_i``. The gap is used for the extreme Ritz values (λ_max, λ_min, the largest
``|λ|``), where Lanczos converges first, and only once the next Ritz value is resolved (its
residual at most a quarter of its value and of its distance): before that it averages a
region of the spectrum and the next eigenvalue can sit above its interval, unseen (on a
CNN's Hessian, two steps into a warm solve, the next Ritz value was 0.02 and the next
eigenvalue 8.3). Interior Ritz values keep the residual bound. The error
bound is ``e_i = max(min(r_i, r_i² / δ_i), f)``, with ``f`` the error the products
themselves carry (:func:`product_error_floor`), and the pair is converged when
``e_i ≤ tol · |θ_i|``. Like the residual rule it assumes the Krylov space has met every
eigenvalue beyond the wanted ones (a start with no component along an eigenvector never
sees it; warm starts are mixed with a random vector for that reason); clusters give small
gaps, and the bound falls back to the residual. A pair whose ``tol · |θ_i|`` is below ``f``
can never converge (:func:`unresolvable_pairs`): once every unconverged pair is such a pair,
at ``e_i = f``, with a value that moved by at most ``f`` since the previous check, the solve
stops (:meth:`_RitzPairs.stalled_since`) rather than spend its budget on a bound that cannot
fall. For ``"LM"`` a wanted pair also waits for the end of the spectrum it does not hold,
which may still outrank it (:func:`outranked_pairs`). The projected matrix and its
eigendecomposition are float64, on the host, and are formed only at a convergence check;
the steps in between run on the operator's device without host synchronisation.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .._checks import check_bool, check_number
from ..settings import EIGEN_METHODS, WHICH, Criterion, EigenMethod, EigenSettings, Which
from ._krylov import BlockLanczos, IndependentLanczos
from ._precision import full_precision
from .operators import SymmetricOperator

__all__ = [
    "EIGEN_METHODS",
    "KRYLOV_BASIS_BYTES",
    "WHICH",
    "EigenMethod",
    "EigenResult",
    "Which",
    "basis_bound",
    "block_lanczos",
    "eigenpairs",
    "eigensolve",
    "lanczos",
]

logger = logging.getLogger("spectral_callbacks")


@dataclass
class EigenResult:
    """Eigenpairs found by a Krylov solver.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the CPU, ordered by ``which``.
        residuals: ``(k,)`` float64 Ritz residual norms ``‖A y - θ y‖``, same order.
        converged: ``(k,)`` bool, ``errors <= tol * |eigenvalues|``.
        errors: ``(k,)`` float64 bounds on the eigenvalue errors (module docstring), or
            ``None`` where a solver states none.
        num_hvps: Operator products used (one per vector: a block step of ``p`` counts ``p``).
        num_iterations: Krylov steps taken (block steps for the block solver).
        eigenvectors: ``(k, n)`` unit Ritz vectors as rows on the operator's device, in its
            dtype, or ``None`` unless requested.
        method: ``"lanczos"`` or ``"block_lanczos"``.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_hvps: int
    num_iterations: int
    eigenvectors: torch.Tensor | None = None
    method: EigenMethod = "lanczos"
    errors: torch.Tensor | None = None

    @property
    def all_converged(self) -> bool:
        """Whether every requested eigenpair met the tolerance."""
        return bool(self.converged.all())


def select_ritz(values: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the ``k`` wanted values of ``values`` (ascending input), ordered by ``which``."""
    if which == "LA":
        order = torch.argsort(values, descending=True)
    elif which == "SA":
        order = torch.argsort(values)
    else:
        order = torch.argsort(values.abs(), descending=True)
    return order[:k]


#: Weight of the random unit vector added to a warm start (the unit sum of the previous
#: eigenvectors). A direction absent from the previous eigenvectors, such as an eigenvalue
#: that has overtaken the previous top one(s), has almost no component in them, so a pure
#: warm start finds it late or never: a residual-converged solve then reports the old
#: direction's value. With the random part it enters the Krylov space as in a cold start,
#: at a cost of a few products (docs/benchmarks.md has the measurements).
WARM_START_MIXING = 1.0


#: Bytes the single-vector Lanczos basis may take by default. A basis that would grow past
#: it is bounded (thick restart, see :func:`lanczos`) to as many vectors as fit, but never
#: fewer than :func:`minimum_default_basis`; a bound costs a few more products than an
#: unbounded basis (docs/benchmarks.md).
KRYLOV_BASIS_BYTES = 2**30


def minimum_default_basis(k: int) -> int:
    """Fewest vectors a default bound keeps: ``max(16, 2k + 12)`` (top-1: 16, top-10: 32)."""
    return max(16, 2 * k + 12)


def basis_bound(
    max_basis: int | None, k: int, operator: SymmetricOperator, max_steps: int
) -> int | None:
    """The bound :func:`lanczos` puts on its basis: ``None`` when the basis needs none.

    An explicit ``max_basis`` was checked by
    :class:`~spectral_callbacks.settings.EigenSettings`. ``None`` picks the default: no
    bound while the ``max_steps + 1`` vectors of an unbounded solve fit in
    :data:`KRYLOV_BASIS_BYTES`, otherwise as many vectors as fit there, at least
    :func:`minimum_default_basis` (which is never below the least ``max_basis`` allows).
    """
    if max_basis is None:
        itemsize = torch.empty((), dtype=operator.dtype).element_size()
        fits = KRYLOV_BASIS_BYTES // (operator.size * itemsize)
        max_basis = max(fits, minimum_default_basis(k))
    return max_basis if max_basis <= max_steps else None


def default_max_iter(k: int, size: int | None = None) -> int:
    """Default product budget: generous, because a capped solver returns wrong values.

    ``max(100, 20k)``, capped at the dimension ``size`` when given (an unrestarted Krylov
    space cannot grow past it).
    """
    budget = max(100, 20 * k)
    return budget if size is None else min(size, budget)


class _CheckSchedule:
    """When to check convergence: after ``first`` steps, then where convergence is predicted.

    Each check reports how far the worst wanted pair is from converged,
    ``w = max_i r_i / (tol·|θ_i|)`` (``w ≤ 1``: converged). Residuals of Lanczos fall
    roughly geometrically, so from the last two checks the rate per step is
    ``ρ = (w₂/w₁)^(1/Δm)`` and the next check goes ``⌊log w₂ / -log ρ⌋`` steps ahead, clamped
    to ``[1, every]``: far from convergence checks are sparse (few host synchronisations),
    near it they land on the step that converges instead of up to ``every - 1`` steps
    later. Without a falling rate (one check so far, or a stall) the gap grows 1, 1, 2, 2, …
    up to ``every``, so a warm-started solve is checked after each of its first steps.
    """

    def __init__(self, first: int, every: int, last: int) -> None:
        self.every = max(1, every)
        self.last = last
        self.next = min(max(1, first), last)
        self.count = 0
        self._previous: tuple[int, float] | None = None

    def due(self, step: int) -> bool:
        return step >= self.next

    def checked(self, step: int, worst: float) -> None:
        """Record the check at ``step`` with distance ``worst`` and schedule the next one."""
        self.count += 1
        gap = min(self.every, 1 + self.count // 2)
        previous, self._previous = self._previous, (step, worst)
        rate = 1.0
        if previous is not None and math.isfinite(worst) and 1.0 < worst < previous[1]:
            rate = (worst / previous[1]) ** (1.0 / (step - previous[0]))
        if rate < 1.0:
            # Rounded down: Lanczos converges faster than geometrically, and a check costs
            # less than the Hessian-vector product an overshoot would.
            predicted = math.log(worst) / -math.log(rate)
            gap = max(1, min(self.every, math.floor(predicted)))
        self.next = min(step + gap, self.last)


def _worst_ratio(errors: torch.Tensor, values: torch.Tensor, tol: float) -> float:
    """``max_i e_i / (tol·|θ_i|)``: at most 1 when every wanted pair has converged."""
    return float((errors / (tol * values.abs()).clamp_min(torch.finfo(values.dtype).tiny)).max())


#: No eigenvalue error bound goes below this many unit roundoffs of the products (times the
#: operator's scale). The bounds are those of the operator as its products compute it: the
#: rounding of the passes through a deep float32 model can move its eigenvalues by more
#: (2.6e-5 relative on a CNN with BatchNorm), which only float64 products avoid.
PRODUCT_ERROR_ROUNDOFFS = 10.0
#: The next Ritz value certifies a gap only when its residual is at most this share of its
#: own size and of its distance to the extreme one (:func:`error_bounds`).
RESOLVED_NEIGHBOUR = 0.25


def product_error_floor(operator: SymmetricOperator, scale: float) -> float:
    """The eigenvalue error the products alone can cause: ``max(10 u, δ) · scale`` for unit
    roundoff ``u`` of the products' dtype, their stated relative error ``δ`` (gradient
    differences) and the operator's ``scale`` (its largest ``|θ|``); a perturbation ``E`` of
    the operator moves its eigenvalues by at most ``‖E‖``."""
    stated = float(getattr(operator, "product_relative_error", 0.0))
    return max(PRODUCT_ERROR_ROUNDOFFS * product_roundoff(operator), stated) * scale


def error_bounds(
    values: torch.Tensor,
    residuals: torch.Tensor,
    index: torch.Tensor,
    floor: float,
    criterion: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``e_i`` on the eigenvalue errors of the Ritz values ``values[index]`` and the
    gaps ``δ_i`` they used (module docstring).

    ``values`` are all Ritz values, ascending, and ``residuals`` theirs. For the largest and
    the smallest Ritz value ``δ_i`` is the distance to the residual interval
    ``[θ_j - r_j, θ_j + r_j]`` of the next one inward, once that one is resolved
    (``r_j ≤ ρ min(|θ_j|, |θ_i - θ_j|)``, ``ρ =`` :data:`RESOLVED_NEIGHBOUR`); interior Ritz
    values, a single one and an unresolved neighbour give no gap, ``δ_i = -∞``, and so does
    every value with ``criterion="residual"``;
    ``e_i = max(min(r_i, r_i²/δ_i), floor)`` where ``δ_i > 0``, else ``max(r_i, floor)``.
    """
    m = values.shape[0]
    gaps = torch.full((index.shape[0],), -math.inf, dtype=values.dtype)
    if m < 2 or criterion == "residual":  # a single Ritz value has no neighbour for a gap
        return residuals[index].clamp_min(floor), gaps
    for slot, position in enumerate(index.tolist()):
        # Only the extreme Ritz values: Lanczos resolves a spectrum's ends first, so an
        # eigenvalue the Krylov space has not met yet hides more likely beside an interior
        # Ritz value, where the gap would then be wrong (the residual bound stands there).
        # The neighbour's interval bounds the next eigenvalue only once that neighbour is
        # resolved itself: early in a solve it averages a whole region of the spectrum (its
        # residual is large next to its distance to the extreme value) while the next
        # eigenvalue sits above its interval, unseen.
        if position in (0, m - 1):
            neighbour = 1 if position == 0 else m - 2
            spread = (values[position] - values[neighbour]).abs()
            scale = torch.minimum(spread, values[neighbour].abs())
            if residuals[neighbour] <= RESOLVED_NEIGHBOUR * scale:
                gaps[slot] = spread - residuals[neighbour]
    r = residuals[index]
    certified = gaps > 0
    kato_temple = torch.where(certified, r * r / torch.where(certified, gaps, 1.0), r)
    return torch.minimum(r, kato_temple).clamp_min(floor), gaps


#: Ritz residuals read off the projected matrix do not see the rounding of the products
#: (nor a loss of orthogonality): below about this many unit roundoffs of the products'
#: dtype, times the operator's scale, a claimed residual is confirmed with fresh products.
CONFIRM_BELOW_ROUNDOFFS = 1000.0
#: ... and below this many times an operator's stated ``product_relative_error`` (products
#: from finite differences of gradients).
CONFIRM_BELOW_ERRORS = 100.0
#: Below this many unit roundoffs of the operator's scale an eigenvalue is zero to the
#: products' precision (see :func:`confirm_ritz_pairs`).
ZERO_ROUNDOFFS = 100.0


def product_roundoff(operator: SymmetricOperator) -> float:
    """Unit roundoff of the dtype the operator's products are computed in
    (``operator.product_dtype`` where it says, else its vectors' dtype)."""
    return float(torch.finfo(getattr(operator, "product_dtype", operator.dtype)).eps) / 2


def rounding_floor(operator: SymmetricOperator, scale: float) -> float:
    """The residual below which a Ritz residual needs a fresh product to be believed:
    :data:`CONFIRM_BELOW_ROUNDOFFS` unit roundoffs of the products, or
    :data:`CONFIRM_BELOW_ERRORS` times their stated relative error, times the operator's
    ``scale`` (its largest ``|θ|`` seen)."""
    stated = float(getattr(operator, "product_relative_error", 0.0))
    relative = max(
        CONFIRM_BELOW_ROUNDOFFS * product_roundoff(operator), CONFIRM_BELOW_ERRORS * stated
    )
    return relative * scale


def converged_pairs(
    operator: SymmetricOperator,
    values: torch.Tensor,
    errors: torch.Tensor,
    residuals: torch.Tensor,
    tol: float,
    scale: float,
) -> torch.Tensor:
    """Which pairs are converged: ``e_i <= tol · |θ_i|``, or, where a relative tolerance is not
    resolvable (``|θ_i|`` zero to the products' precision), ``|θ_i|`` and ``r_i`` both below
    ``z =`` :data:`ZERO_ROUNDOFFS` unit roundoffs times ``scale``, when ``z <= tol · scale``
    (never for 16-bit products at a useful ``tol``)."""
    converged = errors <= tol * values.abs()
    zero = _zero_level(operator, tol, scale)
    if zero is not None:
        converged |= (values.abs() <= zero) & (residuals <= zero)
    return converged


def _zero_level(operator: SymmetricOperator, tol: float, scale: float) -> float | None:
    """``z`` of :func:`converged_pairs`, or ``None`` where it exceeds ``tol · scale``."""
    zero = ZERO_ROUNDOFFS * product_roundoff(operator) * scale
    return zero if zero <= tol * scale else None


def outranked_pairs(
    operator: SymmetricOperator,
    settings: EigenSettings,
    values: torch.Tensor,
    all_residuals: torch.Tensor,
    index: torch.Tensor,
    floor: float,
    scale: float,
) -> torch.Tensor:
    """For ``which="LM"``: which wanted pairs ``index`` of the Ritz values ``values``
    (ascending, with residuals ``all_residuals``; largest ``|θ|`` ``scale``) an unconverged
    end of the spectrum may still outrank.

    Either end of a spectrum may hold the largest ``|λ|``, and Lanczos resolves both ends
    first. While the end Ritz value ``θ_j`` that is not wanted has not converged itself
    (:func:`converged_pairs`), the eigenvalue it approaches lies within its error bound
    ``e_j`` (:func:`error_bounds`, at least ``floor``) and may be the larger in magnitude:
    a wanted ``θ_i`` with ``|θ_i| < |θ_j| + e_j`` is not yet known to be among the largest.
    """
    outranked = torch.zeros(index.shape[0], dtype=torch.bool)
    for end in sorted({0, values.shape[0] - 1} - set(index.tolist())):
        position = torch.tensor([end])
        error, _ = error_bounds(values, all_residuals, position, floor, settings.criterion)
        value, residual = values[position], all_residuals[position]
        if bool(converged_pairs(operator, value, error, residual, settings.tol, scale)):
            continue
        outranked |= values[index].abs() < value.abs() + error
    return outranked


def unresolvable_pairs(
    operator: SymmetricOperator, values: torch.Tensor, tol: float, scale: float
) -> torch.Tensor:
    """Which pairs no number of products can converge: ``tol · |θ_i|`` below the products'
    floor (:func:`product_error_floor`, which every bound is at least) and ``θ_i`` not a
    zero that :func:`converged_pairs` may still accept (16-bit products, a ``tol`` below
    the products' error, gradient differences whose error along a vector exceeds it)."""
    unreachable = tol * values.abs() < product_error_floor(operator, scale)
    zero = _zero_level(operator, tol, scale)
    if zero is not None:
        unreachable &= values.abs() > zero
    return unreachable


def needs_confirmation(
    operator: SymmetricOperator,
    values: torch.Tensor,
    converged: torch.Tensor,
    tol: float,
    scale: float,
) -> bool:
    """Whether a pair claimed converged has ``tol · |θ|`` below :func:`rounding_floor`: a
    claim that rests on residuals too small for the projected matrix to be believed."""
    if not bool(converged.any()):
        return False
    return bool((tol * values[converged].abs() < rounding_floor(operator, scale)).any())


def confirm_ritz_pairs(
    operator: SymmetricOperator,
    vectors: torch.Tensor,
    tol: float,
    which: str,
    scale: float,
    gaps: torch.Tensor | None = None,
    outranked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh quotients, true residuals, error bounds and convergence of unit Ritz vectors
    ``(k, n)`` (with the ``gaps`` of :func:`error_bounds` and the :func:`outranked_pairs`,
    which stay unconverged, in the vectors' order).

    One fresh product per vector: ``θ_i = y_iᵀ A y_i / y_iᵀ y_i`` and
    ``r_i = ‖A y_i - θ_i y_i‖ / ‖y_i‖``, reduced in float64, so the residual includes the
    rounding of the product itself; the error bound is recomputed from it. A pair is
    converged when its bound is at most ``tol · |θ_i|``: no solve claims a tolerance its
    products cannot resolve. No relative tolerance is resolvable
    for an eigenvalue that is zero to the products' precision: one with ``|θ_i|`` and
    ``r_i`` both below ``z =`` :data:`ZERO_ROUNDOFFS` unit roundoffs times the operator's
    ``scale`` (its largest ``|θ|``) counts as converged, where ``z <= tol · scale`` (never
    for 16-bit products at a useful ``tol``). Returns the values, residuals, flags, vectors
    and error bounds ordered by ``which``.
    """
    products = operator.matmat(vectors).to(torch.float64)
    exact = vectors.to(torch.float64)
    norms = exact.norm(dim=1)
    values = (exact * products).sum(dim=1) / norms**2
    residuals = (products - values.unsqueeze(1) * exact).norm(dim=1) / norms
    values, residuals = values.cpu(), residuals.cpu()
    order = select_ritz(values, values.shape[0], which)
    values, residuals = values[order], residuals[order]
    # An eigenvalue within the rounding floor of the operator's scale is zero to the
    # products' precision: no relative tolerance is resolvable for it, and a residual at
    # that floor is as converged as the products can tell.
    scale = max(scale, float(values.abs().max()))
    floor = product_error_floor(operator, scale)
    errors = residuals.clamp_min(floor)
    if gaps is not None:
        gap = gaps[order]
        certified = gap > 0
        kato_temple = torch.where(certified, residuals**2 / torch.where(certified, gap, 1.0), 1.0)
        errors = torch.where(certified, torch.minimum(residuals, kato_temple), residuals)
        errors = errors.clamp_min(floor)
    converged = converged_pairs(operator, values, errors, residuals, tol, scale)
    if outranked is not None:
        converged &= ~outranked[order]
    return values, residuals, converged, vectors[order.to(vectors.device)], errors


@dataclass
class _RitzPairs:
    """The last check of a Krylov solve: every Ritz value of the projected matrix (ascending)
    and its eigenvectors, the wanted ``index`` among them, their residuals, bounds and flags,
    and the products' error ``floor`` under every bound."""

    values: torch.Tensor
    vectors: torch.Tensor
    index: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    errors: torch.Tensor
    gaps: torch.Tensor
    floor: float
    unresolvable: torch.Tensor
    outranked: torch.Tensor

    @classmethod
    def check(
        cls,
        operator: SymmetricOperator,
        settings: EigenSettings,
        values: torch.Tensor,
        vectors: torch.Tensor,
        index: torch.Tensor,
        all_residuals: torch.Tensor,
    ) -> _RitzPairs:
        """The convergence check of the wanted pairs ``index`` of a projected matrix's
        eigenpairs ``(values, vectors)``, whose Ritz residuals are ``all_residuals``: their
        error bounds (:func:`error_bounds`, above the products' :func:`product_error_floor`)
        and which of them meet ``settings.tol`` (:func:`converged_pairs`)."""
        scale = float(values.abs().max())
        floor = product_error_floor(operator, scale)
        errors, gaps = error_bounds(values, all_residuals, index, floor, settings.criterion)
        residuals = all_residuals[index]
        converged = converged_pairs(operator, values[index], errors, residuals, settings.tol, scale)
        outranked = torch.zeros_like(converged)
        if settings.which == "LM":
            outranked = outranked_pairs(
                operator, settings, values, all_residuals, index, floor, scale
            )
        unresolvable = unresolvable_pairs(operator, values[index], settings.tol, scale)
        return cls(
            values,
            vectors,
            index,
            residuals,
            converged & ~outranked,
            errors,
            gaps,
            floor,
            unresolvable,
            outranked,
        )

    @property
    def all_converged(self) -> bool:
        """Whether every wanted pair meets the tolerance."""
        return bool(self.converged.all())

    def stalled_since(self, previous: _RitzPairs | None) -> bool:
        """Whether more products can neither converge nor tighten any unconverged pair: each
        one is :func:`unresolvable_pairs`, its bound is the products' floor (its residual
        bound below it) and its value moved less than the floor since the ``previous``
        check."""
        if previous is None or self.all_converged:
            return False
        wanted, before = self.values[self.index], previous.values[previous.index]
        if before.shape != wanted.shape:  # block Lanczos before it holds k values
            return False
        open_pairs = ~self.converged
        return bool(
            self.unresolvable[open_pairs].all()
            and (self.errors[open_pairs] <= self.floor).all()
            and ((wanted - before).abs()[open_pairs] <= self.floor).all()
        )

    def result(
        self,
        operator: SymmetricOperator,
        settings: EigenSettings,
        basis: torch.Tensor,
        num_hvps: int,
        num_iterations: int,
        return_eigenvectors: bool,
        method: str,
    ) -> EigenResult:
        """The :class:`EigenResult` of the wanted pairs, formed from ``basis`` (the Krylov
        vectors as rows) where asked or where a claimed residual below the rounding floor
        needs fresh products to be believed (:func:`confirm_ritz_pairs`, ``k`` products)."""
        scale = float(self.values.abs().max())
        values, residuals, converged = self.values[self.index], self.residuals, self.converged
        errors = self.errors
        confirm = needs_confirmation(operator, values, converged, settings.tol, scale)
        # Products whose error depends on the direction (gradient differences): the bound
        # of each pair is at least the error of a product along its own vector.
        along = bool(getattr(operator, "errors_vary_by_direction", False))
        eigenvectors = None
        if return_eigenvectors or confirm or along:
            coefficients = self.vectors[:, self.index].T
            eigenvectors = coefficients.to(dtype=operator.dtype, device=operator.device) @ basis
        if confirm:
            values, residuals, converged, eigenvectors, errors = confirm_ritz_pairs(
                operator,
                eigenvectors,
                settings.tol,
                settings.which,
                scale,
                self.gaps,
                self.outranked,
            )
            num_hvps += settings.k
        if along:
            # |vᵀ δ(v)| / ‖v‖² ≤ ‖δ(v)‖ / ‖v‖ for the product error δ(v) along v.
            deltas = operator.product_errors_along(eigenvectors)
            along_errors = deltas.double().norm(dim=1) / eigenvectors.double().norm(dim=1)
            # An unresolved direction's infinite row turns NaN through a projection.
            along_errors = along_errors.nan_to_num(nan=math.inf, posinf=math.inf)
            errors = torch.maximum(
                errors, along_errors.to(device=errors.device, dtype=errors.dtype)
            )
            converged = converged & converged_pairs(
                operator, values, errors, residuals, settings.tol, scale
            )
            num_hvps += 2 * eigenvectors.shape[0]  # as the operator counts them
        return EigenResult(
            eigenvalues=values,
            residuals=residuals,
            converged=converged,
            num_hvps=num_hvps,
            num_iterations=num_iterations,
            eigenvectors=eigenvectors if return_eigenvectors else None,
            method=method,
            errors=errors,
        )


def _warm_start_rows(start: torch.Tensor, operator: SymmetricOperator) -> torch.Tensor:
    """Given warm-start vectors as ``(r, n)`` rows in the operator's dtype and device."""
    rows = start.reshape(-1, operator.size).to(dtype=operator.dtype, device=operator.device)
    if not bool(torch.isfinite(rows).all()) or bool((rows.norm(dim=1) == 0).any()):
        raise ValueError("start vectors must be finite and non-zero")
    return rows


def _start_block(
    start: torch.Tensor | None,
    rows: int,
    operator: SymmetricOperator,
    generator: torch.Generator,
    mixing: float = WARM_START_MIXING,
) -> torch.Tensor:
    """A ``(rows, n)`` start block: warm-start rows, completed with random rows.

    Each given unit row gets ``mixing`` times a random unit vector of its own (see
    :data:`WARM_START_MIXING` for why); exact previous eigenvectors would otherwise pass the
    convergence check at once, before a random row has brought in a direction they lack.
    With a common random vector one block step would recover the given rows exactly (from
    the differences of the mixed rows and of their products). For single-vector Lanczos
    (``rows = 1``) the given rows are summed first.
    """
    n = operator.size
    random = torch.randn(rows, n, generator=generator, dtype=operator.dtype, device=operator.device)
    if start is None:
        return random
    given = _warm_start_rows(start, operator)
    unit = given / given.norm(dim=1, keepdim=True)
    if rows == 1:
        unit = unit.sum(dim=0, keepdim=True)
        norm = unit.norm()
        if float(norm) == 0.0:  # rows that cancel: a random start
            return random
        unit = unit / norm
        noise = random
    else:
        noise = torch.randn(
            rows, n, generator=generator, dtype=operator.dtype, device=operator.device
        )
    used = min(rows, unit.shape[0])
    random[:used] = unit[:used] + mixing * noise[:used] / noise[:used].norm(dim=1, keepdim=True)
    return random


def _make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def lanczos(
    operator: SymmetricOperator,
    k: int = 1,
    which: Which = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    start: torch.Tensor | None = None,
    check_every: int = 4,
    return_eigenvectors: bool = False,
    max_basis: int | None = None,
    start_mixing: float = WARM_START_MIXING,
    criterion: Criterion = "error",
) -> EigenResult:
    """Top-``k`` eigenpairs by single-vector Lanczos with full reorthogonalisation.

    Each step costs one operator product and two Gram-Schmidt passes against the basis
    (``O(m n)`` memory traffic at step ``m``). The tridiagonal ``T_m`` is float64.

    The basis holds every Krylov vector, ``m + 1`` vectors of ``n`` entries after ``m``
    steps. ``max_basis`` bounds that, by default once the basis could exceed
    :data:`KRYLOV_BASIS_BYTES`: when the basis is full and the wanted pairs have not
    converged, the solve keeps the ``l = k + ⌊(max_basis - 1 - k) / 2⌋`` best Ritz vectors
    and the next Krylov direction and goes on from there (thick restart, Wu & Simon 2000,
    the symmetric case of Krylov-Schur). Memory is then ``max_basis · n`` entries whatever
    the number of steps, at the price of more products than an unbounded basis needs.

    A single Krylov vector sees one direction per distinct eigenvalue: an eigenvalue of
    multiplicity ``r > 1`` is found once (until the Krylov space exhausts and restarts). Use
    :func:`block_lanczos` with ``block_size >= r`` when exact multiplicities matter.

    Args:
        operator: The symmetric operator.
        k: Number of eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (see module docstring).
        tol: Relative tolerance on the error bound: ``e_i <= tol · |θ_i|`` (module
            docstring).
        max_iter: Maximum number of Lanczos steps (operator products); default
            ``max(100, 20k)``, capped at ``n`` unless the basis is bounded.
        seed: Seed of the random start vector (and of restart vectors).
        start: Warm start: a vector ``(n,)`` or rows ``(r, n)``; rows are summed after
            normalisation, so previous top-``k`` eigenvectors seed the next solve, and a
            random unit vector is added (``start_mixing`` times it) so that a direction the
            rows lack can still be found.
        check_every: Largest gap, in steps, between convergence checks (each check is one
            host synchronisation and a float64 eigendecomposition of ``T_m``).
        return_eigenvectors: Whether to form the Ritz vectors.
        max_basis: Most basis vectors held at once (at least ``k + 2``; ``k + 3`` for
            ``"LM"``, whose restarts keep both ends of the spectrum). Default: no
            bound while an unbounded basis (``max_iter + 1`` vectors) fits in
            :data:`KRYLOV_BASIS_BYTES` (1 GiB), otherwise as many vectors as fit there but
            at least ``max(16, 2k + 12)`` (:func:`basis_bound`). Pass ``max_iter + 1`` for
            no bound. With a bound, ``max_iter`` still counts every product, across
            restarts, and may exceed ``n``.
        start_mixing: Weight ``w ≥ 0`` of the random unit vector added to the unit warm
            start (default :data:`WARM_START_MIXING`); ``0`` is a pure warm start, which
            cannot find a direction the start lacks. Unused without ``start``.
        criterion: What ``tol`` bounds: ``"error"`` (default) each eigenvalue's error
            bound, ``"residual"`` the Ritz residual (module docstring).

    Returns:
        An :class:`EigenResult`. If the operator produced a non-finite value the eigenvalues
        are NaN and nothing is marked converged.

    Convergence is claimed honestly. A converged pair's tolerance ``tol · |θ|`` within
    :data:`CONFIRM_BELOW_ROUNDOFFS` unit roundoffs of the products' dtype of the operator's
    scale (float32 products at ``tol`` below about ``6e-5``; every 16-bit product) is
    confirmed with one fresh product per pair (:func:`confirm_ritz_pairs`): the
    eigenvalue is then the Rayleigh quotient and the residual the true one. And a
    breakdown (an invariant Krylov space, every residual exactly 0) never ends the solve
    while the space is smaller than the operator: the recurrence goes on from a random
    direction orthogonal to it, which finds further copies of a repeated eigenvalue.
    Products whose error depends on the direction (gradient differences) bound each pair by
    the error measured along its vector; where a pair misses ``tol`` by that and the
    operator re-tunes its products (``adapt_products``), the solve runs once more from its
    Ritz vectors, within ``max_iter`` (:class:`~spectral_callbacks.linalg.SymmetricOperator`).
    A solve whose unconverged pairs ask for less than the products' own error stops before
    ``max_iter`` once their bounds sit at that error and their values hold still (module
    docstring).
    """
    settings = EigenSettings.from_arguments({**locals(), "method": "lanczos"})
    settings.check_size(operator.size)
    check_number("start_mixing", start_mixing, minimum=0.0)
    return _lanczos(operator, settings, start, return_eigenvectors, check_every, start_mixing)


def _again_where_products_adapt(solve: Callable[..., EigenResult]) -> Callable[..., EigenResult]:
    """Decorator: a solve run once more where pairs missed the tolerance and the operator
    re-tuned its products to the errors measured along their vectors (``adapt_products()``
    true: gradient differences shorten a step that was calibrated along another direction).

    The second run starts from the first one's Ritz vectors, which operators with inexact
    products (``product_relative_error > 0``) that can adapt form for it; from a random
    start where the products turned inexact during the solve (``hvp="auto"`` switching to
    gradient differences) and they were not asked for. Both runs' products and steps are
    counted, within ``max_iter``."""

    @functools.wraps(solve)
    def run(operator, settings, start, return_eigenvectors, *args):
        adapt = getattr(operator, "adapt_products", None)
        inexact = adapt is not None and float(getattr(operator, "product_relative_error", 0.0)) > 0
        first = solve(operator, settings, start, return_eigenvectors or inexact, *args)
        budget = None if settings.max_iter is None else settings.max_iter - first.num_hvps
        if (
            adapt is not None
            and not first.all_converged
            and bool(torch.isfinite(first.eigenvalues).all())
            and (budget is None or budget >= settings.k)
            and adapt()
        ):
            again = solve(
                operator,
                replace(settings, max_iter=budget),
                first.eigenvectors,
                return_eigenvectors,
                *args,
            )
            again.num_hvps += first.num_hvps
            again.num_iterations += first.num_iterations
            return again
        if not return_eigenvectors:
            first.eigenvectors = None
        return first

    return run


@_again_where_products_adapt
@full_precision
def _lanczos(
    operator: SymmetricOperator,
    settings: EigenSettings,
    start: torch.Tensor | None,
    return_eigenvectors: bool,
    check_every: int = 4,
    start_mixing: float = WARM_START_MIXING,
) -> EigenResult:
    """:func:`lanczos` with checked ``settings``."""
    n = operator.size
    k, which, tol, max_iter = settings.k, settings.which, settings.tol, settings.max_iter
    max_steps = min(n, max_iter or default_max_iter(k))
    max_basis = basis_bound(settings.max_basis, k, operator, max_steps)
    if max_basis is not None:
        # Restarts revisit directions, so the product budget is no longer capped at n.
        max_steps = max_iter or default_max_iter(k)
    generator = _make_generator(settings.seed, operator.device)
    basis_steps = max_steps if max_basis is None else max_basis - 1
    recurrence = IndependentLanczos(
        operator,
        _start_block(start, 1, operator, generator, start_mixing),
        basis_steps,
        generator,
        preallocate=max_basis is not None,
    )
    schedule = _CheckSchedule(first=k, every=check_every, last=max_steps)
    invariant_values: torch.Tensor | None = None
    ritz: _RitzPairs | None = None
    while True:
        recurrence.step()
        products = recurrence.products
        full = recurrence.steps >= basis_steps
        if not (schedule.due(products) or full):
            continue
        projected, last_coupling = recurrence.projected_matrix()
        if not bool(torch.isfinite(projected).all() and torch.isfinite(last_coupling)):
            return _non_finite_result(k, products, products, "lanczos")
        values, vectors = torch.linalg.eigh(projected)
        index = select_ritz(values, k, which)
        previous = ritz
        ritz = _RitzPairs.check(
            operator, settings, values, vectors, index, (last_coupling * vectors[-1]).abs()
        )
        schedule.checked(products, _worst_ratio(ritz.errors, values[index], tol))
        logger.debug(
            "lanczos step %d: %s, residuals %s",
            products,
            values[index].tolist(),
            ritz.residuals.tolist(),
        )
        # A zero coupling is a breakdown at this very step: the basis spans an invariant
        # space, so every residual is 0, yet eigenvalues outside it (another copy of a
        # repeated one) may be wanted. The recurrence has already moved on to a random
        # direction orthogonal to the basis: stop only when the space it added since the
        # last such check changed none of the wanted values.
        invariant = float(last_coupling) == 0.0 and recurrence.steps < n
        settled = not invariant
        if invariant:
            wanted = values[index]
            settled = invariant_values is not None and bool(
                torch.allclose(wanted, invariant_values, rtol=tol, atol=0.0)
            )
            invariant_values = wanted
        if ((ritz.all_converged or ritz.stalled_since(previous)) and settled) or (
            products >= max_steps
        ):
            break
        if full:
            m = recurrence.steps
            if which == "LM":
                # Both ends compete for the largest |θ|: a restart that dropped one end would
                # let the solve settle on the other end's local maximum of |θ| (seen with a
                # basis of k + 2). Keeping both extremes makes each end's Ritz value monotone.
                kept = select_ritz(values, k + (m - k - 1) // 2, which)
                ends = torch.stack([values.argmin(), values.argmax()])
                kept = torch.unique(torch.cat([kept, ends]))
            else:
                kept = select_ritz(values, k + (m - k) // 2, which)
            recurrence.thick_restart(vectors[:, kept], values[kept], last_coupling)
    basis = recurrence.basis[0, : recurrence.steps]
    return ritz.result(
        operator, settings, basis, products, products, return_eigenvectors, "lanczos"
    )


def block_lanczos(
    operator: SymmetricOperator,
    k: int = 1,
    which: Which = "LA",
    tol: float = 1e-3,
    block_size: int | None = None,
    max_iter: int | None = None,
    seed: int = 0,
    start: torch.Tensor | None = None,
    check_every: int = 2,
    return_eigenvectors: bool = False,
    criterion: Criterion = "error",
) -> EigenResult:
    """Top-``k`` eigenpairs by block Lanczos with full reorthogonalisation.

    Each step applies the operator to a block of ``p`` vectors at once, which an operator
    can batch (the vmapped Hessian-vector product costs less per vector in a block). With
    ``p >= r`` it also resolves eigenvalues of multiplicity ``r``.

    Args:
        operator: The symmetric operator.
        k: Number of eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        tol: Relative tolerance on the error bound: ``e_i <= tol · |θ_i|`` (module
            docstring).
        block_size: Vectors per block ``p``; default 4 (at most ``n``). Larger blocks resolve
            higher multiplicities and batch more products per step but need more products in
            all than single-vector Lanczos (docs/benchmarks.md).
        max_iter: Maximum number of operator products (so about ``max_iter / p`` steps);
            default ``min(n, 2·max(100, 20k))`` rounded up to whole blocks, twice the
            single-vector default because a block needs more products.
        seed: Seed of the random start rows.
        start: Warm start rows ``(r, n)`` (or one vector): the first rows of the start
            block, each mixed with a random vector as in :func:`lanczos`
            (:data:`WARM_START_MIXING`); rows beyond ``r`` are random.
        check_every: Largest gap, in block steps, between convergence checks.
        return_eigenvectors: Whether to form the Ritz vectors.
        criterion: As for :func:`lanczos`.

    Returns:
        An :class:`EigenResult` with ``method="block_lanczos"``. When ``p`` does not divide
        ``n``, whole blocks span at most ``n - (n mod p)`` dimensions; a solve that has not
        converged there and whose budget covers ``n`` products finishes on the dense
        matrix built from ``n`` products (small operators only). It stops early as
        :func:`lanczos` does where the products' own error exceeds ``tol``.
    """
    settings = EigenSettings.from_arguments({**locals(), "method": "block_lanczos"})
    settings.check_size(operator.size)
    return _block_lanczos(operator, settings, start, return_eigenvectors, check_every)


@_again_where_products_adapt
@full_precision
def _block_lanczos(
    operator: SymmetricOperator,
    settings: EigenSettings,
    start: torch.Tensor | None,
    return_eigenvectors: bool,
    check_every: int = 2,
) -> EigenResult:
    """:func:`block_lanczos` with checked ``settings``."""
    n = operator.size
    k, which, tol, max_iter = settings.k, settings.which, settings.tol, settings.max_iter
    p = settings.block_size if settings.block_size is not None else min(n, 4)
    budget = max_iter or min(n, 2 * default_max_iter(k, n))
    # Never let the basis exceed the dimension: beyond it the projection is exact anyway.
    max_blocks = max(1, min(math.ceil(budget / p), n // p))
    generator = _make_generator(settings.seed, operator.device)
    recurrence = BlockLanczos(
        operator, _start_block(start, p, operator, generator), max_blocks, generator
    )
    schedule = _CheckSchedule(first=math.ceil(k / p), every=check_every, last=max_blocks)
    ritz: _RitzPairs | None = None
    while True:
        recurrence.step()
        m = recurrence.steps
        if not schedule.due(m):
            continue
        projected, last_coupling = recurrence.projected_matrix()
        if not bool(torch.isfinite(projected).all() and torch.isfinite(last_coupling).all()):
            return _non_finite_result(k, m * p, m, "block_lanczos")
        values, vectors = torch.linalg.eigh(projected)
        wanted = min(k, values.shape[0])
        index = select_ritz(values, wanted, which)
        all_residuals = (last_coupling @ vectors[(m - 1) * p :]).norm(dim=0)
        previous = ritz
        ritz = _RitzPairs.check(operator, settings, values, vectors, index, all_residuals)
        schedule.checked(m, _worst_ratio(ritz.errors, values[index], tol))
        logger.debug(
            "block lanczos step %d: %s, residuals %s",
            m,
            values[index].tolist(),
            ritz.residuals.tolist(),
        )
        stalled = wanted == k and ritz.stalled_since(previous)
        if (wanted == k and ritz.all_converged) or stalled or m >= max_blocks:
            break
    if not (wanted == k and ritz.all_converged) and not stalled and m * p < n <= budget:
        # Whole blocks stop short of the dimension when p does not divide n, and the last
        # n - m·p directions fit in no block. The budget covers n products, which give the
        # matrix itself.
        return _dense_eigenpairs(operator, k, which, tol, p, m, return_eigenvectors)
    basis = recurrence.basis[: m * p]
    return ritz.result(operator, settings, basis, m * p, m, return_eigenvectors, "block_lanczos")


def _dense_eigenpairs(
    operator: SymmetricOperator,
    k: int,
    which: str,
    tol: float,
    block_size: int,
    blocks_spent: int,
    return_eigenvectors: bool,
) -> EigenResult:
    """Eigenpairs of the dense matrix built from ``n`` products with the unit vectors.

    For operators small enough that a Krylov budget covers their dimension. The matrix is
    symmetrised and decomposed in float64; residuals are those of the dense eigenvectors.
    """
    n = operator.size
    identity = torch.eye(n, dtype=operator.dtype, device=operator.device)
    rows = [operator.matmat(identity[i : i + block_size]) for i in range(0, n, block_size)]
    dense = torch.cat(rows).to(torch.float64).cpu()
    num_hvps = blocks_spent * block_size + n
    if not bool(torch.isfinite(dense).all()):
        return _non_finite_result(k, num_hvps, blocks_spent, "block_lanczos")
    dense = 0.5 * (dense + dense.T)
    values, vectors = torch.linalg.eigh(dense)
    index = select_ritz(values, k, which)
    wanted = vectors[:, index]
    residuals = (dense @ wanted - wanted * values[index]).norm(dim=0)
    scale = float(values.abs().max())
    everyone = (dense @ vectors - vectors * values).norm(dim=0)
    errors, _ = error_bounds(values, everyone, index, product_error_floor(operator, scale))
    eigenvectors = None
    if return_eigenvectors:
        eigenvectors = wanted.T.to(dtype=operator.dtype, device=operator.device)
    return EigenResult(
        eigenvalues=values[index],
        residuals=residuals,
        converged=converged_pairs(operator, values[index], errors, residuals, tol, scale),
        num_hvps=num_hvps,
        num_iterations=blocks_spent,
        eigenvectors=eigenvectors,
        method="block_lanczos",
        errors=errors,
    )


def _non_finite_result(k: int, num_hvps: int, num_iterations: int, method: str) -> EigenResult:
    logger.warning("%s: the operator produced a non-finite value; returning NaN", method)
    nan = torch.full((k,), math.nan, dtype=torch.float64)
    return EigenResult(
        eigenvalues=nan,
        residuals=nan.clone(),
        converged=torch.zeros(k, dtype=torch.bool),
        num_hvps=num_hvps,
        num_iterations=num_iterations,
        method=method,
        errors=nan.clone(),
    )


def eigenpairs(
    operator: SymmetricOperator,
    k: int = 1,
    which: Which = "LA",
    tol: float = 1e-3,
    method: EigenMethod = "auto",
    block_size: int | None = None,
    max_iter: int | None = None,
    seed: int = 0,
    start: torch.Tensor | None = None,
    return_eigenvectors: bool = False,
    max_basis: int | None = None,
    criterion: Criterion = "error",
) -> EigenResult:
    """Top-``k`` eigenpairs by the solver ``method`` names: the one entry point above linalg.

    ``method`` is resolved by :attr:`EigenSettings.solver
    <spectral_callbacks.settings.EigenSettings.solver>`; the other arguments are those
    of :func:`lanczos` and :func:`block_lanczos` (``block_size`` only for the latter,
    default 4; ``max_basis`` only for the former).
    """
    settings = EigenSettings.from_arguments(locals())
    return eigensolve(operator, settings, start=start, return_eigenvectors=return_eigenvectors)


def eigensolve(
    operator: SymmetricOperator,
    settings: EigenSettings,
    start: torch.Tensor | None = None,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """:func:`eigenpairs` with its settings given as one checked
    :class:`~spectral_callbacks.settings.EigenSettings` (what the monitors keep).

    ``start`` is the warm start (a ``(n,)`` vector or ``(r, n)`` rows, e.g. a previous
    result's ``eigenvectors``).
    """
    settings.check_size(operator.size)
    check_bool("return_eigenvectors", return_eigenvectors)
    if settings.solver == "lanczos":
        return _lanczos(operator, settings, start, return_eigenvectors)
    return _block_lanczos(operator, settings, start, return_eigenvectors)
