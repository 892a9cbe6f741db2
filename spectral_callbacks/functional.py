"""The public one-call functions: curvature of a model's loss, spectra of embeddings and of
weights.

The representation measures (``rankme``, ``alpha_req``, ``effective_rank``, ``stable_rank``,
``participation_ratio``, ``von_neumann_entropy``) are re-exported from
:mod:`spectral_callbacks.representation`, and the weight spectra (``weight_spectra``,
``singular_subspace_drift``) from :mod:`spectral_callbacks.weights`, where their
definitions are written out.


Each function builds a :class:`~spectral_callbacks.curvature.HessianOperator` over ``data``,
runs one solver from :mod:`spectral_callbacks.linalg` on it, and leaves the model exactly as
it found it. ``loss_fn(model, batch)`` returns the loss of a batch, its mean over the batch's
samples (``reduction="mean"``, the default) or their sum (``reduction="sum"``); ``data`` is one
batch or an iterable of batches (wrap a list of batches in
:class:`~spectral_callbacks.curvature.Batches` to rule out reading it as one batch). The
Hessian is that of the dataset loss: with ``"mean"`` the mean over every sample
(``Σ_b (n_b/N) ∇²L_b``, batches weighted by size), with ``"sum"`` the sum over every sample
(``Σ_b ∇²L_b``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_choice
from .curvature import (
    BatchSharpness,
    Curvature,
    GgnLoss,
    HvpPath,
    LossFunction,
    ParameterFilter,
    Reduction,
    SamSharpness,
    StabilityPreconditioner,
    StabilityRatio,
    batch_sharpness_of,
    curvature_operator,
    layer_lambda_max,
    layer_traces,
    sam_sharpness_of,
    stability_preconditioner,
    stability_ratio,
)
from .linalg import (
    EIGEN_METHODS,
    EigenMethod,
    EigenResult,
    ScaledOperator,
    SpectralDensity,
    TraceEstimate,
    Which,
    deflated_hutchinson,
    deflated_spectrum,
    eigenpairs,
    eigensolve,
    estimate_trace,
    slq,
    subspace_fraction,
)
from .representation import (
    alpha_req,
    effective_rank,
    participation_ratio,
    rankme,
    stable_rank,
    von_neumann_entropy,
)
from .settings import TRACE_METHODS, Criterion, EigenSettings, OperatorSettings, TraceMethod
from .weights import singular_subspace_drift, weight_spectra

__all__ = [
    "EIGEN_METHODS",
    "alpha_req",
    "batch_sharpness",
    "effective_rank",
    "gradient_overlap",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_layer_lambda_max",
    "hessian_layer_traces",
    "hessian_trace",
    "optimizer_stability_ratio",
    "participation_ratio",
    "rankme",
    "sam_sharpness",
    "singular_subspace_drift",
    "stable_rank",
    "von_neumann_entropy",
    "weight_spectra",
]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    k: int = 5,
    which: Which = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    params: ParameterFilter = None,
    method: EigenMethod = "auto",
    block_size: int | None = None,
    start: torch.Tensor | None = None,
    return_eigenvectors: bool = False,
    hvp: HvpPath = "auto",
    batch_size_fn: Callable[[Any], int] | None = None,
    reduction: Reduction = "mean",
    preconditioner: torch.Tensor | StabilityPreconditioner | None = None,
    max_basis: int | None = None,
    curvature: Curvature = "hessian",
    ggn_loss: GgnLoss | None = None,
    outputs_fn: Callable | None = None,
    criterion: Criterion = "error",
) -> EigenResult:
    """Top-``k`` eigenpairs of the loss Hessian, by Lanczos with full reorthogonalisation.

    Args:
        model: The model (its train/eval modes are used as they are).
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss of a batch (see ``reduction``).
        data: One batch or an iterable of batches (module docstring).
        k: Number of eigenvalues.
        which: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest algebraic
            (ascending), ``"LM"`` largest magnitude (descending ``|λ|``).
        tol: Relative tolerance on each eigenvalue's error bound (``residual²/gap`` where
            the neighbouring Ritz values certify a gap, else the residual; see
            :mod:`spectral_callbacks.linalg.eigsh`): ``errors <= tol · |θ|``.
        max_iter: Maximum number of Hessian-vector products; default ``max(100, 20k)``.
        seed: Seed of the random start vector and of dropout masks in the forward passes.
        params: Parameter filter (regex, predicate, or names / module prefixes); default all
            trainable parameters.
        method: ``"lanczos"``, ``"block_lanczos"`` or ``"auto"`` (single-vector Lanczos, or
            block Lanczos when ``block_size`` is given; block Lanczos resolves
            multiplicities up to its block size but needs more products).
        block_size: Vectors per block of ``"block_lanczos"`` (default 4); an error with
            ``"lanczos"``.
        start: Warm start, e.g. the ``eigenvectors`` of a previous call: a ``(n,)`` vector or
            ``(r, n)`` rows.
        return_eigenvectors: Also return the ``(k, n)`` unit Ritz vectors (flat, on the
            model's device, parameters in model order).
        hvp: Hessian-vector product path, ``"auto"``, ``"reuse_graph"``,
            ``"forward_over_reverse"`` or ``"compiled"`` (see
            :class:`~spectral_callbacks.curvature.HessianOperator`).
        batch_size_fn: ``batch -> int`` when a batch's first tensor does not say its size.
        reduction: ``"mean"`` if ``loss_fn`` returns a batch's mean loss, ``"sum"`` if it
            sums over the batch's samples (``reduction="sum"`` losses: the Hessian is then
            that of the summed dataset loss, ``Σ_b ∇²L_b``).
        preconditioner: Eigenpairs of ``D^½ H D^½`` instead: a flat tensor ``D`` (one
            non-negative entry per selected parameter entry), or a
            :class:`~spectral_callbacks.curvature.StabilityPreconditioner` from
            :func:`~spectral_callbacks.curvature.stability_preconditioner` (then
            ``D̃^½ (H + W) D̃^½``, whose top eigenvalue is the optimizer-aware ``eos_ratio``).
        curvature: ``"hessian"`` (default) or ``"ggn"``: the Gauss–Newton part
            ``Jᵀ H_out J`` of the Hessian (:class:`~spectral_callbacks.curvature.GGNOperator`),
            which needs ``ggn_loss`` (``"cross_entropy"``, ``"mse"`` or ``"bce"``) and
            ``outputs_fn(model, batch) -> (outputs, targets)`` (default ``(model(x), y)``);
            ``loss_fn`` and ``hvp`` are then unused. The same three arguments work in
            :func:`hessian_trace` and :func:`hessian_density`.
        max_basis: Most parameter-sized Krylov vectors held at once by ``"lanczos"``
            (at least ``k + 2``; it restarts when they are used up). Default: all of them
            while they fit in 1 GiB, else as many as fit but at least ``max(16, 2k + 12)``
            (see :func:`~spectral_callbacks.linalg.lanczos`).
        criterion: What ``tol`` bounds: ``"error"`` (default) each eigenvalue's error bound,
            ``"residual"`` the Ritz residual (:mod:`spectral_callbacks.linalg.eigsh`).

    Returns:
        An :class:`~spectral_callbacks.linalg.EigenResult`: ``eigenvalues`` (float64, CPU),
        ``residuals``, ``converged``, ``num_hvps`` (every Hessian-vector product computed).

    Raises:
        NonFiniteLossError: If the loss is NaN or infinite on a batch.

    Example:
        A linear least-squares loss has the Hessian ``2 XᵀX / N`` exactly:

        >>> import torch, torch.nn.functional as F
        >>> x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(5, 1, bias=False).double()
        >>> mse = lambda m, batch: F.mse_loss(m(batch[0]), batch[1])
        >>> result = hessian_eigenvalues(model, mse, (x, y), k=2, tol=1e-10)
        >>> exact = torch.linalg.eigvalsh(2 * x.T @ x / 64).flip(0)[:2]
        >>> torch.allclose(result.eigenvalues, exact), bool(result.converged.all())
        (True, True)
    """
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as hessian:
        operator = hessian
        if isinstance(preconditioner, StabilityPreconditioner):
            decay = preconditioner.weight_decay
            shift = decay if bool((decay != 0).any()) else None
            operator = ScaledOperator(hessian, preconditioner.scaled_step, shift)
        elif preconditioner is not None:
            operator = ScaledOperator(hessian, torch.as_tensor(preconditioner).reshape(-1))
        solver = EigenSettings.from_arguments(locals())
        result = eigensolve(operator, solver, start, return_eigenvectors)
        result.num_hvps = hessian.num_hvps
    return result


def batch_sharpness(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    batch_size_fn: Callable[[Any], int] | None = None,
    reduction: Reduction = "mean",
    seed: int = 0,
) -> BatchSharpness:
    """``q(B) = g_Bᵀ H_B g_B / ‖g_B‖²`` of a batch ``data``: the curvature of its loss along
    its own gradient (Andreyev & Beneventano 2024; see
    :mod:`spectral_callbacks.curvature.batch`), with one Hessian-vector product. Its mean
    over batches is what :class:`~spectral_callbacks.BatchSharpnessMonitor` logs.

    Example:
        A least-squares loss has ``H_B = 2 X_Bᵀ X_B / b`` and ``g_B = 2 X_Bᵀ r / b``:

        >>> import torch, torch.nn.functional as F
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(4, 1, bias=False).double()
        >>> mse = lambda m, batch: F.mse_loss(m(batch[0]), batch[1])
        >>> g = 2 * x.T @ (model(x) - y).detach() / 16
        >>> exact = float(g.T @ (2 * x.T @ x / 16) @ g / (g.T @ g))
        >>> round(batch_sharpness(model, mse, (x, y)).value / exact, 12)
        1.0
    """
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        return batch_sharpness_of(operator)


def gradient_overlap(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    k: int = 10,
    tol: float = 1e-3,
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    reduction: Reduction = "mean",
    eigenvectors: torch.Tensor | None = None,
) -> float:
    """``‖V_kᵀ g‖² / ‖g‖²``: the fraction of the gradient in the top-``k`` Hessian eigenspace.

    Gur-Ari et al. (2018) found it close to 1 for ``k`` the number of classes ("gradient
    descent happens in a tiny subspace"). ``g`` is the gradient of the dataset loss on
    ``data``; ``V_k`` the top-``k`` eigenvectors, found by :func:`hessian_eigenvalues` (with
    ``tol``, ``seed``, ``hvp``) unless given as ``(k, n)`` rows in ``eigenvectors`` (then no
    products are spent, only the gradient).
    """
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        if eigenvectors is None:
            result = eigenpairs(operator, k=k, tol=tol, seed=seed, return_eigenvectors=True)
            eigenvectors = result.eigenvectors
        return subspace_fraction(eigenvectors, operator.gradient())


def hessian_layer_traces(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    num_hvps: int = 30,
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    reduction: Reduction = "mean",
) -> dict[str, TraceEstimate]:
    """The trace of each module's diagonal Hessian block ``H_ll`` (HAWQ-V2's sensitivity).

    One Hutchinson estimate serves every block (:func:`~spectral_callbacks.linalg.block_traces`,
    ``num_hvps`` products, a standard error per block; exact with ``num_hvps >= n``). Blocks
    are the selected parameters grouped by the module that owns them
    (``"encoder.0.weight"`` and ``"encoder.0.bias"`` make ``"encoder.0"``).
    """
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        traces = layer_traces(operator, num_hvps, seed=seed)
    return {module: estimate for module, (_, estimate) in traces.items()}


def hessian_layer_lambda_max(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    tol: float = 1e-3,
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    reduction: Reduction = "mean",
) -> dict[str, EigenResult]:
    """The top eigenvalue of each module's diagonal Hessian block ``H_ll``, by Lanczos on the
    Hessian restricted to that module's parameters (one solve, and one first-order graph,
    per module; modules as in :func:`hessian_layer_traces`)."""
    settings = OperatorSettings.from_arguments(locals())
    return layer_lambda_max(model, loss_fn, data, settings, tol=tol, seed=seed)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    radius: float = 0.05,
    seed: int = 0,
    params: ParameterFilter = None,
    reduction: Reduction = "mean",
) -> SamSharpness:
    """SAM's sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` and first-order flatness
    ``‖∇L(θ + ρ g/‖g‖)‖`` at radius ``ρ = radius`` (Foret et al. 2021; Zhang et al. 2023);
    see :func:`spectral_callbacks.curvature.sam_sharpness_of`. ``radius`` 0.05 is SAM's
    default. The model is left exactly as found."""
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        return sam_sharpness_of(operator, radius)


def optimizer_stability_ratio(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    optimizer: torch.optim.Optimizer,
    tol: float = 1e-3,
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    method: EigenMethod = "auto",
    block_size: int | None = None,
    max_basis: int | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    reduction: Reduction = "mean",
) -> StabilityRatio:
    """The optimizer-aware edge-of-stability ratio ``λ_max(D̃^½ (H + W) D̃^½)`` outside a Trainer.

    ``D̃`` is the optimizer's effective elementwise step over its stability threshold (from
    its class, param groups and state; see :mod:`spectral_callbacks.curvature.preconditioner`
    for each optimizer's derivation) and ``W`` its L2 weight decay. 1.0 is the edge: the
    linearised update on the local quadratic diverges above it. This is the number
    :class:`~spectral_callbacks.SharpnessMonitor` logs as ``eos_ratio``. ``method``,
    ``block_size`` and ``max_basis`` choose the eigensolver as in :func:`hessian_eigenvalues`.
    """
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        preconditioner = stability_preconditioner(optimizer, operator.params)
        return stability_ratio(
            operator,
            preconditioner,
            tol=tol,
            seed=seed,
            method=method,
            block_size=block_size,
            max_basis=max_basis,
        )


def _deflation_pairs(deflate: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Ritz pairs ``(vectors, values)`` of a ``deflate`` argument, checked before any
    product is spent: ``None``, or an :class:`EigenResult` that holds its eigenvectors."""
    if deflate is None:
        return None
    if not isinstance(deflate, EigenResult):
        raise TypeError(
            f"deflate must be None or the EigenResult of hessian_eigenvalues(..., "
            f"return_eigenvectors=True), got {type(deflate).__name__}"
        )
    if deflate.eigenvectors is None:
        raise ValueError(
            "deflate needs the Ritz vectors: pass the result of "
            "hessian_eigenvalues(..., return_eigenvectors=True)"
        )
    return deflate.eigenvectors, deflate.eigenvalues


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    num_hvps: int = 99,
    method: TraceMethod = "hutch++",
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    batch_size_fn: Callable[[Any], int] | None = None,
    reduction: Reduction = "mean",
    curvature: Curvature = "hessian",
    ggn_loss: GgnLoss | None = None,
    outputs_fn: Callable | None = None,
    deflate: EigenResult | None = None,
) -> TraceEstimate:
    """Trace of the loss Hessian by Hutch++ (default) or Hutchinson, with a standard error.

    With ``num_hvps >= n`` (the number of parameters) the trace is computed exactly from the
    ``n`` unit vectors and ``stderr`` is 0. See :func:`spectral_callbacks.linalg.hutchpp`.

    With ``deflate``, the result of :func:`hessian_eigenvalues` with
    ``return_eigenvectors=True`` on the same model, loss and data, the estimate is that of
    :class:`~spectral_callbacks.HessianSpectrumMonitor`: ``Σ θ_i`` of its Ritz pairs plus
    Hutchinson with ``num_hvps`` probes on their orthogonal complement
    (:func:`~spectral_callbacks.linalg.deflated_hutchinson`; ``method`` is then unused).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(5, 1, bias=False).double()
        >>> mse = lambda m, batch: F.mse_loss(m(batch[0]), batch[1])
        >>> estimate = hessian_trace(model, mse, (x, y), num_hvps=5)  # n = 5: exact
        >>> round(estimate.estimate / float(torch.trace(2 * x.T @ x / 64)), 12), estimate.stderr
        (1.0, 0.0)

    Returns:
        A :class:`~spectral_callbacks.linalg.TraceEstimate` (``estimate``, ``stderr``,
        ``num_hvps``, ``method``).
    """
    check_choice("method", method, TRACE_METHODS)  # before the operator, and with deflate
    pairs = _deflation_pairs(deflate)
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        if pairs is None:
            return estimate_trace(operator, num_hvps=num_hvps, method=method, seed=seed)
        return deflated_hutchinson(operator, *pairs, num_hvps=num_hvps, seed=seed)


