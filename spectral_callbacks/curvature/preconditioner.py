r"""The effective step of an optimizer, and the stability threshold of its update.

On a quadratic ``L(θ) = ½ θᵀHθ`` an optimizer with an elementwise step ``D`` (per
parameter: the learning rate, divided by Adam's ``√v̂ + ε`` and so on, frozen at its current
value) updates ``θ`` by a linear recursion. Its modes are the eigenvectors of
``D^½ H D^½`` (a similarity transform of ``D H``); along one with eigenvalue ``h`` the
recursion has a characteristic polynomial in ``z`` whose roots leave the unit disc when
``h`` passes a threshold ``c`` set by the momentum. So the optimizer-aware
edge-of-stability ratio is

    eos_ratio = λ_max(D̃^½ (H + W) D̃^½),   D̃ = D / c,

which is 1.0 at the edge whatever the optimizer (``W`` the diagonal of L2 weight decay, which
enters the gradient). Thresholds (Jury's criterion for ``z² + a₁ z + a₀``: ``|a₀| < 1`` and
``1 ± a₁ + a₀ > 0``):

* **SGD, no momentum**: ``θ ← θ - η g`` gives ``z = 1 - h``; stable iff ``h < 2``.
* **Heavy ball** (PyTorch ``SGD(momentum=β, dampening=τ)``): ``b ← β b + (1-τ) g``,
  ``θ ← θ - η b`` gives ``z² - (1 + β - (1-τ)h) z + β``; ``1 + a₁ + a₀ = (1-τ)h > 0`` and
  ``1 - a₁ + a₀ = 2 + 2β - (1-τ)h > 0``, so ``h < (2 + 2β)/(1 - τ)``.
* **Nesterov** (``nesterov=True``, ``τ = 0``): ``θ ← θ - η (g + β b)`` gives
  ``z² - (1+β)(1-h) z + β(1-h)``; ``1 - a₁ + a₀ = 1 + (1+2β)(1-h) > 0``, so
  ``h < (2 + 2β)/(1 + 2β)`` (``|a₀| < 1`` allows more).
* **Adam / AdamW**: ``m ← β₁ m + (1-β₁) g`` is heavy ball with ``τ = β₁``, so
  ``h < (2 + 2β₁)/(1 - β₁)`` (38 at ``β₁ = 0.9``; Cohen et al. 2022), with
  ``D = η / ((1 - β₁^{t+1}) (√v̂ + ε))``, ``v̂ = v / (1 - β₂^{t+1})`` after ``t`` steps: the
  bias corrections of the *next* update, the one the ratio predicts. That update divides by
  ``1 - β₂^{t+1}`` (PyTorch counts the step before it corrects), and the frozen ``v`` stands
  in for the ``v`` it will hold; ``1 - β₂^t`` would describe the update already taken and,
  early in training, moves the ratio by tens of percent (by √2, 41 %, from β₂'s correction
  alone at ``t = 1``, β₂ = 0.999).
* **RMSprop**: ``D = η / (√v + ε)`` (``√(v - ḡ²)`` when centred); no momentum: ``h < 2``;
  momentum ``μ`` (no dampening): ``h < 2 + 2μ``.
* **Adagrad**: ``D = η_t / (√Σg² + ε)`` with ``η_t = η / (1 + t·lr_decay)``; ``h < 2``.

Approximations, stated: the preconditioner is frozen at its current value; AdamW's decoupled
weight decay (a factor ``1 - η·wd`` on ``θ``, of order ``η·wd``) is left out; parameters
the optimizer does not update get ``D = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..settings import EigenMethod, EigenSettings

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "EdgeOfStability",
    "StabilityPreconditioner",
    "StabilityRatio",
    "UnsupportedOptimizerError",
    "edge_of_stability",
    "heavy_ball_threshold",
    "nesterov_threshold",
    "stability_preconditioner",
    "stability_ratio",
]

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


class UnsupportedOptimizerError(TypeError):
    """The optimizer's update has no derivation here (its class is named in the message)."""


def heavy_ball_threshold(momentum: float, dampening: float = 0.0) -> float:
    """``(2 + 2β)/(1 - τ)``: the largest stable ``h`` of PyTorch's heavy-ball SGD."""
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")
    return (2.0 + 2.0 * momentum) / (1.0 - dampening)


def nesterov_threshold(momentum: float) -> float:
    """``(2 + 2β)/(1 + 2β)``: the largest stable ``h`` of PyTorch's Nesterov SGD."""
    return (2.0 + 2.0 * momentum) / (1.0 + 2.0 * momentum)


