"""Settings of the eigensolver and of the curvature operator, each checked here and only here.

The functional API (:func:`~spectral_callbacks.linalg.eigenpairs`,
:class:`~spectral_callbacks.curvature.HessianOperator`, the ``hessian_*`` functions) and the
monitors take flat keyword arguments and build these frozen dataclasses from them, so a
setting has one check, one error message and one default wherever it is passed. A monitor
keeps its settings as public attributes (``monitor.solver``, ``monitor.operator_settings``).

This module sits below ``linalg`` and ``curvature`` (it imports neither), so the choices of
each setting are written down here and re-exported there.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args

from ._checks import (
    check_bool,
    check_callable,
    check_choice,
    check_integer,
    check_name_filter,
    check_seed,
    check_tolerance,
)

__all__ = [
    "CRITERIA",
    "CURVATURES",
    "EIGEN_METHODS",
    "GGN_LOSSES",
    "HVP_PATHS",
    "REDUCTIONS",
    "TRACE_METHODS",
    "WHICH",
    "Criterion",
    "Curvature",
    "EigenMethod",
    "EigenSettings",
    "GgnLoss",
    "HvpPath",
    "OperatorSettings",
    "ParameterFilter",
    "Reduction",
    "TraceMethod",
    "Which",
    "check_parameter_filter",
]

#: What ``tol`` bounds: the eigenvalue error (``residual²/gap`` where a gap is certified,
#: else the residual) or the Ritz residual alone (the stricter rule of earlier versions).
Criterion = Literal["error", "residual"]
CRITERIA: tuple[str, ...] = get_args(Criterion)

#: Which end of the spectrum: largest algebraic, smallest algebraic, largest magnitude.
Which = Literal["LA", "SA", "LM"]
WHICH: tuple[str, ...] = get_args(Which)

#: Eigensolvers of :func:`~spectral_callbacks.linalg.eigenpairs` (and of every ``method=``
#: argument above it): ``"auto"`` is single-vector Lanczos unless a ``block_size`` is given.
EigenMethod = Literal["auto", "lanczos", "block_lanczos"]
EIGEN_METHODS: tuple[str, ...] = get_args(EigenMethod)

#: Estimators of :func:`~spectral_callbacks.linalg.estimate_trace` (and of every ``method=``
#: argument of a trace).
TraceMethod = Literal["hutch++", "hutchinson"]
TRACE_METHODS: tuple[str, ...] = get_args(TraceMethod)

#: How a Hessian-vector product is computed (see
#: :class:`~spectral_callbacks.curvature.HessianOperator`).
HvpPath = Literal["auto", "reuse_graph", "forward_over_reverse", "compiled", "gradient_difference"]
HVP_PATHS: tuple[str, ...] = get_args(HvpPath)

#: How ``loss_fn`` reduces over the samples of a batch, and so what the dataset loss is.
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

#: Losses whose output Hessian ``H_out`` the GGN knows in closed form.
GgnLoss = Literal["cross_entropy", "mse", "bce"]
GGN_LOSSES: tuple[str, ...] = get_args(GgnLoss)
#: The curvature a monitor or function measures: the loss Hessian or its Gauss–Newton part.
Curvature = Literal["hessian", "ggn"]
CURVATURES: tuple[str, ...] = get_args(Curvature)

#: A parameter filter: ``None`` (all trainable parameters), a regular expression searched in
#: each parameter name, a predicate on the name, or a sequence of parameter names or module
#: prefixes (``"encoder"`` selects ``"encoder.weight"``, ``"encoder.0.bias"``, ...). A filter
#: selects a parameter if it selects its name with or without the ``_orig_mod`` segments of
#: ``torch.compile``'d submodules.
# (Sequence before Callable: jsonargparse, and so LightningCLI, serialises a list of names
# only when it meets that type first.)
ParameterFilter = str | Sequence[str] | Callable[[str], bool] | None


def check_parameter_filter(params: Any) -> ParameterFilter:
    """``params`` must be a :data:`ParameterFilter`: ``None``, a valid regular expression, a
    callable, or a sequence of names (``TypeError`` / ``ValueError`` naming it otherwise)."""
    return check_name_filter("params", params, "all trainable parameters", "parameter names")


_Settings = TypeVar("_Settings", bound="_FromArguments")


def _is_integer(value: Any) -> bool:
    """An integer, Python's or NumPy's, that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _FromArguments:
    def _set(self, field: str, value: Any) -> None:
        """Store a checked value (a NumPy integer as ``int``) in the frozen dataclass."""
        object.__setattr__(self, field, value)

    @classmethod
    def from_arguments(cls: type[_Settings], arguments: Mapping[str, Any]) -> _Settings:
        """The settings from the entries of ``arguments`` named like their fields (a
        function's ``locals()``: the functional API, the operators and the monitors take the
        settings as keywords of the same names); the other fields keep their defaults."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls) if f.name in arguments})


@dataclass(frozen=True)
class EigenSettings(_FromArguments):
    """How a top-``k`` eigensolve runs; invalid values raise at construction.

    Attributes:
        k: Number of eigenpairs (a positive integer; at most the operator's dimension,
            checked by :meth:`check_size` once it is known).
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (:data:`WHICH`).
        tol: Relative tolerance on each eigenvalue's error bound, ``e ≤ tol · |θ|`` with
            ``e = min(r, r²/δ)`` for residual ``r`` and certified gap ``δ``
            (:mod:`spectral_callbacks.linalg.eigsh`); in ``(0, 0.5]``.
        method: ``"auto"``, ``"lanczos"`` or ``"block_lanczos"`` (:data:`EIGEN_METHODS`).
        block_size: Vectors per block of block Lanczos (a positive integer), or ``None``;
            an error with ``method="lanczos"``, and it makes ``"auto"`` block Lanczos.
        max_iter: Most operator products (at least ``k``), or ``None`` for the solver's
            default budget.
        max_basis: Most Krylov vectors single-vector Lanczos holds at once (at least
            ``k + 2``, ``k + 3`` for ``"LM"``), or ``None`` for the default bound; an error
            with block Lanczos, which keeps its whole basis.
        seed: Seed of the random start vectors (a non-negative integer).
        criterion: ``"error"`` (default): ``tol`` bounds each eigenvalue's error bound;
            ``"residual"``: ``tol`` bounds the Ritz residual, which over-states the error of
            a well-separated eigenvalue by orders of magnitude and so costs more products.
    """

    k: int = 1
    which: Which = "LA"
    tol: float = 1e-3
    method: EigenMethod = "auto"
    block_size: int | None = None
    max_iter: int | None = None
    max_basis: int | None = None
    seed: int = 0
    criterion: Criterion = "error"

    def __post_init__(self) -> None:
        check_choice("which", self.which, WHICH)
        check_choice("criterion", self.criterion, CRITERIA)
        self._set("k", check_integer("k", self.k, minimum=1))
        self._set("tol", check_tolerance("tol", self.tol))
        self._check_method()
        self._set("max_iter", check_integer("max_iter", self.max_iter, self.k, allow_none=True))
        self._check_max_basis()
        self._set("seed", check_seed("seed", self.seed))

    def _check_method(self) -> None:
        method = check_choice("method", self.method, EIGEN_METHODS)
        block_size = check_integer("block_size", self.block_size, minimum=1, allow_none=True)
        if block_size is None:
            return
        self._set("block_size", block_size)
        if method == "lanczos":
            raise ValueError(
                f"block_size={block_size} applies to method='block_lanczos' (or 'auto'); "
                "method='lanczos' uses one vector"
            )

    def _check_max_basis(self) -> None:
        max_basis = self.max_basis
        if max_basis is None:
            return
        least = self.k + 3 if self.which == "LM" else self.k + 2
        if not _is_integer(max_basis) or max_basis < least:
            extra = (
                ("k + 3", " and, for which='LM', the other end")
                if self.which == "LM"
                else ("k + 2", "")
            )
            raise ValueError(
                f"max_basis must be None or an integer of at least {extra[0]} = {least} (the k "
                f"wanted Ritz vectors, a new direction and the next{extra[1]}), got "
                f"{max_basis!r}"
            )
        self._set("max_basis", int(max_basis))
        if self.solver != "lanczos":
            raise ValueError(
                f"max_basis={max_basis} bounds the basis of method='lanczos' (restarted "
                f"single-vector Lanczos); {self.solver!r} keeps its whole basis"
            )

    @property
    def solver(self) -> Literal["lanczos", "block_lanczos"]:
        """The solver ``method`` stands for: ``"auto"`` is single-vector Lanczos unless a
        ``block_size`` is given (then block Lanczos), on every device.

        Block Lanczos needs more products for the same top-k (docs/benchmarks.md), so a
        cheaper product per vector
        in a block (vmapped, compiled) would have to beat that factor before ``"auto"``
        should choose it.
        """
        if self.method != "auto":
            return self.method
        return "lanczos" if self.block_size is None else "block_lanczos"

    def check_size(self, size: int, dimension: str | None = None) -> None:
        """``ValueError`` when ``k`` or ``block_size`` exceeds the operator's ``size``.

        ``dimension`` says what ``size`` is in the message (default "the operator's
        dimension ``size``"; a monitor names the selected parameters).
        """
        dimension = dimension or f"the operator's dimension {size}"
        if self.k > size:
            raise ValueError(f"k={self.k} is larger than {dimension}")
        if self.block_size is not None and self.block_size > size:
            raise ValueError(f"block_size={self.block_size} is larger than {dimension}")


@dataclass(frozen=True)
class OperatorSettings(_FromArguments):
    """How a curvature operator is built from a model and a loss; checked at construction.

    :func:`~spectral_callbacks.curvature.curvature_operator` builds the operator these
    settings describe; the operators' own constructors take the same fields as keywords.

    Attributes:
        params: Which parameters (:data:`ParameterFilter`); ``None`` all trainable ones.
        hvp: Product path, one of :data:`HVP_PATHS` (the Hessian's; the GGN has one path).
        reduction: ``"mean"`` or ``"sum"`` (:data:`REDUCTIONS`): what ``loss_fn`` returns.
        seed: Seed of dropout masks and other randomness in the forward passes.
        curvature: ``"hessian"`` or ``"ggn"`` (:data:`CURVATURES`).
        ggn_loss: With ``curvature="ggn"``, the loss whose output Hessian is used, one of
            :data:`GGN_LOSSES` (required there, unused otherwise).
        outputs_fn: ``outputs_fn(model, batch) -> (outputs, targets)`` for the GGN, or
            ``None`` for ``(model(x), y)``.
        batch_size_fn: ``batch -> int`` samples in a batch, or ``None`` for the leading
            dimension of its first tensor (unused with ``reduction="sum"``).
        richardson: With ``hvp="gradient_difference"``, a Richardson step (four gradients
            per product instead of two).
        compile_backend: ``torch.compile`` backend of ``hvp="compiled"``.
    """

    params: ParameterFilter = None
    hvp: HvpPath = "auto"
    reduction: Reduction = "mean"
    seed: int = 0
    curvature: Curvature = "hessian"
    ggn_loss: GgnLoss | None = None
    outputs_fn: Callable[..., Any] | None = None
    batch_size_fn: Callable[[Any], int] | None = None
    richardson: bool = False
    compile_backend: str | Callable[..., Any] = "inductor"

    def __post_init__(self) -> None:
        check_choice("hvp", self.hvp, HVP_PATHS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_parameter_filter(self.params)
        self._set("seed", check_seed("seed", self.seed))
        check_choice("curvature", self.curvature, CURVATURES)
        if self.curvature == "ggn" and self.ggn_loss not in GGN_LOSSES:
            raise ValueError(
                f"curvature='ggn' needs ggn_loss, one of {GGN_LOSSES}, got {self.ggn_loss!r}"
            )
        check_callable("outputs_fn", self.outputs_fn, "outputs_fn(model, batch) -> (f, y)", True, 2)
        check_callable("batch_size_fn", self.batch_size_fn, "batch_size_fn(batch) -> int", True, 1)
        check_bool("richardson", self.richardson)
        if not (isinstance(self.compile_backend, str) or callable(self.compile_backend)):
            raise TypeError(
                "compile_backend must be a torch.compile backend name or callable, got "
                f"{self.compile_backend!r}"
            )
