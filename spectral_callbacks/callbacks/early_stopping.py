"""SpectralEarlyStopping: stop (or warn) on spectral signals, right when they are measured."""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from .._checks import check_bool, check_choice, check_integer, check_monitor_name, check_number
from ..representation import COLLAPSED
from . import metrics as metric_table
from .base import SpectralMonitor
from .hessian import HessianSpectrumMonitor, SharpnessMonitor
from .representation import RepresentationMonitor
from .weights import AVERAGE, WeightSpectrumMonitor

__all__ = ["RULES", "SpectralEarlyStopping"]

Rule = Literal["improvement", "above", "below", "collapse", "outside"]
RULES: tuple[str, ...] = get_args(Rule)
Action = Literal["stop", "warn"]
ACTIONS: tuple[str, ...] = get_args(Action)

#: Logged as 1 at the step a rule trips (``action="stop"`` or ``"warn"``).
TRIGGERED_METRIC = "spectral/early_stopping/triggered"


def producer_of(key: str) -> str | None:
    """The monitor whose metric table holds ``key`` (for the error on a key nobody logs),
    or ``None``."""
    from .batch import BatchSharpnessMonitor  # it imports this module's siblings

    monitors = (
        SharpnessMonitor,
        BatchSharpnessMonitor,
        HessianSpectrumMonitor,
        RepresentationMonitor,
        WeightSpectrumMonitor,
    )
    for monitor in monitors:
        if any(metric_table.matches(monitor.METRICS, p, key) for p in monitor.METRIC_PREFIXES):
            return monitor.__name__
    return None


class SpectralEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping``, checked right after each spectral measurement.

    It listens to this package's monitors: the check runs on the step a measurement of
    ``monitor`` is published (not at validation or epoch end), and ``patience`` counts
    measurements. The stock arguments keep their meaning (``monitor``, ``mode``,
    ``patience``, ``min_delta``, ``stopping_threshold``, ``divergence_threshold``,
    ``check_finite``, ``verbose``, ``strict``); ``rule`` picks the criterion:

    * ``"improvement"`` (default): the stock criterion, stop after ``patience`` measurements
      without an improvement of at least ``min_delta`` in direction ``mode``;
    * ``"above"``: stop after ``patience`` measurements in a row with ``value > threshold``;
    * ``"below"``: stop after ``patience`` measurements in a row with ``value < threshold``;
    * ``"collapse"``: stop after ``patience`` measurements in a row with
      ``value < fraction · peak`` (the peak since ``warmup_steps``), ``value < threshold``, or
      a value of 0 (no dimension left: the dimension measures of a dead layer,
      :data:`~spectral_callbacks.representation.COLLAPSED`);
    * ``"outside"``: stop after ``patience`` measurements in a row with the value outside
      ``band = (low, high)``.

    The presets :meth:`sharpness`, :meth:`rank_collapse` and :meth:`alpha_band` build the rules
    users ask for. Measurements before ``warmup_steps`` are ignored (RankMe collapses briefly
    early in training by design). With ``action="warn"`` a tripped rule warns instead of
    stopping. Either way the reason is printed, logged as ``spectral/early_stopping/triggered``
    = 1 at that step, and stored: ``stopped_reason``, ``stopped_step``, ``stopped_value`` (the
    first trip) and ``events`` (every trip). Under DDP the decision is reduced like
    ``EarlyStopping``'s (any rank stops all).

    Args:
        monitor: A metric key of this package's callbacks, e.g. ``"spectral/hessian/eos_ratio"``.
        rule: One of ``"improvement"``, ``"above"``, ``"below"``, ``"collapse"``,
            ``"outside"``.
        threshold: The bound of ``"above"`` / ``"below"``; the absolute floor of ``"collapse"``.
        fraction: ``"collapse"``: fraction of the peak below which the value has collapsed.
        band: ``"outside"``: the ``(low, high)`` the value must stay within.
        warmup_steps: Ignore measurements at ``global_step < warmup_steps``.
        action: ``"stop"`` or ``"warn"``.
        patience: Measurements in a row that must meet the rule (for ``"improvement"``:
            measurements without an improvement) before the run stops.
        mode: ``"min"`` or ``"max"``: the direction of improvement of ``"improvement"``
            (the other rules ignore it; ``"collapse"`` always tracks the maximum).
        **kwargs: The other arguments of ``EarlyStopping`` (``min_delta``, ``verbose``,
            ``check_finite``, ``stopping_threshold``, ``divergence_threshold``, ...).
    """

    def __init__(
        self,
        monitor: str,
        rule: Rule = "improvement",
        threshold: float | None = None,
        fraction: float | None = None,
        band: tuple[float, float] | None = None,
        warmup_steps: int = 0,
        action: Action = "stop",
        patience: int = 3,
        mode: Literal["min", "max"] = "min",
        **kwargs: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                f"monitor must be a metric name such as 'spectral/hessian/eos_ratio', "
                f"got {monitor!r}"
            )
        check_choice("rule", rule, RULES)
        check_choice("action", action, ACTIONS)
        check_choice("mode", mode, ("min", "max"))
        check_integer("warmup_steps", warmup_steps, minimum=0)
        check_integer("patience", patience, minimum=1)
        threshold = check_number("threshold", threshold, allow_none=True)
        if rule in ("above", "below") and threshold is None:
            raise ValueError(f"rule={rule!r} needs threshold=...")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
                raise TypeError(f"fraction must be a number in (0, 1), got {fraction!r}")
            if not 0 < fraction < 1:
                raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        if band is not None:
            if (
                not isinstance(band, (tuple, list))
                or len(band) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band)
                or not band[0] < band[1]
            ):
                raise ValueError(
                    f"band must be two numbers (low, high) with low < high, got {band!r}"
                )
            band = (float(band[0]), float(band[1]))
        if rule == "outside" and band is None:
            raise ValueError("rule='outside' needs band=(low, high)")
        if rule == "collapse" and fraction is None and threshold is None:
            raise ValueError("rule='collapse' needs fraction=... (of the peak) or threshold=...")
        check_number("min_delta", kwargs.get("min_delta", 0.0))
        for key in ("stopping_threshold", "divergence_threshold"):
            check_number(key, kwargs.get(key), allow_none=True)
        for key in ("check_finite", "verbose", "strict", "log_rank_zero_only"):
            if key in kwargs:
                check_bool(key, kwargs[key])
        kwargs.pop("check_on_train_epoch_end", None)
        super().__init__(monitor=monitor, patience=patience, mode=mode, **kwargs)
        self.rule = rule
        self.threshold = threshold
        self.fraction = fraction
        self.band = band
        self.warmup_steps = warmup_steps
        self.action = action
        self.violations = 0
        self.peak: float | None = None
        self.last_checked_step: int | None = None
        #: Measurements in a row whose value was undefined (for the one warning).
        self._undefined_in_a_row = 0
        self.stopped_reason: str | None = None
        self.stopped_step: int | None = None
        self.stopped_value: float | None = None
        self.events: list[tuple[int, float, str]] = []
        self._fresh_state = copy.deepcopy(self.state_dict())
        self._fit_trainer: pl.Trainer | None = None

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def sharpness(
        cls,
        margin: float = 0.1,
        patience: int = 3,
        monitor_name: str | None = None,
        **kwargs: Any,
    ) -> SpectralEarlyStopping:
        """Sharpness beyond the stability limit: ``eos_ratio > 1 + margin`` for ``patience``
        measurements in a row.

        Full-batch gradient descent hovers at ``eos_ratio ≈ 1`` (Cohen et al. 2021: the edge
        of stability); staying above ``1 + margin`` means the step size is past the edge and
        the run is catapulting or diverging. Needs a :class:`SharpnessMonitor` (the one
        given ``name=monitor_name``, if named).
        """
        check_number("margin", margin, minimum=0)
        return cls(
            SharpnessMonitor.metric_key(
                "eos_ratio", name=check_monitor_name("monitor_name", monitor_name)
            ),
            rule="above",
            threshold=1.0 + margin,
            patience=patience,
            **kwargs,
        )

    @classmethod
    def rank_collapse(
        cls,
        layer: str,
        fraction: float | None = 0.5,
        min_value: float | None = None,
        patience: int = 1,
        warmup_steps: int = 0,
        monitor_name: str | None = None,
        **kwargs: Any,
    ) -> SpectralEarlyStopping:
        """Representation collapse: RankMe of ``layer`` below ``fraction`` of its peak (or
        below ``min_value``, or 0: a layer whose outputs are all zero) for ``patience``
        measurements in a row.

        Garrido et al. (2023) show a collapsing RankMe precedes poor downstream performance in
        self-supervised training. Language models show a brief collapse during warmup by
        design, so set ``warmup_steps`` past it. Needs a :class:`RepresentationMonitor` with
        ``layer`` (the one given ``name=monitor_name``, if named).
        """
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"layer must be a layer name of a RepresentationMonitor, got {layer!r}")
        check_number("min_value", min_value, allow_none=True)
        return cls(
            RepresentationMonitor.metric_key(
                "{layer}/rankme", name=check_monitor_name("monitor_name", monitor_name), layer=layer
            ),
            rule="collapse",
            fraction=fraction,
            threshold=min_value,
            patience=patience,
            warmup_steps=warmup_steps,
            mode="max",
            **kwargs,
        )

    @classmethod
    def alpha_band(
        cls,
        low: float = 2.0,
        high: float = 6.0,
        layer: str | None = None,
        patience: int = 1,
        action: Action = "warn",
        warmup_steps: int = 0,
        monitor_name: str | None = None,
        **kwargs: Any,
    ) -> SpectralEarlyStopping:
        """Heavy-tailed self-regularisation: the mean α over layers (or ``layer``'s α) outside
        ``[low, high]`` for ``patience`` measurements in a row; warns by default.

        Martin & Mahoney (2021) read α near 2 as well trained, above about 6 as
        under-trained and below 2 as over-fitted or over-regularised, so the default band is
        ``[2, 6]``; an initialised network starts above it (set ``warmup_steps``). Needs a
        :class:`WeightSpectrumMonitor` (the one given ``name=monitor_name``, if named).
        """
        check_number("low", low)
        check_number("high", high)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"layer must be a layer name of a WeightSpectrumMonitor, got {layer!r}")
        row = "{layer}/alpha" if layer else f"{AVERAGE}/alpha"
        return cls(
            WeightSpectrumMonitor.metric_key(
                row, name=check_monitor_name("monitor_name", monitor_name), layer=layer
            ),
            rule="outside",
            band=(low, high),
            patience=patience,
            action=action,
            warmup_steps=warmup_steps,
            **kwargs,
        )

    # -- Lightning hooks -------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, rule=self.rule, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # As the monitors do: another Trainer starts a new run (its steps count from 0
        # again), with no violations, peak or stop of the last one; a checkpoint given to
        # fit() is loaded after setup.
        if self._fit_trainer is not None and self._fit_trainer is not trainer:
            self.load_state_dict(copy.deepcopy(self._fresh_state))
            self._undefined_in_a_row = 0
        self._fit_trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        producers = [cb for cb in trainer.callbacks if isinstance(cb, SpectralMonitor)]
        if any(cb.produces(self.monitor) for cb in producers):
            return
        producer = producer_of(self.monitor)
        present = [cb for cb in producers if type(cb).__name__ == producer]
        if present:
            # The monitor is there but logs other names: another layer or another name=.
            logged = sorted({name for cb in present for name in cb.metric_names()})
            close = difflib.get_close_matches(self.monitor, logged, n=3, cutoff=0.5)
            hint = (
                f"the Trainer's {producer} logs other names (watching another layer, or "
                f"given another name=?): close matches {close}"
                if close
                else f"the Trainer's {producer} logs other names, e.g. {logged[:3]}"
            )
            names = sorted({cb.name for cb in present if cb.name})
            if names:
                hint += f"; a preset watches a named monitor with monitor_name={names[0]!r}"
        elif producer:
            hint = f"add {producer} to the Trainer's callbacks"
        else:
            hint = "check the metric name"
        message = (
            f"SpectralEarlyStopping monitors {self.monitor!r}, which none of the Trainer's "
            f"callbacks logs; {hint}"
        )
        if self.strict:
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    # The stock checks at validation / epoch end are replaced by the measurement hook.
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def on_spectral_measurement(
        self,
        trainer: pl.Trainer,
        step: int,
        metrics: dict[str, float],
        undefined: frozenset[str] = frozenset(),
    ) -> None:
        """Called by a spectral monitor right after it publishes a measurement; ``undefined``
        names the metrics not defined for this run there, which are not checked: NaN by
        definition (an adaptive optimizer's ratio before its first step), where NaN is not a
        diverged run, or a stand-in the monitor warned about (``λ_max · lr / 2`` in place of
        the ratio of an optimizer without a derivation, such as LBFGS), which says nothing
        of the run's stability."""
        if self.monitor not in metrics or trainer.fast_dev_run or step == self.last_checked_step:
            return
        self.last_checked_step = step
        value = float(metrics[self.monitor])
        if step < self.warmup_steps:
            return
        # Undefined or not, the same on every process (the values are reduced), so no
        # process skips the decision's collective below while another waits in it.
        if self.monitor in undefined:
            self._undefined_in_a_row += 1
            if self._undefined_in_a_row == 2 and trainer.is_global_zero:
                warnings.warn(
                    f"SpectralEarlyStopping: {self.monitor} is not defined for this run at "
                    f"step {step} and the measurement before (NaN by definition, or a "
                    "stand-in the monitor warned about, e.g. for this run's optimizer); the "
                    "rule is not checked while it is (warned once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        self._undefined_in_a_row = 0
        should_stop, reason = self._evaluate(value)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)
        if not should_stop:
            return
        if reason is None:  # another rank tripped the rule
            reason = (
                f"{self.monitor}: another process tripped the {self.rule!r} rule at step {step}"
            )
        message = f"SpectralEarlyStopping at step {step}: {reason}"
        self.events.append((step, value, reason))
        if self.stopped_reason is None:
            self.stopped_reason, self.stopped_step, self.stopped_value = reason, step, value
        for logger in trainer.loggers:
            logger.log_metrics({TRIGGERED_METRIC: 1.0}, step=step)
        if self.action == "stop":
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            if trainer.is_global_zero:
                print(message + " Stopping training.")
        else:
            if trainer.is_global_zero:
                warnings.warn(
                    message + " (action='warn': training goes on)", RuntimeWarning, stacklevel=2
                )
            self.violations = 0

    # -- rules -----------------------------------------------------------------------------
    def _evaluate(self, value: float) -> tuple[bool, str | None]:
        if self.rule == "improvement":
            return self._evaluate_stopping_criteria(torch.tensor(value, dtype=torch.float64))
        if self.check_finite and not math.isfinite(value):
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            return True, f"{self.monitor} = {value} is not finite"
        if self.rule == "collapse" and math.isfinite(value):
            self.peak = value if self.peak is None else max(self.peak, value)
        violated, description = self._violation(value)
        self.violations = self.violations + 1 if violated else 0
        if self.violations >= self.patience:
            return True, f"{description} for {self.violations} measurement(s) in a row"
        return False, None

    def _violation(self, value: float) -> tuple[bool, str]:
        if self.rule == "above":
            return (
                value > self.threshold,
                f"{self.monitor} = {value:.4g} above {self.threshold:.4g}",
            )
        if self.rule == "below":
            return (
                value < self.threshold,
                f"{self.monitor} = {value:.4g} below {self.threshold:.4g}",
            )
        if self.rule == "outside":
            low, high = self.band
            return (
                not low <= value <= high,
                f"{self.monitor} = {value:.4g} outside [{low:.4g}, {high:.4g}]",
            )
        if self.threshold is not None and value < self.threshold:
            return True, f"{self.monitor} = {value:.4g} below the floor {self.threshold:.4g}"
        if value <= COLLAPSED:
            # No dimension left (a dead layer): collapsed whatever the peak, also a peak of 0.
            return True, f"{self.monitor} = {value:.4g}: no dimension left"
        if (
            self.fraction is not None
            and self.peak is not None
            and value < self.fraction * self.peak
        ):
            return True, (
                f"{self.monitor} = {value:.4g} collapsed below {self.fraction:g} "
                f"of its peak {self.peak:.4g}"
            )
        return False, ""

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            violations=self.violations,
            peak=self.peak,
            last_checked_step=self.last_checked_step,
            stopped_reason=self.stopped_reason,
            stopped_step=self.stopped_step,
            stopped_value=self.stopped_value,
            events=list(self.events),
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.violations = state_dict.get("violations", 0)
        self.peak = state_dict.get("peak")
        self.last_checked_step = state_dict.get("last_checked_step")
        self.stopped_reason = state_dict.get("stopped_reason")
        self.stopped_step = state_dict.get("stopped_step")
        self.stopped_value = state_dict.get("stopped_value")
        self.events = list(state_dict.get("events", []))