def hessian_density(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    num_probes: int = 8,
    steps: int = 64,
    seed: int = 0,
    params: ParameterFilter = None,
    hvp: HvpPath = "auto",
    batch_size_fn: Callable[[Any], int] | None = None,
    reduction: Reduction = "mean",
    reorthogonalize: bool | None = None,
    curvature: Curvature = "hessian",
    ggn_loss: GgnLoss | None = None,
    outputs_fn: Callable | None = None,
    deflate: EigenResult | None = None,
) -> SpectralDensity:
    """Eigenvalue density of the loss Hessian by stochastic Lanczos quadrature.

    ``num_probes`` Rademacher probes, ``steps`` Lanczos steps each (``num_probes · steps``
    Hessian-vector products, in blocks of ``num_probes``). See
    :class:`~spectral_callbacks.linalg.SpectralDensity` for ``nodes``, ``weights``,
    ``evaluate(grid, sigma)``, ``negative_mass`` and ``lambda_min``, and
    :func:`~spectral_callbacks.linalg.slq` for ``reorthogonalize`` (default: full
    reorthogonalisation while the Krylov bases fit in 1 GiB, else two vectors per probe).

    With ``deflate``, the result of :func:`hessian_eigenvalues` with
    ``return_eigenvectors=True`` on the same model, loss and data, the density is that of
    :class:`~spectral_callbacks.HessianSpectrumMonitor`: the Ritz values as nodes of weight
    ``1/n`` and the quadrature of the probes projected on their orthogonal complement
    (:func:`~spectral_callbacks.linalg.deflated_spectrum`).
    """
    if reorthogonalize is not None:
        check_bool("reorthogonalize", reorthogonalize)
    pairs = _deflation_pairs(deflate)
    settings = OperatorSettings.from_arguments(locals())
    with curvature_operator(model, loss_fn, data, settings) as operator:
        if pairs is not None:
            return deflated_spectrum(
                operator,
                *pairs,
                trace_hvps=None,
                density_probes=num_probes,
                density_steps=steps,
                seed=seed,
                residuals=deflate.residuals,
                reorthogonalize=reorthogonalize,
            ).density
        return slq(
            operator,
            num_probes=num_probes,
            steps=steps,
            seed=seed,
            reorthogonalize=reorthogonalize,
        )
