"""Path ``"gradient_difference"``: products from first-order gradients alone.

For models whose loss has no double backward (a custom ``autograd.Function`` without one,
fused kernels, reentrant activation checkpointing, engines that shard parameters), the
central difference

    ``H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h)``.

Its error is truncation ``(h²/6) ‖∇³L[v, v, ·]‖`` against rounding ``≈ ε ‖∇L‖ / h`` (``ε``
the parameters' machine epsilon), smallest at ``h ∝ ε^{1/3}``. The step starts scaled to
the parameters, ``h‖v‖ = s₀ = ε^{1/3} (1 + ‖θ‖)`` (Nocedal & Wright, section 8.1); the first
product measures the truncation coefficient from ``D(s₀)`` against ``D(s₀/2)`` and the
gradient's norm, and sets the step that minimises their sum
(:meth:`GradientDifferenceProducts.calibrate`). The relative error of a product is then of
order ``ε^{2/3}``. ``richardson=True`` combines the steps ``h`` and ``h/2``,
``(4 D(h/2) − D(h)) / 3``, which cancels the ``h²`` term (error of order ``ε^{4/5}`` at a step
grown to ``ε^{1/5}``), at four gradients per product. The operator states the error it
measured (``product_relative_error``) and the eigensolvers confirm residuals near it with
fresh products, so no solve claims a tolerance the differences cannot resolve. Along the
vectors a solve returns, the truncation can be far larger than along the calibration's
vector: the solvers bound each pair by the error measured there (:meth:`errors_along`) and,
where that misses the tolerance, the step is chosen again for those directions
(:meth:`adapt_step`) and the solve runs once more; a direction whose truncation is a
large share of its curvature (:data:`UNRESOLVED_TRUNCATION`) gets no bound at all. A loss
that is not smooth at the step's scale (the kinks of ReLU-like activations) makes
differences unreliable, whatever the step: the measured error then exceeds 1e-2 (and ten
times ``ε^{2/3}``) and the operator warns.

Both gradients of a pair run under the same seeded RNG (equal dropout masks) with BatchNorm
statistics frozen; the parameters are moved in place (so activation checkpointing sees the
moved values) and copied back from a saved copy after every product, bit for bit; attention
keeps its default kernels. Parameters sharded by ``fully_shard`` (FSDP2 ``DTensor``
parameters) take this path only, with ``distributed=True``: each perturbation is sharded like
its parameter and the gradients come from FSDP's own ``backward()``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ..first_order import weighted_gradient
from ..sharding import like, local_tensor

if TYPE_CHECKING:
    from ..hessian import HessianOperator

__all__ = ["UNRESOLVED_TRUNCATION", "GradientDifferenceProducts"]

#: Largest truncation error, as a share of the curvature along a vector, that
#: :meth:`GradientDifferenceProducts.errors_along` estimates from two steps. Beyond it the
#: step is far outside the ``h²`` regime, where the higher-order terms can make the
#: estimate far too small, and the direction is called unresolved: an infinite error.
UNRESOLVED_TRUNCATION = 0.25

_TINY = torch.finfo(torch.float64).tiny


class GradientDifferenceProducts:
    """Central differences of ``operator``'s dataset gradient (module docstring)."""

    def __init__(self, operator: HessianOperator, richardson: bool) -> None:
        self.operator = operator
        self.richardson = richardson
        self.step: float | None = None  # once chosen by calibrate()
        self.stated_error: float | None = None
        #: What :meth:`errors_along` last measured at the current step, per row ``v``: the
        #: error ``‖δ(v)‖ / ‖v‖`` and the curvature ``‖D(v)‖ / ‖v‖`` (``None`` before, and
        #: after a new step).
        self.measured_along: list[tuple[float, float]] | None = None
        self._theta_norm: float | None = None
        # The calibration's error model (set where it resolved curvature): the rounding
        # ``ε G`` (times 1/s), the truncation coefficient ``c`` along the calibration
        # vector (times s²) and that vector's curvature ``‖H u‖``, the relative errors' scale.
        self._model: tuple[float, float, float] | None = None
        hooked = operator.hooked_parameters
        if hooked:
            warnings.warn(
                f"gradient hooks on {hooked} shape the gradients that gradient differences "
                "take, not the directions the parameters move in, so the products are not "
                "those of a symmetric matrix (a hook that freezes entries: P H instead of "
                "P H P); where double backward works, hvp='reuse_graph' runs the hooks both "
                "ways",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def relative_error(self) -> float:
        """The stated relative error of a product: measured when the step was chosen, before
        that the a-priori ``ε^{2/3}`` (``ε^{4/5}`` with Richardson)."""
        if self.stated_error is not None:
            return self.stated_error
        eps = torch.finfo(self.operator.product_dtype).eps
        return eps ** (0.8 if self.richardson else 2.0 / 3.0)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        op = self.operator
        op.check_finite_losses(math_attention=False)
        if self._theta_norm is None:
            self._theta_norm = self._parameter_norm()
        # The first non-zero row calibrates the step; the rows after it use the chosen step.
        return self._row_by_row(
            block, lambda *row: self.calibrate(*row) if self.step is None else self._product(*row)
        )

    def _row_by_row(self, block: torch.Tensor, compute: Callable) -> torch.Tensor:
        """``compute(saved, pieces, norm)`` of each non-zero row of ``block`` (zeros for a zero
        row), stacked in ``block``'s dtype, with the parameters moved and restored around
        them."""
        rows = []
        with self._moved_parameters() as saved:
            for row in block:
                norm = float(row.double().norm())
                if norm == 0.0:
                    rows.append(torch.zeros_like(row))
                else:
                    rows.append(compute(saved, self._pieces(row), norm).to(row.dtype))
        return torch.stack(rows)

    @contextlib.contextmanager
    def _moved_parameters(self) -> Iterator[list[torch.Tensor]]:
        """A saved copy of the parameters, which the differences move in place, copied back
        afterwards bit for bit, whatever the differences did."""
        params = self.operator.params
        saved = [p.detach().clone() for p in params]
        try:
            yield saved
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved, strict=True):
                    param.data.copy_(value)

    def _pieces(self, row: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector as one tensor per parameter."""
        op = self.operator
        return [
            piece.reshape(shape)
            for piece, shape in zip(row.split(op.numels), op.shapes, strict=True)
        ]

    def errors_along(self, vectors: torch.Tensor) -> torch.Tensor:
        """The estimated error of the product of each row of ``vectors`` at the chosen step,
        measured along that row: a ``(b, n)`` block in ``vectors``' dtype.

        The step was calibrated along one vector; along another, the loss's higher
        derivatives can be far larger (a transformer's top eigenvectors), and so the
        truncation. Central differences at ``h`` and ``h/2`` have truncations ``c h²`` and
        ``c h²/4``, so ``(4/3) (D(h) − D(h/2))`` estimates the error of ``D(h)``; with
        Richardson, ``R(s) = (4 D(s/2) − D(s)) / 3`` at ``s = h`` and ``h/2`` and
        ``(16/15) (R(h) − R(h/2))``. Formed in float64. Costs two differences per row (three
        with Richardson), each two gradients. Each row's error and curvature are kept in
        :attr:`measured_along` for :meth:`adapt_step`.

        The estimate ``e`` assumes the step is in the ``h²`` regime and carries rounding of
        its own, so the row returned is the estimate scaled to the norm
        ``e + 2 t²/κ + r``: ``t`` the truncation part of ``e`` (:meth:`_truncation`),
        ``κ = ‖D(h)‖/‖v‖`` the curvature, ``2 t²/κ`` a margin for the next term of the
        expansion (which a two-step estimate misses by about ``t²/κ`` where the terms
        alternate in sign, as along a saturating ``tanh``), and ``r`` the rounding slack
        (:meth:`_rounding_slack`). A row whose truncation exceeds
        :data:`UNRESOLVED_TRUNCATION` of ``κ`` is far outside the regime, where no such
        margin holds (a 16-bit model's step, ``ε^{1/3}`` of the parameters' scale): its
        error row is infinite, so no pair along it is bounded or converged.
        """
        steps = (1.0, 0.5, 0.25) if self.richardson else (1.0, 0.5)

        def error(saved: list[torch.Tensor], pieces: list[torch.Tensor], norm: float):
            differences = torch.stack(
                [self._difference(saved, pieces, self.step * s / norm)[0] for s in steps]
            )
            d = self.operator.reduce_products(differences.double())
            if self.richardson:
                coarse, fine, factor = (4 * d[1] - d[0]) / 3, (4 * d[2] - d[1]) / 3, 16 / 15
            else:
                coarse, fine, factor = d[0], d[1], 4 / 3
            estimate, curvature = (
                factor * float((coarse - fine).norm()) / norm,
                float(coarse.norm()) / norm,
            )
            measured.append((estimate, curvature))
            truncation = self._truncation(estimate)
            if truncation > UNRESOLVED_TRUNCATION * curvature:
                return torch.full_like(coarse, math.inf)
            next_term = 2.0 * truncation**2 / max(curvature, _TINY)
            bound = estimate + next_term + self._rounding_slack()
            if estimate == 0.0:  # no direction to scale: the bound along the vector itself
                return bound * torch.cat([p.reshape(-1) for p in pieces]).double()
            return (bound / estimate) * factor * (coarse - fine)

        measured: list[tuple[float, float]] = []
        errors = self._row_by_row(vectors, error)
        self.measured_along = measured or None
        return errors

    def _rounding_slack(self) -> float:
        """How far rounding can move the two-step estimate from the error it estimates, at
        the current step: with ``ρ / s`` the rounding of a difference at step ``s`` (``ρ =
        ε G`` of the calibration's model), the estimate's own rounding and that of ``D(h)``
        add up to at most ``3 ρ / h`` (central: ``R(h)/3 + (4/3) R(h/2)``) or ``7 ρ / h``
        (Richardson: ``R(h)/15 + (16/15) R(h/2)`` of its ``3 ρ/h`` and ``6 ρ/h``)."""
        if self._model is None:
            return 0.0
        return (7.0 if self.richardson else 3.0) * self._model[0] / self.step

    def _truncation(self, error: float) -> float:
        """The truncation part of an error measured along a vector at the current step: the
        error less the rounding of the calibration's model (``ε G / h``, ``2 ε G / h`` with
        Richardson; none where the calibration resolved no curvature)."""
        if self._model is None:
            return error
        return max(error - self._rounding(self.step), 0.0)

    def _rounding(self, step: float) -> float:
        """The rounding of a product at ``step`` under the calibration's model: ``ε G / s``
        for a central difference, ``2 ε G / s`` for Richardson's (``~(5/3) ε G / s``)."""
        return (2.0 if self.richardson else 1.0) * self._model[0] / step

    def adapt_step(self) -> bool:
        """Re-choose the step for the directions :meth:`errors_along` measured, where their
        truncation makes the bound of their eigenvalues far worse than it need be.

        An eigenvalue ``θ_v`` along a measured direction ``v`` gets the relative bound
        ``max(δ_s · θ_max, e_v(s)) / θ_v``: the stated error ``δ_s`` times the largest
        curvature (the eigensolvers' product-error floor), or the error along ``v``. Both
        follow the calibration's error model: ``δ_s = (c s² + ε G / s) / κ`` (``c`` and
        ``κ`` along the calibration vector, ``ε G`` the rounding) and
        ``e_v(s) = c_v s² + ε G / s``, with ``c_v = (e_v(h) − ε G / h) / h²`` from the error
        measured at the current step ``h``; with Richardson ``c s⁴`` and ``2 ε G / s``. The
        new step minimises the worst bound over the measured directions on ``[h/1000, h]``
        and is taken where it at least halves it.

        Returns:
            Whether the step changed. Not without a measurement, nor where the calibration
            resolved no curvature (a loss linear along its vector).
        """
        if self.measured_along is None or self._model is None:
            return False
        order = 4 if self.richardson else 2
        largest = max(curvature for _, curvature in self.measured_along)
        directions = [
            (self._truncation(error) / self.step**order, curvature)
            for error, curvature in self.measured_along
        ]

        def worst(step: float) -> float:
            floor = self._stated_at(step) * largest
            return max(
                max(floor, c_v * step**order + self._rounding(step)) / max(curvature, _TINY)
                for c_v, curvature in directions
            )

        steps = [self.step * 10.0 ** (-3.0 * i / 120) for i in range(121)]
        best = min(steps, key=worst)
        if worst(best) > 0.5 * worst(self.step):
            return False
        self.step, self.measured_along = best, None
        self.stated_error = self._stated_at(best)
        return True

    def _stated_at(self, step: float) -> float:
        """The relative error of a product at ``step`` under the calibration's error model:
        ``(c s² + ε G / s) / κ``; with Richardson (the ``s²`` term cancelled) what is left
        is mostly rounding, ``~(5/3) ε G / s``, stated as ``2 ε G / s / κ``, and at least
        ``ε^{4/5}``."""
        _, coefficient, scale = self._model
        if self.richardson:
            eps = torch.finfo(self.operator.product_dtype).eps
            return max(self._rounding(step) / scale, eps**0.8)
        return (coefficient * step**2 + self._rounding(step)) / scale

    def _product(self, saved: list[torch.Tensor], pieces: list[torch.Tensor], norm: float):
        """The product of the vector ``pieces`` (of norm ``norm``) at the chosen step."""
        if self.richardson:
            coarse, _ = self._difference(saved, pieces, self.step / norm)
            fine, _ = self._difference(saved, pieces, self.step / (2 * norm))
            return (4.0 * fine - coarse) / 3.0
        return self._difference(saved, pieces, self.step / norm)[0]

    def _difference(self, saved: list[torch.Tensor], pieces: list[torch.Tensor], h: float):
        """``(g(θ + h v) − g(θ − h v)) / 2h`` for one vector ``v`` given as ``pieces``, and the
        mean ``(g(θ + h v) + g(θ − h v)) / 2``, flat."""
        op = self.operator
        gradients = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for param, value, piece in zip(op.params, saved, pieces, strict=True):
                    # Through .data: the parameter's version counter stays, so a graph that
                    # saved it (another operator's, the user's) stays valid once restored.
                    param.data.copy_(value + like(value, (sign * h) * piece.to(value.dtype)))
            gradients.append(torch.cat([g.reshape(-1) for g in weighted_gradient(op)]))
        plus, minus = gradients
        return (plus - minus) / (2.0 * h), 0.5 * (plus + minus)

    def calibrate(self, saved: list[torch.Tensor], pieces: list[torch.Tensor], norm: float):
        """Choose the step from the first vector; return its product.

        With the default step ``s₀ = ε^{1/3} (1 + ‖θ‖)`` (a length in parameter space) the
        central differences ``D(s₀)`` and ``D(s₀/2)`` of the unit direction give the
        truncation coefficient ``c = ‖D(s₀) − D(s₀/2)‖ / (¾ s₀²)`` and the mean gradient
        ``G = ‖∇L‖``; the step minimising ``c s² + ε G / s`` is ``s* = (ε G / 2c)^{1/3}``,
        kept within ``[s₀/1000, s₀]`` (a loss that is not smooth at the scale of ``s₀``, a
        ReLU network's kinks, shows as a large ``c`` and a smaller step). The relative error
        of later products is then stated as ``(c s*² + ε G / s*) / ‖H u‖``. The quantities are
        all-reduced first, so every process chooses the same step.

        The first vector's product is the Richardson value ``(4 D(s₀/2) − D(s₀)) / 3`` where
        ``s₀`` was kept, and is taken afresh at the chosen step where a smaller one was
        chosen: a step shrunk for truncation means ``s₀`` is beyond where the differences
        follow ``h²``, and the Richardson value keeps the higher-order terms (a transformer
        along its own gradient), which no stated error covers.
        """
        op = self.operator
        eps = torch.finfo(op.product_dtype).eps
        step = eps ** (1.0 / 3.0) * (1.0 + self._theta_norm)
        coarse, mean = self._difference(saved, pieces, step / norm)
        fine, _ = self._difference(saved, pieces, step / (2 * norm))
        local = (4.0 * fine - coarse) / 3.0
        stacked = op.reduce_products(torch.stack([coarse, fine, mean]).double())
        gap = float((stacked[0] - stacked[1]).norm()) / norm
        gradient = float(stacked[2].norm())
        curvature = float(stacked[1].norm()) / norm
        if curvature <= 10.0 * eps * gradient / step:
            # No curvature along this direction that the differences can resolve (a loss
            # linear in the parameters): nothing to calibrate against, so the step and the
            # stated error stay a priori.
            self.step = step * (eps ** (0.2 - 1.0 / 3.0) if self.richardson else 1.0)
            self.stated_error = self.relative_error
            return local
        c = gap / (0.75 * step**2)
        best = (eps * gradient / (2.0 * c)) ** (1.0 / 3.0) if c > 0 else step
        central = min(step, max(step / 1000.0, best))
        scale = max(curvature, _TINY)
        # This first product is the Richardson value of D(s₀) and D(s₀/2): its rounding is
        # about (5/3) ε G / (s₀/2).
        first = (10.0 / 3.0) * eps * gradient / step / scale
        self._model = (eps * gradient, c, scale)
        # With Richardson the h² term cancels; the a-priori optimal step grows to ε^{1/5},
        # scaled like the central one.
        self.step = central * eps ** (0.2 - 1.0 / 3.0) if self.richardson else central
        self.stated_error = max(self._stated_at(self.step), first)
        if self.stated_error > max(1e-2, 10.0 * eps ** (2.0 / 3.0)):
            warnings.warn(
                f"gradient differences of this loss carry an estimated relative error of "
                f"{self.stated_error:.1g} per product: the loss is not smooth at the scale of "
                "the step (kinks of ReLU-like activations?). Values are flagged unconverged "
                "but unreliable; use an exact path (hvp='auto') where double backward exists",
                RuntimeWarning,
                stacklevel=5,
            )
        if central < step:
            return self._product(saved, pieces, norm)
        return local

    def _parameter_norm(self) -> float:
        """``‖θ‖`` of the selected parameters, the same on every process: replicated
        parameters (DDP) hold all of ``θ`` on each, sharded ones (FSDP2's ``DTensor``) a part."""
        op = self.operator
        sharded = torch.zeros((), dtype=torch.float64, device=op.device)
        replicated = 0.0
        for p in op.params:
            local = local_tensor(p.detach())
            if local is not None:
                sharded += local.double().pow(2).sum()
            else:
                replicated += float(p.detach().double().pow(2).sum())
        total = float(op.all_reduce(sharded)) if op.distributed else float(sharded)
        return math.sqrt(total + replicated)