@dataclass
class StabilityPreconditioner:
    """What the stability ratio needs from an optimizer, flattened like the Hessian.

    Attributes:
        step: ``D``, the effective elementwise step of each selected parameter entry.
        threshold: ``c`` per entry (the stability constant of its parameter group).
        weight_decay: ``W``, L2 weight decay per entry (added to the Hessian).
        optimizer: The optimizer's class name.
    """

    step: torch.Tensor
    threshold: torch.Tensor
    weight_decay: torch.Tensor
    optimizer: str

    @property
    def scaled_step(self) -> torch.Tensor:
        """``D̃ = D / c``: with it, the ratio's edge is 1 for every entry."""
        return self.step / self.threshold

    @property
    def uniform_threshold(self) -> float:
        """The threshold if every entry shares one (else NaN)."""
        low, high = float(self.threshold.min()), float(self.threshold.max())
        return low if math.isclose(low, high, rel_tol=1e-12) else math.nan

    @property
    def uniform_step(self) -> float:
        """The step if every entry shares one, as for SGD with one learning rate (else NaN)."""
        low, high = float(self.step.min()), float(self.step.max())
        return low if math.isclose(low, high, rel_tol=1e-12) else math.nan


def _scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _group_step_and_threshold(
    optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor
) -> tuple[torch.Tensor | float, float, float]:
    """(elementwise step, threshold, L2 weight decay) of one parameter under ``optimizer``."""
    name = type(optimizer).__name__
    if group.get("maximize", False):
        raise UnsupportedOptimizerError(
            f"{name} with maximize=True (gradient ascent) is not supported for the "
            "optimizer-aware stability ratio: the edge of ascent is set by the most negative "
            "Hessian eigenvalue, not by λ_max"
        )
    lr = _scalar(group["lr"])
    state = optimizer.state.get(param, {})
    if isinstance(optimizer, torch.optim.SGD):
        momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
        if momentum == 0:
            threshold = 2.0
        elif group.get("nesterov", False):
            threshold = nesterov_threshold(momentum)
        else:
            threshold = heavy_ball_threshold(momentum, dampening)
        return lr, threshold, group.get("weight_decay", 0.0)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = group["betas"]
        if "exp_avg_sq" not in state:
            raise NoPreconditionerYet(name)
        step = _scalar(state["step"]) + 1
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = (second / (1 - beta2**step)).sqrt() + group["eps"]
        elementwise = lr / ((1 - beta1**step) * denom)
        decay = 0.0 if isinstance(optimizer, torch.optim.AdamW) else group.get("weight_decay", 0.0)
        return elementwise, heavy_ball_threshold(beta1, beta1), decay
    if isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            raise NoPreconditionerYet(name)
        square = state["square_avg"]
        if group.get("centered", False):
            square = square - state["grad_avg"] ** 2
        elementwise = lr / (square.sqrt() + group["eps"])
        momentum = group.get("momentum", 0.0)
        return elementwise, heavy_ball_threshold(momentum), group.get("weight_decay", 0.0)
    if isinstance(optimizer, torch.optim.Adagrad):
        if "sum" not in state:
            raise NoPreconditionerYet(name)
        step = _scalar(state["step"])
        current_lr = lr / (1 + step * group.get("lr_decay", 0.0))
        elementwise = current_lr / (state["sum"].sqrt() + group["eps"])
        return elementwise, 2.0, group.get("weight_decay", 0.0)
    raise UnsupportedOptimizerError(
        f"{name} is not supported for the optimizer-aware stability ratio; supported: "
        f"{SUPPORTED_OPTIMIZERS}"
    )


