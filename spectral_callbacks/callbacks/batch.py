"""BatchSharpnessMonitor: the edge of stability of mini-batch SGD, on the training batches.

At a measured step it takes that step's own training batch (every micro-batch of it under
gradient accumulation, every process's shard under DDP), at the parameters the step's
gradient is taken at (before the optimizer updates them), with the module's own loss, and
computes ``q(B) = g_Bᵀ H_B g_B / ‖g_B‖²`` (:func:`~spectral_callbacks.curvature.batch_sharpness_of`:
one Hessian-vector product). No probe set.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any

import lightning.pytorch as pl

from .._checks import check_callable, check_integer
from ..curvature import (
    Batches,
    ParameterFilter,
    Reduction,
    batch_sharpness_of,
    curvature_operator,
    select_parameters,
)
from ..curvature.preconditioner import UnsupportedOptimizerError, stability_preconditioner
from ..settings import HvpPath, OperatorSettings
from . import metrics as metric_table
from .base import (
    LossFn,
    SpectralMonitor,
    _clone_batch,
    training_step_loss,
)
from .hessian import PREFIX, SharpnessMonitor
from .metrics import MetricSpec
from .schedule import DEFAULT_MAX_OVERHEAD

__all__ = ["BatchSharpnessMonitor"]


class BatchSharpnessMonitor(SpectralMonitor):
    """Logs batch sharpness, the curvature of each measured training batch's loss along its own
    gradient, against the stability threshold of the optimizer.

    Andreyev & Beneventano (Edge of Stochastic Stability, 2024) show that under mini-batch
    SGD the full-batch λ_max (:class:`~spectral_callbacks.SharpnessMonitor`) settles *below*
    ``2/η``, while batch sharpness ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` rises to about ``2/η`` and
    hovers there. At a measured step the monitor computes ``q(B)`` on that step's training
    batch (the union of its micro-batches under gradient accumulation; of every process's
    shard under DDP: the all-reduced gradient and product), at the parameters before the
    optimizer's update, with the module's own loss (``training_step``, its ``self.log``
    muted) or ``loss_fn``. It logs the mean of the last ``window`` measured values.

    Metrics: one row each of :attr:`METRICS` (docs/batch-sharpness.md lists them): the
    windowed ``batch_sharpness``, the last batch's ``q(B)``, and ``batch_eos_ratio``, 1.0 at
    the edge: ``batch_sharpness · lr / 2`` for SGD, ``· lr / (2 + 2β)`` with heavy-ball
    momentum β (any optimizer whose step is one scalar, with its L2 weight decay added, as
    for ``SharpnessMonitor``'s ``eos_ratio``). For Adam-family optimizers, whose step is
    elementwise, the ratio is NaN (undefined): compare ``batch_sharpness`` with
    ``SharpnessMonitor``'s preconditioned quantities instead.

    Cost: one Hessian-vector product per measurement (one forward pass and a backward pass
    that keeps its graph, then one backward pass through it); training is bit-identical.

    Args:
        every_n_steps: Optimizer steps between measurements, or ``None`` (default): as often
            as ``max_overhead`` of the training time pays for.
        window: How many of the most recent measured batches ``batch_sharpness`` averages
            (``window=1``: the value logged at step ``s`` is ``q(B_s)``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the module's own
            ``training_step`` loss (needed with manual optimization).
        params: Parameter filter (default all trainable parameters).
        hvp: Hessian-vector product path, as for :class:`~spectral_callbacks.SharpnessMonitor`.
        reduction: ``"mean"`` (default) or ``"sum"``: what the loss is, as for
            :class:`~spectral_callbacks.SharpnessMonitor`.
        seed: Seed of dropout masks during the measurement's forward passes.
        eval_mode: Measure in eval mode (default: the mode training uses).
        name: Tells two monitors of this class apart (``spectral/hessian/{name}/...``).
        max_overhead: With ``every_n_steps=None``, the most the measurements may take of the
            training time (default 0.05).
    """

    #: The probe is the step's own batch: nothing to copy or checkpoint.
    checkpoint_probe = False

    def __init__(
        self,
        every_n_steps: int | None = None,
        window: int = 10,
        loss_fn: LossFn | None = None,
        params: ParameterFilter = None,
        hvp: HvpPath = "auto",
        reduction: Reduction = "mean",
        seed: int = 0,
        eval_mode: bool = False,
        name: str | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        super().__init__(**self._base_arguments(locals()))
        self.window = check_integer("window", window, minimum=1)
        self.loss_fn = check_callable(
            "loss_fn", loss_fn, "loss_fn(model, batch) -> scalar", True, arguments=2
        )
        #: The operator's settings (``params``, ``hvp``, ``reduction``, ``seed``).
        self.operator_settings = OperatorSettings.from_arguments(locals())
        self._recent: deque[float] = deque(maxlen=self.window)
        self._step_batches: list[Any] = []
        self._measured_step: int | None = None
        self._undefined: set[str] = set()

    # -- the step's own batch -----------------------------------------------------------------
    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        select_parameters(module, self.operator_settings.params)
        if self.loss_fn is None and not module.automatic_optimization:
            raise ValueError(
                "BatchSharpnessMonitor: the module uses manual optimization, so its "
                "training_step runs backward itself and cannot serve as the loss; pass "
                "loss_fn=..."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Micro-batches since the last optimizer step make the step's batch; kept only for a
        # step that will be measured.
        if trainer.sanity_checking:
            return
        if self._due(trainer, trainer.global_step):
            self._step_batches.append(_clone_batch(batch))

    def _maybe_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measurements happen before the optimizer's update (:meth:`on_before_optimizer_step`)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """No probe to complete."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        if not self._step_batches or self._measured_step == step:
            return  # not due, or measured for an earlier optimizer of this step
        batches, self._step_batches = self._step_batches, []
        self._measured_step = step
        self.measure_and_publish(trainer, pl_module, Batches(batches), step)

    # -- the measurement ----------------------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        with curvature_operator(
            module,
            self.loss_fn or training_step_loss,
            probe,
            self.operator_settings,
            distributed=trainer.world_size > 1,
        ) as operator:
            sample = batch_sharpness_of(operator).value
            ratio_factor, self._undefined = self._ratio_factor(trainer, operator)
        if math.isfinite(sample):
            self._recent.append(sample)
        sharpness = sum(self._recent) / len(self._recent) if self._recent else math.nan
        values = {
            "batch_sharpness": sharpness,
            "batch_sharpness_sample": sample,
            "batch_eos_ratio": ratio_factor(sharpness),
        }
        return {self.metric(row): value for row, value in values.items()}

    def _ratio_factor(self, trainer: pl.Trainer, operator: Any):
        """``q ↦ (q + w) · step / c`` for an optimizer whose step is one scalar (``c`` its
        stability threshold, ``w`` its L2 weight decay), and the rows undefined otherwise."""
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        undefined = {self.metric("batch_eos_ratio")}
        try:
            preconditioner = stability_preconditioner(optimizers, operator.params)
        except (UnsupportedOptimizerError, ValueError):
            return (lambda q: math.nan), undefined
        step, threshold = preconditioner.uniform_step, preconditioner.uniform_threshold
        decay = preconditioner.weight_decay
        uniform_decay = float(decay.min()) == float(decay.max())
        if not (math.isfinite(step) and step > 0 and math.isfinite(threshold) and uniform_decay):
            return (lambda q: math.nan), undefined
        w = float(decay[0])
        return (lambda q: (q + w) * step / threshold), set()

    def undefined_metrics(self) -> set[str]:
        return self._undefined

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recent": list(self._recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._recent = deque(state_dict.get("recent", []), maxlen=self.window)
        self._step_batches, self._measured_step = [], None

    def state_key_fields(self) -> dict[str, Any]:
        fields = {**super().state_key_fields(), "window": self.window}
        fields.pop("probe_batches", None)
        fields.pop("explicit_probe", None)
        return fields

    # -- names and dashboards -----------------------------------------------------------------
    METRICS = (
        MetricSpec(
            "batch_sharpness",
            chart="batch sharpness against the stability limit",
            doc="mean of `q(B) = g_Bᵀ H_B g_B / ‖g_B‖²` over the last `window` measured "
            "training batches (Andreyev & Beneventano 2024)",
        ),
        MetricSpec(
            "batch_sharpness_sample",
            doc="`q(B)` of the measured step's own batch",
        ),
        MetricSpec(
            "batch_eos_ratio",
            chart="batch edge-of-stability ratio (1 = edge)",
            may_be_undefined=True,
            doc="`(batch_sharpness + w) · lr / c`: 1.0 at the edge, `c` the stability "
            "threshold of the update (2 for SGD, `2 + 2β` with momentum β), `w` the L2 "
            "weight decay; NaN (undefined) for optimizers with an elementwise step (Adam)",
        ),
        metric_table.overhead_row("batch_sharpness_overhead"),
    )
    METRIC_PREFIXES = (PREFIX,)
    OVERHEAD_ROW = "batch_sharpness_overhead"

    def metric_names(self) -> list[str]:
        return metric_table.expand_names(self.METRICS, self.prefix)

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        charts = metric_table.chart_layout(self.METRICS, self.prefix)
        # In SharpnessMonitor's section, beside λ_max; 2/lr is the limit of both.
        limit = re.escape(SharpnessMonitor.metric_key("stability_limit"))
        charts["batch sharpness against the stability limit"].append(limit)
        category = "spectral: sharpness" + (f" ({self.name})" if self.name else "")
        return {category: charts}
