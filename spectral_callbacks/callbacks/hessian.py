"""Callbacks that measure the loss Hessian: sharpness and the spectrum.

Both build their curvature operator on the probe data
(:func:`~spectral_callbacks.curvature.curvature_operator`) and run
the solvers of :mod:`spectral_callbacks.linalg`; they only add scheduling and logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from .._checks import check_bool, check_callable, check_integer, check_number
from ..curvature import (
    Batches,
    Curvature,
    CurvatureOperator,
    EdgeOfStability,
    GgnLoss,
    HvpPath,
    ParameterFilter,
    Reduction,
    curvature_operator,
    edge_of_stability,
    flat_size,
    layer_lambda_max,
    layer_traces,
    module_groups,
    sam_sharpness_of,
    select_parameters,
)
from ..linalg import (
    DeflatedSpectrum,
    EigenMethod,
    SpectralDensity,
    count_outliers,
    default_density_probes,
    default_max_iter,
    deflated_spectrum,
    eigensolve,
    principal_angles,
    subspace_fraction,
    subspace_overlap,
)
from ..linalg.eigsh import product_error_floor
from ..reporting.figures import density_figure, layer_trace_figure
from ..reporting.media import Media
from ..settings import EigenSettings, OperatorSettings
from . import metrics as metric_table
from .base import LossFn, SpectralMonitor, current_learning_rate, training_step_loss
from .metrics import MetricSpec
from .schedule import DEFAULT_MAX_OVERHEAD

__all__ = ["HessianSpectrumMonitor", "SharpnessMonitor"]

PREFIX = "spectral/hessian/"
GGN_PREFIX = "spectral/ggn/"

#: Largest warm-start state (bytes) a checkpoint carries by default: a resumed run then
#: repeats the uninterrupted run's solves exactly. Beyond it the vectors are left out
#: (``checkpoint_warm_start=None``) and a resumed run's next solve starts cold.
WARM_START_CHECKPOINT_BYTES = 64 * 2**20


class _HessianMonitor(SpectralMonitor):
    """Shared set-up of the Hessian callbacks: loss, parameters, operator."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        """``arguments``: the subclass constructor's arguments (its ``locals()``), of which
        the solver and operator settings are built by name."""
        super().__init__(**self._base_arguments(arguments))
        loss_fn, warm_start = arguments["loss_fn"], arguments["warm_start"]
        checkpoint_warm_start = arguments["checkpoint_warm_start"]
        check_callable("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar", True, arguments=2)
        check_bool("warm_start", warm_start)
        if checkpoint_warm_start is not None:
            check_bool("checkpoint_warm_start", checkpoint_warm_start)
        #: The eigensolver's settings (``k``, ``tol``, ``method``, ``block_size``,
        #: ``max_iter``, ``max_basis``, ``seed``), checked when they were built.
        self.solver = EigenSettings.from_arguments(arguments)
        #: The curvature operator's settings (``params``, ``hvp``, ``reduction``, ``seed``;
        #: ``curvature``, ``ggn_loss``, ``outputs_fn`` for the spectrum).
        self.operator_settings = OperatorSettings.from_arguments(arguments)
        self.loss_fn = loss_fn
        self.warm_start = warm_start
        self.checkpoint_warm_start = checkpoint_warm_start
        self._start: torch.Tensor | None = None

    @property
    def curvature(self) -> Curvature:
        """Which curvature the monitor measures (``HessianSpectrumMonitor`` may measure
        ``"ggn"``)."""
        return self.operator_settings.curvature

    @property
    def prefix(self) -> str:
        """The start of every metric name: ``spectral/hessian/`` (``spectral/ggn/`` for the
        Gauss–Newton part; ``.../{name}/`` if named)."""
        base = GGN_PREFIX if self.curvature == "ggn" else PREFIX
        return base + (f"{self.name}/" if self.name else "")

    def state_key_fields(self) -> dict[str, Any]:
        # Settings that change the numbers, so that two monitors differing in them keep
        # apart in a checkpoint (and their metric names are then checked at setup).
        loss = None if self.loss_fn is None else _qualified_name(self.loss_fn)
        fields = {**super().state_key_fields(), "params": repr(self.operator_settings.params)}
        fields.update(tol=self.solver.tol, loss_fn=loss, reduction=self.operator_settings.reduction)
        return fields

    def warn_unconverged(
        self, what: str, error: float, value: float, operator: CurvatureOperator, flag: str
    ) -> None:
        """One warning that ``what`` missed ``tol``, so that its metric ``flag``
        (``..._converged``) is < 1: ``error`` is its error bound
        (:class:`~spectral_callbacks.linalg.EigenResult`)."""
        max_iter = self.solver.max_iter or default_max_iter(self.solver.k, operator.size)
        tol = self.solver.tol
        relative = error / abs(value) if value else math.inf
        # The relative error the products alone carry: no tol below it can be met.
        floor = product_error_floor(operator, 1.0)
        differences = bool(getattr(operator, "errors_vary_by_direction", False))
        if math.isinf(error) and differences:
            reason = (
                f"{what} cannot be bounded: gradient differences at this precision cannot "
                "resolve the curvature along its eigenvector (no step is both short enough "
                "for the loss and long enough for the rounding)"
            )
            advice = "measure with an exact product path or float32 parameters"
        elif tol < floor and relative <= 2.0 * floor:  # held by the products, not the budget
            dtype = str(operator.product_dtype).removeprefix("torch.")
            source = "gradient-difference products" if differences else f"products in {dtype}"
            reason = (
                f"{what} cannot reach tol={tol:g}: {source} carry a relative error of about "
                f"{floor:.2g}"
            )
            advice = f"loosen tol to at least {floor:.2g}"
        else:
            reason = f"{what} did not reach tol={tol:g} within max_iter={max_iter} products"
            advice = "raise max_iter or loosen tol"
            if tol < floor:
                advice += f" (to at least {floor:.2g}, the products' own error)"
        self.warn_once(
            f"unconverged {what}",
            f"{reason} (relative error bound {relative:.2g}); it is logged with "
            f"{flag} < 1: {advice}",
        )

    def out_of_memory_advice(self) -> str:
        return (
            "A measurement holds the first-order graph of every probe batch and the "
            "eigensolver's Krylov basis (up to max_basis parameter-sized vectors): use fewer "
            "probe_batches, a smaller max_basis, or fewer parameters with params=..."
        )

    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        select_parameters(module, self.operator_settings.params)  # names those that exist
        if self.loss_fn is None and not module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: the module uses manual optimization, so its training_step "
                "runs backward itself and cannot serve as the probe loss; pass loss_fn=..."
            )
        size = flat_size(module, self.operator_settings.params)
        self.solver.check_size(size, f"the number of selected parameters ({size})")

    def operator(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> CurvatureOperator:
        """The operator of :attr:`operator_settings` on ``probe``; under DDP every process
        contributes its probe shard and products are all-reduced."""
        return curvature_operator(
            module,
            self.probe_loss,
            Batches(probe),
            self.operator_settings,
            distributed=trainer.world_size > 1,
        )

    def probe_forward(self, module: pl.LightningModule, batch: Any) -> Any:
        return self.probe_loss(module, batch)

    @property
    def probe_loss(self) -> LossFn:
        """``loss_fn``, or the module's own ``training_step`` loss."""
        return self.loss_fn or training_step_loss

    def warm_start_state(self) -> dict[str, torch.Tensor | None]:
        """The vectors a resumed run needs to repeat the uninterrupted run's solves."""
        return {"start": self._start}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if not self.warm_start:
            return state
        vectors = self.warm_start_state()
        size = sum(v.numel() * v.element_size() for v in vectors.values() if v is not None)
        keep = self.checkpoint_warm_start
        if keep is None:
            keep = size <= WARM_START_CHECKPOINT_BYTES
            if not keep:
                self.warn_once(
                    "checkpoint",
                    f"the warm-start vectors ({size / 2**20:.0f} MiB) are left out of "
                    f"checkpoints (over {WARM_START_CHECKPOINT_BYTES / 2**20:.0f} MiB): a "
                    "resumed run starts its next solve cold; checkpoint_warm_start=True "
                    "keeps them",
                )
        if keep:
            state["warm_start"] = {
                name: None if vector is None else vector.detach().cpu()
                for name, vector in vectors.items()
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("warm_start") or {}
        for name in self.warm_start_state():
            setattr(self, f"_{name}", saved.get(name))

    def start_vectors(self, operator: CurvatureOperator) -> torch.Tensor | None:
        if not self.warm_start or self._start is None or self._start.shape[-1] != operator.size:
            return None
        return self._start


def _qualified_name(function: Any) -> str:
    """A name of ``function`` that is the same in every process and run."""
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}"