class NoPreconditionerYet(UnsupportedOptimizerError):
    """An adaptive optimizer before its first step has no preconditioner yet."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} has no state before its first step: no preconditioner yet")


def stability_preconditioner(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    params: list[nn.Parameter],
) -> StabilityPreconditioner:
    """Build ``D``, ``c`` and ``W`` for ``params`` (flattened in this order) from ``optimizer``.

    ``optimizer`` may be several optimizers (a module with one per part): each parameter
    gets the step of the optimizer that holds it. Parameters none of them holds do not move
    (``D = 0``).

    Raises:
        UnsupportedOptimizerError: For an optimizer class without a derivation, or an
            adaptive optimizer that has not taken a step yet.
        ValueError: If the optimizers hold none of ``params`` (the ratio would be 0).
    """
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    owner: dict[int, tuple[torch.optim.Optimizer, dict]] = {}
    for each in optimizers:
        for group in each.param_groups:
            for p in group["params"]:
                owner[id(p)] = (each, group)
    if not any(id(p) in owner for p in params):
        names = ", ".join(type(each).__name__ for each in optimizers)
        raise ValueError(
            f"the optimizer ({names}) holds none of the measured parameters, so no step moves "
            "them and the stability ratio would be 0: measure the parameters it trains "
            "(params=...) or pass optimizer_aware=False"
        )
    steps, thresholds, decays = [], [], []
    for p in params:
        held = owner.get(id(p))
        if held is None:  # not trained by any of the optimizers: it does not move
            step, threshold, decay = 0.0, 2.0, 0.0
        else:
            step, threshold, decay = _group_step_and_threshold(held[0], held[1], p)
        flat = torch.as_tensor(step, dtype=p.dtype, device=p.device).expand(p.shape).reshape(-1)
        steps.append(flat)
        thresholds.append(torch.full_like(flat, threshold))
        decays.append(torch.full_like(flat, decay))
    return StabilityPreconditioner(
        step=torch.cat(steps).detach(),
        threshold=torch.cat(thresholds),
        weight_decay=torch.cat(decays),
        optimizer="+".join(type(each).__name__ for each in optimizers),
    )


@dataclass
class StabilityRatio:
    """The optimizer-aware edge-of-stability ratio.

    Attributes:
        eos_ratio: ``λ_max(D̃^½ (H + W) D̃^½)``; 1.0 is the edge.
        preconditioned_sharpness: ``λ_max(D^½ (H + W) D^½) = eos_ratio · c`` when all entries
            share the threshold ``c`` (else NaN).
        threshold: That shared ``c`` (else NaN).
        optimizer: The optimizer's class name.
        num_hvps: Hessian-vector products of the preconditioned solve (0 when the ratio
            followed from λ_max in closed form: one step size and one weight decay).
        eigenvector: The top eigenvector of the scaled operator (for warm starts), or None.
        residual: Its error bound (NaN when computed in closed form).
        converged: Whether the preconditioned solve met ``tol`` (``True`` in closed form,
            where it is exact given ``lambda_max``).
    """

    eos_ratio: float
    preconditioned_sharpness: float
    threshold: float
    optimizer: str
    num_hvps: int = 0
    eigenvector: torch.Tensor | None = None
    residual: float = math.nan
    converged: bool = True


def stability_ratio(
    operator,
    preconditioner: StabilityPreconditioner,
    lambda_max: float | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    start: torch.Tensor | None = None,
    max_iter: int | None = None,
    method: EigenMethod = "auto",
    block_size: int | None = None,
    max_basis: int | None = None,
) -> StabilityRatio:
    """``λ_max(D̃^½ (H + W) D̃^½)`` for a Hessian operator ``H`` and an optimizer's ``D̃, W``.

    When every entry shares one step, threshold and weight decay (SGD with one learning
    rate), ``D̃^½(H + W)D̃^½ = (step/c)(H + w I)`` and the ratio is ``(λ_max + w)·step/c``
    from a given ``lambda_max`` with no further products. Otherwise the eigensolver
    ``method`` (:func:`~spectral_callbacks.linalg.eigenpairs`, with ``block_size`` and
    ``max_basis``) runs on the scaled operator, warm-started from ``start``.
    """
    # Fields in order: k, which, tol, method, block_size, max_iter, max_basis, seed.
    settings = EigenSettings(1, "LA", tol, method, block_size, max_iter, max_basis, seed)
    return _stability_ratio(operator, preconditioner, settings, lambda_max, start)


def _stability_ratio(
    operator,
    preconditioner: StabilityPreconditioner,
    settings: EigenSettings,
    lambda_max: float | None,
    start: torch.Tensor | None,
) -> StabilityRatio:
    from ..linalg import ScaledOperator, eigensolve

    threshold = preconditioner.uniform_threshold
    step = preconditioner.uniform_step
    decay = preconditioner.weight_decay
    uniform_decay = float(decay.min()) == float(decay.max())
    if (
        lambda_max is not None
        and math.isfinite(step)
        and math.isfinite(threshold)
        and uniform_decay
    ):
        ratio = (lambda_max + float(decay[0])) * step / threshold
        return StabilityRatio(ratio, ratio * threshold, threshold, preconditioner.optimizer)
    shift = decay if bool((decay != 0).any()) else None
    scaled = ScaledOperator(operator, preconditioner.scaled_step, shift)
    before = getattr(operator, "num_hvps", 0)
    result = eigensolve(scaled, settings, start=start, return_eigenvectors=True)
    ratio = float(result.eigenvalues[0])
    return StabilityRatio(
        eos_ratio=ratio,
        preconditioned_sharpness=ratio * threshold,
        threshold=threshold,
        optimizer=preconditioner.optimizer,
        num_hvps=getattr(operator, "num_hvps", before + result.num_hvps) - before,
        eigenvector=result.eigenvectors[0] if result.all_converged else None,
        residual=float(result.errors[0]),
        converged=result.all_converged,
    )


#: What an adaptive optimizer without state yet (before its first step) cannot define.
RATIO_METRICS = ("eos_ratio", "preconditioned_sharpness", "stability_threshold", "stability_limit")


@dataclass
class EdgeOfStability:
    """Where a measured ``λ_max`` stands against the optimizer's edge of stability.

    Attributes:
        eos_ratio: ``λ_max(D̃^½ (H + W) D̃^½)`` (:func:`stability_ratio`), or
            ``λ_max · lr / 2`` when the optimizer is not taken into account; 1.0 is the edge.
        preconditioned_sharpness: ``λ_max(D^½ (H + W) D^½)`` (``λ_max · lr`` plain).
        threshold: The stability threshold ``c`` it is compared with (2 plain; NaN when
            parameter groups differ in it).
        limit: The ``λ_max`` at which the ratio reaches 1 when the step, the weight decay
            and the threshold are each one scalar (``c / step − w``; ``2 / lr`` plain); NaN
            otherwise (adaptive optimizers, parameter groups that differ in any of them).
        undefined: Names among :data:`RATIO_METRICS` not defined for the run: NaN by
            definition (no preconditioner before an adaptive optimizer's first step; no
            scalar step or decay; no threshold shared by every parameter), or all of them
            where ``fallback`` put the plain stand-in in the optimizer's place (it says
            nothing of that optimizer's stability).
        converged: Whether the preconditioned solve met its tolerance.
        residual: That solve's error bound (NaN when the ratio is closed-form).
        eigenvector: Its top eigenvector, for the next warm start, or ``None``.
        fallback: Why the plain ``λ_max · lr / 2`` was used for an optimizer given (an
            optimizer without a derivation), or ``None``.
    """

    eos_ratio: float
    preconditioned_sharpness: float
    threshold: float
    limit: float
    undefined: tuple[str, ...] = ()
    converged: bool = True
    residual: float = math.nan
    eigenvector: torch.Tensor | None = None
    fallback: str | None = None


def edge_of_stability(
    operator,
    optimizers: Sequence[torch.optim.Optimizer],
    lambda_max: float,
    lr: float,
    settings: EigenSettings,
    start: torch.Tensor | None = None,
    optimizer_aware: bool = True,
) -> EdgeOfStability:
    """The edge-of-stability numbers of :class:`~spectral_callbacks.SharpnessMonitor`.

    With ``optimizer_aware`` and optimizers given, the ratio is :func:`stability_ratio` of
    the optimizers' :func:`stability_preconditioner` (solved with ``settings``, warm-started
    from ``start``); otherwise, for a non-finite ``λ_max``, or for an optimizer without a
    derivation (``fallback`` says which), it is SGD's ``λ_max · lr / 2`` with threshold 2
    and limit ``2 / lr``.
    """
    plain = EdgeOfStability(
        lambda_max * lr / 2.0, lambda_max * lr, 2.0, 2.0 / lr if lr > 0 else math.nan
    )
    if not optimizer_aware or not optimizers or not math.isfinite(lambda_max):
        return plain
    try:
        preconditioner = stability_preconditioner(list(optimizers), operator.params)
    except NoPreconditionerYet:
        nan = math.nan
        return EdgeOfStability(nan, nan, nan, nan, undefined=RATIO_METRICS)
    except UnsupportedOptimizerError as error:
        plain.fallback, plain.undefined = str(error), RATIO_METRICS
        return plain
    if start is not None and start.shape[-1] != operator.size:
        start = None
    ratio = _stability_ratio(operator, preconditioner, settings, lambda_max, start)
    threshold, decay = ratio.threshold, preconditioner.weight_decay
    step = preconditioner.uniform_step
    undefined: tuple[str, ...] = ()
    if math.isnan(threshold):  # parameters differ in it (optimizers or groups)
        undefined += ("preconditioned_sharpness", "stability_threshold")
    # One λ_max reaches the edge only when every entry shares the step, the decay and the
    # threshold (not for adaptive optimizers, or groups that differ in any of them).
    limit = math.nan
    if step > 0 and float(decay.min()) == float(decay.max()) and math.isfinite(threshold):
        limit = threshold / step - float(decay[0])
    else:
        undefined += ("stability_limit",)
    return EdgeOfStability(
        ratio.eos_ratio,
        ratio.preconditioned_sharpness,
        ratio.threshold,
        limit,
        undefined=undefined,
        converged=ratio.converged,
        residual=ratio.residual,
        eigenvector=ratio.eigenvector,
    )