class SharpnessMonitor(_HessianMonitor):
    """Logs the sharpness λ_max (top Hessian eigenvalue) and the edge-of-stability ratio.

    λ_max is the largest eigenvalue of the loss Hessian on the probe data, by Lanczos to
    relative error bound ``tol`` (:mod:`spectral_callbacks.linalg.eigsh`), warm-started from
    the previous measurement's eigenvector.
    ``eos_ratio`` is 1.0 at the edge of stability of the *actual* optimizer (every optimizer
    of the module; each parameter moves by the one that holds it):
    ``λ_max(D̃^½ (H + W) D̃^½)`` with ``D̃`` its effective elementwise step over the stability
    threshold of its update and ``W`` its L2 weight decay
    (:mod:`spectral_callbacks.curvature.preconditioner` derives each). For SGD without
    momentum and one learning rate it is exactly ``λ_max · lr / 2``. Adaptive optimizers have
    no preconditioner before their first step: NaN then, by definition. An optimizer without
    a derivation, or gradient ascent (``maximize=True``), gets the stand-in
    ``λ_max · lr / 2`` and one warning; :class:`SpectralEarlyStopping` does not act on it.

    Metrics: one row each of :attr:`METRICS` (names, charts; docs/sharpness.md lists them
    with their meaning), under ``spectral/hessian/`` (``spectral/hessian/{name}/`` if named).

    Args:
        every_n_steps: Optimizer steps between measurements, or ``None`` (default): measure as
            often as ``max_overhead`` of the training time pays for
            (:mod:`~spectral_callbacks.callbacks.schedule`).
        probe_batches: Number of first training batches copied as probe data.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the module's own
            ``training_step`` (its ``self.log`` calls muted during the probe).
        tol: Relative tolerance on the error bound of λ_max (and of the preconditioned
            solve): ``residual²/gap`` where the next Ritz value certifies a gap, else the
            residual (:mod:`spectral_callbacks.linalg.eigsh`).
        probe_data: Explicit probe data (one batch or a list of batches).
        params: Parameter filter for the Hessian (default all trainable parameters).
        max_iter: Maximum Hessian-vector products per solve (default 100).
        seed: Seed of the start vector and of dropout masks during the probe.
        hvp: Hessian-vector product path (``"auto"``, ``"reuse_graph"``,
            ``"forward_over_reverse"``, ``"compiled"``: ``torch.compile`` once per run, then
            cheaper products; ``"gradient_difference"``: two first-order gradients per
            product, for losses without double backward, which ``"auto"`` switches to by
            itself; see :class:`~spectral_callbacks.curvature.HessianOperator`).
        eval_mode: Measure in eval mode (default: the mode training uses).
        warm_start: Start each measurement from the previous eigenvectors, which the
            monitor holds on the model's device between measurements (the vectors
            ``checkpoint_warm_start`` counts; ``False`` frees that memory for training).
        optimizer_aware: Compute ``eos_ratio`` from the optimizer (default); ``False`` logs
            ``λ_max · lr / 2`` whatever the optimizer.
        method: Eigensolver for λ_max and the preconditioned solve: ``"auto"`` (Lanczos, or
            block Lanczos when ``block_size`` is given), ``"lanczos"`` or
            ``"block_lanczos"`` (see :func:`~spectral_callbacks.linalg.eigenpairs`).
        block_size: Vectors per block of block Lanczos (default 4): each step applies the
            Hessian to a block at once, which the vmapped and compiled products batch.
        max_basis: Most parameter-sized Krylov vectors a Lanczos solve holds at once (at
            least 3 here); when they are used up the solve restarts from its best Ritz
            vectors. Default: all of them while they fit in 1 GiB, else as many as fit but
            at least 16 (:func:`~spectral_callbacks.linalg.lanczos`). Lower it for models
            whose parameter vectors are large next to free memory.
        reduction: What the loss is: ``"mean"`` (default) if ``loss_fn`` / ``training_step``
            returns a batch's mean loss (the probe's batches are weighted by size),
            ``"sum"`` if it returns the sum over the batch's samples (then the Hessian is
            that of the summed probe loss, ``Σ_b ∇²L_b``).
        name: Tells two monitors of this class apart (e.g. two losses): metric names
            become ``spectral/hessian/{name}/...`` and the name enters the state key.
        checkpoint_warm_start: Whether checkpoints carry the warm-start vectors, so a
            resumed run repeats the uninterrupted run's solves exactly: one parameter-sized
            vector for λ_max and one for the preconditioned solve (``4 n`` bytes each in
            float32, ``n`` the number of selected parameters). Default ``None``: while they
            take at most :data:`WARM_START_CHECKPOINT_BYTES` (64 MiB); ``False`` never.
        figure_every_n_steps: Unused (SharpnessMonitor draws no figures); for the family's
            signature.
        max_overhead: With ``every_n_steps=None``, the most the measurements may take of the
            training time (default 0.05: 5 %; see "What it costs" on the monitor's page).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        probe_batches: int = 1,
        loss_fn: LossFn | None = None,
        tol: float = 1e-3,
        probe_data: Any = None,
        params: ParameterFilter = None,
        max_iter: int | None = None,
        seed: int = 0,
        hvp: HvpPath = "auto",
        eval_mode: bool = False,
        warm_start: bool = True,
        optimizer_aware: bool = True,
        method: EigenMethod = "auto",
        block_size: int | None = None,
        max_basis: int | None = None,
        reduction: Reduction = "mean",
        name: str | None = None,
        checkpoint_warm_start: bool | None = None,
        figure_every_n_steps: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        super().__init__(locals())
        #: Whether ``eos_ratio`` comes from the optimizer (else ``λ_max · lr / 2``).
        self.optimizer_aware = check_bool("optimizer_aware", optimizer_aware)
        self._preconditioned_start: torch.Tensor | None = None
        self._undefined: set[str] = set()

    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        lr = current_learning_rate(trainer)
        with self.operator(trainer, module, probe) as operator:
            result = eigensolve(
                operator,
                self.solver,
                start=self.start_vectors(operator),
                return_eigenvectors=self.warm_start,
            )
            if result.eigenvectors is not None and result.all_converged:
                self._start = result.eigenvectors
            lambda_max = float(result.eigenvalues[0])
            residual = float(result.residuals[0])
            error = float(result.errors[0])
            if not result.all_converged:
                self.warn_unconverged(
                    "lambda_max", error, lambda_max, operator, "lambda_max_converged"
                )
            stability = self._stability(trainer, operator, lambda_max, lr)
            num_hvps = operator.num_hvps
        unbounded = ["lambda_max_error"] if math.isinf(error) else []  # its stated meaning
        self._undefined = {self.metric(row) for row in [*stability.undefined, *unbounded]}
        values = {
            "lambda_max": lambda_max,
            "eos_ratio": stability.eos_ratio,
            "preconditioned_sharpness": stability.preconditioned_sharpness,
            "stability_threshold": stability.threshold,
            "stability_limit": stability.limit,
            "lambda_max_residual": residual,
            "lambda_max_error": error,
            "lambda_max_converged": float(result.all_converged and stability.converged),
            "num_hvps": float(num_hvps),
        }
        return {self.metric(row): value for row, value in values.items()}

    def _stability(
        self, trainer: pl.Trainer, operator: CurvatureOperator, lambda_max: float, lr: float
    ) -> EdgeOfStability:
        stability = edge_of_stability(
            operator,
            list(getattr(trainer, "optimizers", []) or []),
            lambda_max,
            lr,
            self.solver,
            start=self._preconditioned_start if self.warm_start else None,
            optimizer_aware=self.optimizer_aware,
        )
        if stability.fallback is not None:
            message = (
                f"{stability.fallback}; eos_ratio is lambda_max * lr / 2 instead, which says "
                "nothing of this optimizer's stability, so no SpectralEarlyStopping rule acts "
                "on it (optimizer_aware=False makes it the ratio asked for)"
            )
            self.warn_once("optimizer", message)
        if stability.eigenvector is not None:
            self._preconditioned_start = stability.eigenvector
        if not stability.converged:
            self.warn_unconverged(  # the preconditioned solve's flag is λ_max's too
                "eos_ratio",
                stability.residual,
                stability.eos_ratio,
                operator,
                "lambda_max_converged",
            )
        return stability

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if not self.optimizer_aware or not optimizers:
            return
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        selected = select_parameters(pl_module, self.operator_settings.params)
        if not any(id(p) in held for _, p in selected):
            names = ", ".join(type(opt).__name__ for opt in optimizers)
            raise ValueError(
                f"{type(self).__name__}: the optimizer ({names}) holds none of the measured "
                "parameters, so eos_ratio would be 0: measure the parameters it trains "
                "(params=...) or pass optimizer_aware=False"
            )

    def undefined_metrics(self) -> set[str]:
        return self._undefined

    def warm_start_state(self) -> dict[str, torch.Tensor | None]:
        return {"start": self._start, "preconditioned_start": self._preconditioned_start}

    #: Every metric, its chart and whether NaN can be its value by definition.
    METRICS = (
        MetricSpec(
            "lambda_max",
            chart="λ_max against the stability limit",
            doc=(
                "top Hessian eigenvalue λ_max on the probe data (Lanczos, relative error bound "
                "≤ `tol`)"
            ),
        ),
        MetricSpec(
            "eos_ratio",
            chart="edge-of-stability ratio (1 = edge)",
            may_be_undefined=True,
            doc=(
                "1.0 at the edge of stability of the actual optimizer: `λ_max(D̃^½ (H + W) "
                "D̃^½)`; `λ_max · lr / 2` for plain SGD"
            ),
        ),
        MetricSpec(
            "preconditioned_sharpness",
            chart="preconditioned sharpness against its threshold",
            may_be_undefined=True,
            doc=(
                "`λ_max(D^½ (H + W) D^½)` for the optimizer's effective step `D` and L2 weight "
                "decay `W`; NaN where parameters differ in the threshold (an SGD part and an "
                "Adam part)"
            ),
        ),
        MetricSpec(
            "stability_threshold",
            chart="preconditioned sharpness against its threshold",
            may_be_undefined=True,
            doc=(
                "the constant it is compared with: 2 (SGD), `2 + 2β` (heavy ball), 38 (Adam, β₁ = "
                "0.9), ...; NaN where parameters differ in it"
            ),
        ),
        MetricSpec(
            "stability_limit",
            chart="λ_max against the stability limit",
            may_be_undefined=True,
            doc=(
                "the λ_max at which the ratio is 1 when the step, the weight decay and the "
                "threshold are each one scalar (`2/lr` for plain SGD); NaN otherwise (adaptive "
                "optimizers, parameter groups that differ in any of them)"
            ),
        ),
        MetricSpec("lambda_max_residual", doc="Ritz residual `‖H v − λ v‖` of the reported value"),
        MetricSpec(
            "lambda_max_error",
            doc="bound on the error of λ_max: `residual² / gap` where the next Ritz value "
            "certifies a gap, else the residual (at least what the products can resolve; "
            "infinite where gradient differences cannot resolve the curvature along its "
            "eigenvector)",
        ),
        MetricSpec(
            "lambda_max_converged",
            doc="1 if λ_max (and the preconditioned solve) met `tol`, else 0 (with one warning)",
        ),
        metric_table.overhead_row("sharpness_overhead"),
        MetricSpec(
            "num_hvps",
            chart="Hessian-vector products per measurement",
            doc="Hessian-vector products the measurement used",
        ),
    )

    METRIC_PREFIXES = (PREFIX,)
    OVERHEAD_ROW = "sharpness_overhead"

    def metric_names(self) -> list[str]:
        return metric_table.expand_names(self.METRICS, self.prefix)

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        category = "spectral: sharpness" + (f" ({self.name})" if self.name else "")
        return {category: metric_table.chart_layout(self.METRICS, self.prefix)}


_OVERLAPS = "gradient in the top-k space; top-k space kept since the last measurement"


class HessianSpectrumMonitor(_HessianMonitor):
    """Logs the top-``k`` Hessian eigenvalues, the trace and the eigenvalue density.

    Metrics: one row each of :attr:`METRICS` (docs/hessian-spectrum.md lists them with
    their meaning and the setting that turns each on), under ``spectral/hessian/`` (GGN:
    ``spectral/ggn/``). The trace and the density are both taken on the complement of the
    top-k Ritz vectors, from one set of Rademacher probes
    (:func:`~spectral_callbacks.linalg.deflated_spectrum`): the trace is the Ritz values'
    sum plus Hutchinson on the complement; the density holds the Ritz values as nodes of
    weight ``1/n`` and the stochastic Lanczos quadrature of the complement, whose masses,
    ``λ_min`` and bulk give the outlier count
    (:class:`~spectral_callbacks.linalg.SpectralDensity`,
    :func:`~spectral_callbacks.linalg.count_outliers`). TensorBoard also gets a histogram of
    the top-k values and a log-scale density figure.

    Cost per measurement, in Hessian-vector products: the top-k solve (fewer when
    warm-started), ``density_probes · density_steps`` for the density and
    ``trace_hvps - density_probes`` more for the trace (the density's recurrences start
    from the first trace probes, and their first steps are those probes' products);
    docs/hessian-spectrum.md has the measured split. Memory beyond the probe's first-order
    graphs: the top-k solve keeps its Krylov basis (one parameter-sized vector per step,
    allocated by doubling, or at most ``max_basis`` vectors: by default those that fit in
    1 GiB), and the density keeps ``density_probes · (density_steps + 1)`` such vectors
    while they fit in :data:`~spectral_callbacks.linalg.FULL_REORTHOGONALISATION_BYTES`,
    else three per probe, beside the ``trace_hvps`` probes.

    Args:
        every_n_steps: Optimizer steps between measurements, or ``None`` (default): measure as
            often as ``max_overhead`` of the training time pays for
            (:mod:`~spectral_callbacks.callbacks.schedule`).
        k: Number of top eigenvalues (at most the number of parameters, checked at setup).
        trace: Whether to estimate the trace.
        density: Whether to estimate the density (stochastic Lanczos quadrature).
        probe_batches: As for :class:`SharpnessMonitor`.
        loss_fn: As for :class:`SharpnessMonitor`.
        tol: As for :class:`SharpnessMonitor`.
        probe_data: As for :class:`SharpnessMonitor`.
        params: As for :class:`SharpnessMonitor`.
        seed: As for :class:`SharpnessMonitor`.
        hvp: As for :class:`SharpnessMonitor`.
        eval_mode: As for :class:`SharpnessMonitor`.
        warm_start: As for :class:`SharpnessMonitor`: here the ``k`` top eigenvectors are
            held on the model's device between measurements.
        method: Eigensolver, ``"auto"`` (Lanczos, or block Lanczos when ``block_size`` is
            given), ``"lanczos"`` or ``"block_lanczos"``.
        block_size: Vectors per block of block Lanczos (default 4); at least the
            multiplicity of a repeated eigenvalue that must be found more than once.
        max_basis: Most parameter-sized Krylov vectors the top-k Lanczos solve holds at
            once (at least ``k + 2``), as for :class:`SharpnessMonitor`; the default bound
            for large models is at least ``max(16, 2k + 12)``.
        trace_hvps: Rademacher probes of Hutchinson's estimator for the trace on the
            complement of the top-k Ritz vectors
            (:func:`~spectral_callbacks.linalg.deflated_hutchinson`), the first
            ``density_probes`` shared with the density; its standard error falls as
            ``1/sqrt(trace_hvps)``; at least the parameter count gives the exact trace.
        density_probes: Probes for the density; ``None`` (default) takes
            :func:`~spectral_callbacks.linalg.default_density_probes` of the parameter count
            (``⌈16384 / n⌉`` from 4 to 8: fewer probes scatter the outlier count and bulk
            edge of large models).
        density_steps: Lanczos steps per density probe.
        max_iter: Most Hessian-vector products of the top-k solve (default ``max(100, 20k)``).
        reduction: As for :class:`SharpnessMonitor`.
        name: As for :class:`SharpnessMonitor`.
        checkpoint_warm_start: as for :class:`SharpnessMonitor`; here the ``k`` top
            eigenvectors (``k · n`` entries in the solve's dtype).
        figure_every_n_steps: Optimizer steps between density and layer-trace figures
            (default ``10 · every_n_steps``; with the budget, every tenth measurement).
        gradient_overlap: Whether to log ``gradient_overlap`` (it needs the probe gradient).
        layer_traces: Hutchinson probes for the trace of each module's diagonal block
            ``H_ll`` (HAWQ-V2's per-layer sensitivity), logged as
            ``spectral/hessian/layer/{module}/trace``, ``.../trace_stderr`` and
            ``.../trace_per_param`` with a figure of the last by layer; costs that many
            products; 0 (default) off; at least the parameter count gives exact traces.
        curvature: ``"hessian"`` (default) or ``"ggn"``: the Gauss–Newton part
            ``G = Jᵀ H_out J`` (:class:`~spectral_callbacks.curvature.GGNOperator`), logged
            under ``spectral/ggn/`` (``eig_{i}``, ``trace``, the density, ...) so a Hessian
            monitor and a GGN monitor run side by side; needs ``ggn_loss`` and
            ``gradient_overlap=False``.
        ggn_loss: ``"cross_entropy"``, ``"mse"`` or ``"bce"``: the loss whose ``H_out`` is
            used (with ``reduction``).
        outputs_fn: ``outputs_fn(model, batch) -> (outputs, targets)`` for the GGN (default
            ``(model(x), y)`` of a batch ``(x, y)``).
        layer_lambda_max: Also log ``spectral/hessian/layer/{module}/lambda_max``, the top
            eigenvalue of each module's diagonal block (one Lanczos solve and one
            first-order graph per module, counted in ``spectrum_num_hvps``).
        sam_radius: SAM's radius ``ρ``: logs ``spectral/hessian/sam_sharpness``
            (``L(θ + ρ g/‖g‖) − L(θ)``) and ``sam_gradient_norm`` (``‖∇L(θ + ρ g/‖g‖)‖``),
            at three forward and two backward passes; ``None`` (default) off.
        max_overhead: With ``every_n_steps=None``, the most the measurements may take of the
            training time (default 0.05: 5 %; see "What it costs" on the monitor's page).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        k: int = 10,
        trace: bool = True,
        density: bool = True,
        probe_batches: int = 1,
        loss_fn: LossFn | None = None,
        tol: float = 1e-3,
        probe_data: Any = None,
        params: ParameterFilter = None,
        method: EigenMethod = "auto",
        trace_hvps: int = 33,
        density_probes: int | None = None,
        density_steps: int = 64,
        seed: int = 0,
        hvp: HvpPath = "auto",
        eval_mode: bool = False,
        warm_start: bool = True,
        block_size: int | None = None,
        max_basis: int | None = None,
        max_iter: int | None = None,
        reduction: Reduction = "mean",
        name: str | None = None,
        checkpoint_warm_start: bool | None = None,
        figure_every_n_steps: int | None = None,
        gradient_overlap: bool = True,
        layer_traces: int = 0,
        sam_radius: float | None = None,
        curvature: Curvature = "hessian",
        ggn_loss: GgnLoss | None = None,
        outputs_fn: Callable | None = None,
        layer_lambda_max: bool = False,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        super().__init__(locals())
        if curvature == "ggn" and (sam_radius is not None or gradient_overlap):
            raise ValueError(
                "curvature='ggn' measures G = Jᵀ H_out J alone: pass gradient_overlap=False "
                "and no sam_radius (they are properties of the loss, measured with the "
                "Hessian)"
            )
        check_bool("trace", trace)
        check_bool("density", density)
        check_integer("trace_hvps", trace_hvps, minimum=2)
        check_integer("density_probes", density_probes, minimum=1, allow_none=True)
        check_integer("density_steps", density_steps, minimum=1)
        self.trace = trace
        self.density = density
        self.trace_hvps = trace_hvps
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.gradient_overlap = check_bool("gradient_overlap", gradient_overlap)
        self.layer_traces = check_integer("layer_traces", layer_traces, minimum=0)
        if self.layer_traces == 1:
            raise ValueError("layer_traces must be 0 (off) or at least 2 probes, got 1")
        self.sam_radius = check_number(
            "sam_radius", sam_radius, minimum=0.0, inclusive=False, allow_none=True
        )
        self.layer_lambda_max = check_bool("layer_lambda_max", layer_lambda_max)
        if layer_lambda_max and curvature != "hessian":
            raise ValueError("layer_lambda_max applies to curvature='hessian'")
        self._layers: dict[str, int] = {}  # module -> parameter count, known at setup
        self.last_layer_traces: dict[str, float] = {}
        self.last_eigenvalues: torch.Tensor | None = None
        self.last_density: SpectralDensity | None = None

    def state_key_fields(self) -> dict[str, Any]:
        fields = {**super().state_key_fields(), "k": self.solver.k}
        if self.curvature != "hessian":
            fields["curvature"] = self.curvature
        return fields

    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        super().validate_setup(trainer, module)
        if self.layer_traces or self.layer_lambda_max:
            named = select_parameters(module, self.operator_settings.params)
            self._layers = module_groups([n for n, _ in named], [p.numel() for _, p in named])

    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with self.operator(trainer, module, probe) as operator:
            result = eigensolve(
                operator, self.solver, start=self.start_vectors(operator), return_eigenvectors=True
            )
            previous = self._start
            if previous is not None and previous.shape != result.eigenvectors.shape:
                previous = None
            if result.all_converged:
                self._start = result.eigenvectors
            self.last_eigenvalues = result.eigenvalues
            metrics.update(self._geometry(trainer, operator, result, previous))
            for i, value in enumerate(result.eigenvalues.tolist(), start=1):
                metrics[self.metric("eig_{i}", i=i)] = value
            metrics[self.metric("eigs_converged")] = float(result.converged.double().mean())
            if not result.all_converged:
                worst = int(torch.argmax(result.errors / result.eigenvalues.abs()))
                self.warn_unconverged(
                    "eigs",
                    float(result.errors[worst]),
                    float(result.eigenvalues[worst]),
                    operator,
                    "eigs_converged",
                )
            parts = DeflatedSpectrum(trace=None, density=None, num_hvps=0)
            if self.trace or self.density:
                # One set of probes: the density's recurrences start from the first trace
                # probes and give their quadratic forms (linalg.deflation).
                parts = deflated_spectrum(
                    operator,
                    result.eigenvectors,
                    result.eigenvalues,
                    trace_hvps=self.trace_hvps if self.trace else None,
                    density_probes=(
                        self.density_probes or default_density_probes(operator.size)
                        if self.density
                        else None
                    ),
                    density_steps=self.density_steps,
                    seed=self.solver.seed,
                    residuals=result.residuals,
                )
            if parts.trace is not None:
                metrics[self.metric("trace")] = parts.trace.estimate
                metrics[self.metric("trace_stderr")] = parts.trace.stderr
                metrics[self.metric("trace_lr_ratio")] = (
                    parts.trace.estimate * current_learning_rate(trainer) / 2.0
                )
            if parts.density is not None:
                self.last_density = parts.density
                metrics[self.metric("negative_mass")] = self.last_density.negative_mass
                metrics[self.metric("near_zero_mass")] = self.last_density.near_zero_mass
                metrics[self.metric("lambda_min")] = self.last_density.lambda_min
                metrics[self.metric("lambda_min_residual")] = self.last_density.lambda_min_residual
                report = count_outliers(result.eigenvalues, self.last_density, operator.size)
                metrics[self.metric("outliers")] = float(report.count)
                metrics[self.metric("bulk_edge")] = report.bulk_edge
            if self.layer_traces:
                metrics.update(self._layer_trace_metrics(operator))
            if self.layer_lambda_max:
                metrics.update(self._layer_lambda_max_metrics(trainer, module, probe, operator))
            if self.sam_radius is not None:
                # Last: moving the parameters drops the first-order graphs the rest reused.
                sam = sam_sharpness_of(operator, self.sam_radius)
                metrics[self.metric("sam_sharpness")] = sam.sharpness
                metrics[self.metric("sam_gradient_norm")] = sam.perturbed_gradient_norm
            metrics[self.metric("spectrum_num_hvps")] = float(operator.num_hvps)
        return metrics

    def _layer_lambda_max_metrics(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        probe: list[Any],
        whole: CurvatureOperator,
    ) -> dict[str, float]:
        """λ_max of each module's diagonal block: the Hessian restricted to its parameters."""
        results = layer_lambda_max(
            module,
            self.probe_loss,
            Batches(probe),
            self.operator_settings,
            tol=self.solver.tol,
            seed=self.solver.seed,
            distributed=trainer.world_size > 1,
        )
        whole.num_hvps += sum(result.num_hvps for result in results.values())
        return {
            self.metric("layer/{layer}/lambda_max", layer=layer): float(result.eigenvalues[0])
            for layer, result in results.items()
        }

    def _layer_trace_metrics(self, operator: CurvatureOperator) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.last_layer_traces = {}
        traces = layer_traces(operator, self.layer_traces, seed=self.solver.seed)
        for layer, (size, estimate) in traces.items():
            values = {
                "trace": estimate.estimate,
                "trace_stderr": estimate.stderr,
                "trace_per_param": estimate.estimate / size,
            }
            for row, value in values.items():
                metrics[self.metric("layer/{layer}/" + row, layer=layer)] = value
            self.last_layer_traces[layer] = estimate.estimate / size
        return metrics

    def _geometry(
        self,
        trainer: pl.Trainer,
        operator: CurvatureOperator,
        result: Any,
        previous: torch.Tensor | None,
    ) -> dict[str, float]:
        """Where the probe gradient points and how far the top-k space turned (no products)."""
        metrics: dict[str, float] = {}
        if self.gradient_overlap:
            metrics[self.metric("gradient_overlap")] = subspace_fraction(
                result.eigenvectors, operator.gradient()
            )
        # Logged once there are two converged measurements to compare (not at the first).
        if previous is not None and result.all_converged:
            vectors = result.eigenvectors
            metrics[self.metric("eigenspace_overlap")] = subspace_overlap(previous, vectors)
            metrics[self.metric("eigenspace_angle")] = float(
                principal_angles(previous, vectors).max()
            )
        return metrics

    #: Every metric, its chart and the setting that turns it on (``part``).
    METRICS = (
        MetricSpec(
            "eig_{i}", chart="top-k eigenvalues", doc="top-k eigenvalues, `eig_1` the largest"
        ),
        MetricSpec("eigs_converged", doc="fraction of the k that met `tol`"),
        MetricSpec(
            "gradient_overlap",
            chart=_OVERLAPS,
            part="gradient_overlap",
            doc=(
                "`‖V_kᵀ g‖² / ‖g‖²`: the share of the probe gradient in the top-k eigenspace "
                "(Gur-Ari et al. 2018)"
            ),
        ),
        MetricSpec(
            "eigenspace_overlap",
            chart=_OVERLAPS,
            doc=(
                "`‖V_prevᵀ V_k‖_F² / k` against the previous converged measurement: 1 when the "
                "sharp directions stayed, `k/n` for a random turn"
            ),
        ),
        MetricSpec(
            "eigenspace_angle",
            doc=(
                "the largest principal angle (radians) between the top-k spaces of the last two "
                "converged measurements"
            ),
        ),
        MetricSpec(
            "trace",
            chart="trace (Hutchinson deflated by the top k)",
            part="trace",
            doc=(
                "trace: Hutchinson on the complement of the top-k Ritz vectors plus their Ritz "
                "values"
            ),
        ),
        MetricSpec("trace_stderr", part="trace", doc="its standard error"),
        MetricSpec(
            "trace_lr_ratio",
            chart="trace · lr / 2 (SGD's trace stability, 1 = edge)",
            part="trace",
            doc="`tr H · lr / 2`: 1 is the edge of SGD's trace stability (Wu & Su 2023)",
        ),
        MetricSpec(
            "layer/{layer}/trace",
            part="layer_traces",
            doc="trace of the module's diagonal Hessian block (HAWQ-V2's sensitivity)",
        ),
        MetricSpec("layer/{layer}/trace_stderr", part="layer_traces", doc="its standard error"),
        MetricSpec(
            "layer/{layer}/trace_per_param",
            chart="trace per parameter by layer",
            part="layer_traces",
            doc="that trace over the module's parameter count",
        ),
        MetricSpec(
            "layer/{layer}/lambda_max",
            chart="λ_max of each layer's diagonal block",
            part="layer_lambda_max",
            doc="top eigenvalue of the module's diagonal Hessian block",
        ),
        MetricSpec(
            "sam_sharpness",
            chart="SAM sharpness L(θ + ρ ĝ) − L(θ)",
            part="sam",
            doc="SAM's sharpness `L(θ + ρ g/‖g‖) − L(θ)` at radius `sam_radius`",
        ),
        MetricSpec(
            "sam_gradient_norm", part="sam", doc="`‖∇L(θ + ρ g/‖g‖)‖` (first-order flatness)"
        ),
        MetricSpec(
            "negative_mass",
            chart="spectral mass below and near zero",
            part="density",
            doc="fraction of eigenvalues below −1 % of the spectral radius (SLQ, top k deflated)",
        ),
        MetricSpec(
            "near_zero_mass",
            chart="spectral mass below and near zero",
            part="density",
            doc=(
                "fraction of eigenvalues within ±1 % of the spectral radius around zero, whose "
                "sign SLQ cannot resolve"
            ),
        ),
        MetricSpec(
            "lambda_min",
            chart="smallest eigenvalue λ_min",
            part="density",
            doc=(
                "smallest eigenvalue (the most negative curvature) as the smallest Ritz value of "
                "the density's quadrature; no extra products"
            ),
        ),
        MetricSpec(
            "lambda_min_residual",
            part="density",
            doc=(
                "its Ritz residual, at least the error the products carry (10 unit roundoffs "
                "of their dtype, or the stated error of gradient differences, times the "
                "spectral radius)"
            ),
        ),
        MetricSpec(
            "outliers",
            chart="outliers above the bulk (of the top k)",
            part="density",
            doc="how many of the top-k stand apart from the bulk of the density",
        ),
        MetricSpec("bulk_edge", part="density", doc="where the bulk of the density ends"),
        MetricSpec("spectrum_num_hvps", doc="Hessian-vector products of the whole measurement"),
        metric_table.overhead_row("spectrum_overhead"),
    )

    METRIC_PREFIXES = (PREFIX, GGN_PREFIX)
    OVERHEAD_ROW = "spectrum_overhead"

    def metric_specs(self) -> list[MetricSpec]:
        """The rows of :attr:`METRICS` this monitor's settings turn on."""
        parts = {
            None: True,
            "gradient_overlap": self.gradient_overlap,
            "trace": self.trace,
            "layer_traces": bool(self.layer_traces),
            "layer_lambda_max": self.layer_lambda_max,
            "sam": self.sam_radius is not None,
            "density": self.density,
        }
        return [spec for spec in self.METRICS if parts[spec.part]]

    def metric_names(self) -> list[str]:
        specs = self.metric_specs()
        return metric_table.expand_names(specs, self.prefix, self.solver.k, list(self._layers))

    def nan_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        self.last_eigenvalues = None
        self.last_density = None
        return super().nan_metrics(trainer)

    def write_media(self, media: Media, step: int) -> None:
        if self.last_eigenvalues is not None:
            media.histogram(self.prefix + "top_k", self.last_eigenvalues, step)
        finite = all(math.isfinite(v) for v in self.last_layer_traces.values())
        if self.figures_due and self.last_layer_traces and finite:
            figure = layer_trace_figure(self.last_layer_traces, step)
            media.figure(self.prefix + "layer_traces", figure, step)
        density = self.last_density
        if self.figures_due and density is not None and bool(torch.isfinite(density.nodes).all()):
            media.figure(
                self.prefix + "density",
                density_figure(density, self.last_eigenvalues, step),
                step,
            )

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        charts = metric_table.chart_layout(self.metric_specs(), self.prefix)
        suffix = f" ({self.name})" if self.name else ""
        return {"spectral: Hessian spectrum" + suffix: charts}
