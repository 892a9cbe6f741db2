"""What every spectral callback shares: schedule, probe data, isolation, publishing, state.

A subclass implements :meth:`SpectralMonitor.measure` (return the scalars of one measurement)
and optionally :meth:`SpectralMonitor.write_media` (histograms, figures, to every logger) and
:meth:`SpectralMonitor.chart_layout` (custom-scalars charts). Everything else here decides
*when* a measurement runs, *on what data*, and *where the numbers go*.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import math
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .._checks import check_bool, check_integer, check_monitor_name, check_number
from ..curvature.data import Batches, as_batch_list, fresh_batch, map_tensors, move_to_device
from ..curvature.isolation import ModelStateSnapshot, measurement_context, measurement_scope
from ..reporting.media import Media, media_sinks
from ..reporting.tensorboard import add_chart_layout, tensorboard_writers
from . import metrics as metric_table
from .metrics import MetricSpec
from .schedule import DEFAULT_MAX_OVERHEAD, BudgetSchedule, FixedSchedule

__all__ = ["SpectralMonitor", "training_step_loss"]


def _clone_batch(batch: Any) -> Any:
    """A copy of a batch whose tensors are detached clones (safe from in-place edits)."""
    return map_tensors(batch, lambda tensor: tensor.detach().clone(), other=copy.deepcopy)


def _accepts_batch_idx(module: pl.LightningModule) -> bool:
    try:
        parameters = inspect.signature(module.training_step).parameters
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


#: ``nn.Module``'s own attributes (parameters, buffers, submodules, hooks): restored when
#: reassigned, never rewritten in place (their contents are the model, not a step's state).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: Tensor attributes up to this size are copied before a step, to be put back if it changes
#: them in place; larger ones are left to the step (copying them at every probe call costs).
PRESERVED_TENSOR_BYTES = 16 * 2**20


#: Attribute types no step can change in place (skipped first: a transformer's modules hold
#: thousands of such attributes, and each probe call of the step reads them all).
_UNCHANGEABLE = frozenset({int, float, bool, str, bytes, tuple, type(None), torch.dtype})


def _saved_contents(value: Any) -> Any:
    """What a step could change in place of one attribute: a copy of a list, dict or set, a
    tensor's version and a copy of it (``None``: nothing watched)."""
    if isinstance(value, (list, dict, set)):
        return copy.copy(value)
    # The tensor test before the parameter test: isinstance(x, nn.Parameter) is slow, and the
    # modules of a transformer hold thousands of plain attributes.
    if (
        isinstance(value, torch.Tensor)
        and not isinstance(value, nn.Parameter)
        and value.numel() * value.element_size() <= PRESERVED_TENSOR_BYTES
    ):
        with torch.no_grad():
            return value._version, value.detach().clone()
    return None


def _same_items(value: Any, saved: Any) -> bool:
    """Whether a container holds the very objects it held (by identity: ``==`` of tensors
    is elementwise)."""
    if len(value) != len(saved):
        return False
    if isinstance(value, dict):
        return all(key in value and value[key] is item for key, item in saved.items())
    if isinstance(value, set):
        return value == saved
    return all(a is b for a, b in zip(value, saved, strict=True))


def _put_back_contents(current: dict[str, Any], key: str, saved: Any) -> None:
    value = current[key]
    if isinstance(value, torch.Tensor):
        version, copied = saved
        if value._version != version:
            # Rebound, not copied into: the changed tensor may be saved in an autograd graph.
            current[key] = copied
    elif isinstance(value, list) and not _same_items(value, saved):
        value[:] = saved
    elif isinstance(value, (dict, set)) and not _same_items(value, saved):
        value.clear()
        value.update(saved)


@contextlib.contextmanager
def preserved_attributes(module: nn.Module) -> Iterator[None]:
    """Put back the state ``module`` and its submodules keep in plain attributes, as it was
    before the block.

    A ``training_step`` may keep state between steps; a probe call must not pass as a
    training step there:

    * attributes (re)assigned inside the block (a recurrent model's ``self.hidden``) are
      put back, new ones removed;
    * lists, dicts and sets changed in place (Lightning's
      ``self.training_step_outputs.append(loss)``) get their contents back;
    * tensors changed in place (the states of a ``torchmetrics`` metric the step updates,
      ``self.tp += ...``; a tensor counter) are put back by a copy, up to
      :data:`PRESERVED_TENSOR_BYTES` each.

    Containers are put back one level deep (a list inside a dict changed in place is not),
    and ``nn.Module``'s own attributes (parameters, buffers, submodules) only when reassigned.
    """
    # A compiled product traces the step: there, a change in place to a tensor the step did
    # not create fails the compilation (the product falls back to eager, which puts it back),
    # and copies would only enter the graph.
    # (Without torch._dynamo imported nothing is compiling; importing it takes 0.2 s.)
    watch_contents = not ("torch._dynamo" in sys.modules and torch.compiler.is_compiling())
    saved = []
    for submodule in module.modules():
        attributes = dict(submodule.__dict__)
        contents = {}
        if watch_contents:
            for key, value in attributes.items():
                if type(value) in _UNCHANGEABLE or key in _MODULE_INTERNALS:
                    continue
                kept = _saved_contents(value)
                if kept is not None:
                    contents[key] = kept
        saved.append((submodule, attributes, contents))
    try:
        yield
    finally:
        for submodule, attributes, contents in saved:
            current = submodule.__dict__
            if current.keys() != attributes.keys() or any(
                current[key] is not value for key, value in attributes.items()
            ):
                for key in [key for key in current if key not in attributes]:
                    del current[key]
                current.update(attributes)
            for key, kept in contents.items():
                _put_back_contents(current, key, kept)


def as_loop_batch(
    trainer: pl.Trainer, module: pl.LightningModule, batch: Any, dataloader_idx: int = 0
) -> Any:
    """A loader's ``batch`` as Lightning's loops hand it to a step: converted by the
    precision plugin (a ``bf16-true`` model gets bfloat16 inputs), through the module's
    ``on_before_batch_transfer``, and moved by the strategy (``transfer_batch_to_device``,
    ``on_after_batch_transfer``)."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = module.on_before_batch_transfer(batch, dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


class SkippedBatchError(ValueError):
    """``training_step`` returned ``None`` on a batch it measured: Lightning's way to skip
    a batch, so there is no loss to differentiate."""


def training_step_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a LightningModule's own ``training_step`` returns on ``batch``.

    ``training_step`` may return the loss tensor or a dict with a ``"loss"`` entry. The
    callbacks call this with the module's ``self.log`` muted (:func:`muted_lightning_logging`);
    attributes the step assigns are put back afterwards (:func:`preserved_attributes`).

    Raises:
        SkippedBatchError: If it returns ``None`` (it skips the batch).
        ValueError: If it returns anything else that is not a loss.
    """
    with preserved_attributes(module):
        output = (
            module.training_step(batch, 0)
            if _accepts_batch_idx(module)
            else module.training_step(batch)
        )
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise ValueError(
                "training_step returned a dict without a 'loss' entry; "
                "pass loss_fn=... to the callback"
            )
        output = output["loss"]
    if output is None:
        raise SkippedBatchError(
            "training_step returned None (it skips this batch), so there is no loss to "
            "measure; pass loss_fn=lambda model, batch: ... to measure such batches"
        )
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"training_step returned {type(output).__name__}, not a loss tensor; pass "
            "loss_fn=lambda model, batch: ... to the callback"
        )
    return output


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log`` during a probe; one function object, so that a compiled
    Hessian-vector product (which guards on it) is not recompiled at every measurement."""


@contextlib.contextmanager
def muted_lightning_logging(module: nn.Module) -> Iterator[None]:
    """Make ``module.log`` / ``module.log_dict`` no-ops while a probe calls ``training_step``."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.__dict__["log"] = _ignore_log
    module.__dict__["log_dict"] = _ignore_log
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            del module.__dict__[name]
            if name in saved:
                module.__dict__[name] = saved[name]


@contextlib.contextmanager
def preserved_modes(module: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Optionally switch to eval mode; restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    if eval_mode:
        module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


class SpectralMonitor(Callback):
    """Base of the spectral callbacks: measures within an overhead budget, or every
    ``every_n_steps`` optimizer steps.

    Schedule: by ``trainer.global_step`` (optimizer steps, so gradient accumulation is
    handled). The first measurement runs as soon as the probe data is complete, which is
    before the first optimizer step (step 0) with the default ``probe_batches=1``. Later ones
    with ``every_n_steps=n``: after each optimizer step that makes ``global_step`` a multiple
    of ``n``. Without it (the default): as often as ``max_overhead`` of the training time
    pays for, dense early and sparser later (:mod:`~spectral_callbacks.callbacks.schedule`).
    No measurement during the sanity check; under ``fast_dev_run`` the one at step 0. Every
    measurement also logs the share of training time the monitor has spent so far (its
    ``*_overhead`` row).

    Probe data: the first ``probe_batches`` training batches, copied once (detached clones
    on the module's device) and reused by every measurement, so successive values are
    comparable; ``probe_data=`` (one batch or a list of batches) overrides.

    Settings are public attributes named as the arguments, as on Lightning's callbacks
    (``monitor.every_n_steps``, ``monitor.layers``), except the Hessian monitors' solver and
    operator settings, which are grouped in ``monitor.solver``
    (:class:`~spectral_callbacks.settings.EigenSettings`) and ``monitor.operator_settings``
    (:class:`~spectral_callbacks.settings.OperatorSettings`). They are checked by the
    constructor only: make a new monitor to change one.

    Args:
        every_n_steps: Optimizer steps between measurements (>= 1), or ``None`` (default in
            every monitor) for the overhead budget ``max_overhead``.
        probe_batches: Training batches to copy as probe data (>= 1).
        probe_data: Explicit probe data instead.
        eval_mode: Measure with the module in eval mode (modes are restored after); default
            measures in the mode training uses.
        name: Tells two instances of one class apart (two losses, two tolerances): it goes
            into every metric name and the checkpoint state key. Two monitors of one Trainer
            that would log the same metric names or share a state key are refused at setup.
        figure_every_n_steps: Optimizer steps between figures (images, tens of KB each,
            to every logger that takes them): at the first measurement, then at the first
            measurement at least this many steps after the last figure. Default
            ``10 · every_n_steps``, and with the budget every tenth measurement; scalars and
            histograms are written at every measurement.
        max_overhead: With ``every_n_steps=None``, the most the monitor's measurements may
            take of the training time (``0 < max_overhead < 1``; default 0.05, 5 %).
    """

    #: Whether checkpoints carry the probe data (so a resumed run measures the same data).
    checkpoint_probe = True
    #: Most measurements kept in :attr:`history` (and so in a checkpoint); the oldest go first.
    history_size = 1000
    #: The monitor's metric table (:mod:`~spectral_callbacks.callbacks.metrics`), one row
    #: per metric, and the prefixes its names can start with.
    METRICS: tuple[MetricSpec, ...] = ()
    METRIC_PREFIXES: tuple[str, ...] = ()
    #: The row of :attr:`METRICS` that holds the share of training time spent measuring.
    OVERHEAD_ROW: str | None = None
    #: The clock measurements and training are timed by (tests replace it).
    clock: Callable[[], float] = staticmethod(time.perf_counter)
    #: A measurement that takes at least this many seconds is reported once (INFO, through
    #: Lightning's console logger), with when the next one comes: the progress bar stands
    #: still meanwhile, and the first measurement comes whatever it costs.
    SLOW_MEASUREMENT_SECONDS = 30.0

    @classmethod
    def _base_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments of :class:`SpectralMonitor`'s constructor among ``arguments`` (a
        subclass constructor's ``locals()``); those a subclass does not take keep their
        defaults here."""
        names = tuple(inspect.signature(SpectralMonitor.__init__).parameters)[1:]
        return {name: arguments[name] for name in names if name in arguments}

    def __init__(
        self,
        every_n_steps: int | None,
        probe_batches: int = 1,
        probe_data: Any = None,
        eval_mode: bool = False,
        name: str | None = None,
        figure_every_n_steps: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        super().__init__()
        every_n_steps = check_integer("every_n_steps", every_n_steps, minimum=1, allow_none=True)
        max_overhead = check_number(
            "max_overhead", max_overhead, minimum=0.0, maximum=1.0, inclusive=False
        )
        probe_batches = check_integer("probe_batches", probe_batches, minimum=1)
        check_bool("eval_mode", eval_mode)
        figure_every_n_steps = check_integer(
            "figure_every_n_steps", figure_every_n_steps, minimum=1, allow_none=True
        )
        _check_probe_data(probe_data)
        check_monitor_name("name", name)
        #: The instance's name (metric names and state key), or ``None``.
        self.name = name
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self._schedule = (
            BudgetSchedule(max_overhead) if every_n_steps is None else FixedSchedule(every_n_steps)
        )
        self._spent = 0.0  # seconds measuring and publishing, this run and before
        self._trained_before = 0.0  # seconds trained before this session (from a checkpoint)
        self._session_start: float | None = None
        self._session_end: float | None = None
        self._session_start_step = 0
        self._trainer: pl.Trainer | None = None  # of the last fit (from its setup)
        self.probe_batches = probe_batches
        self.probe_data = probe_data
        self.eval_mode = eval_mode
        self.figure_every_n_steps = figure_every_n_steps or (
            None if every_n_steps is None else 10 * every_n_steps
        )
        self._last_figure_step: int | None = None
        #: Whether the measurement being published writes figures (see figure_every_n_steps).
        self.figures_due = False
        self._probe: list[Any] = []
        self._probe_complete = False
        self._last_step: int | None = None
        self._warned: set[str] = set()
        #: Values of the last measurement (metric name -> float).
        self.last_metrics: dict[str, float] = {}
        #: The last :attr:`history_size` measurements: (global_step, metrics).
        self.history: list[tuple[int, dict[str, float]]] = []
        #: Measurements so far (all of them, also those gone from the history).
        self.num_measurements = 0
        self._pending_probe_tensors: list[list[torch.Tensor]] | None = None

    # -- to implement ----------------------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        """Compute one measurement on ``probe``; return metric name -> value."""
        raise NotImplementedError

    def metric_names(self) -> list[str]:
        """Every metric name a measurement of this callback publishes."""
        raise NotImplementedError

    @property
    def prefix(self) -> str:
        """The start of every metric name of this monitor (its ``METRIC_PREFIXES`` entry,
        then ``{name}/`` if named)."""
        return self.METRIC_PREFIXES[0] + (f"{self.name}/" if self.name else "")

    def metric_specs(self) -> Sequence[MetricSpec]:
        """The rows of :attr:`METRICS` this monitor's settings turn on (all by default)."""
        return self.METRICS

    def metric(self, row: str, **fields: Any) -> str:
        """The full name of row ``row`` of the metric table, e.g.
        ``monitor.metric("eig_{i}", i=1)``; ``KeyError`` for a name that has no row."""
        return metric_table.full_name(self.metric_specs(), self.prefix, row, **fields)

    @classmethod
    def metric_key(cls, row: str, *, name: str | None = None, **fields: Any) -> str:
        """The name row ``row`` has on a monitor of this class, unnamed or given ``name``
        (what the :class:`~spectral_callbacks.SpectralEarlyStopping` presets watch)."""
        prefix = cls.METRIC_PREFIXES[0] + (f"{name}/" if name else "")
        return metric_table.full_name(cls.METRICS, prefix, row, **fields)

    def produces(self, name: str) -> bool:
        """Whether this callback publishes metric ``name``."""
        return name in self.metric_names()

    def nan_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The metrics to log (as NaN) when a measurement hits a non-finite loss."""
        return dict.fromkeys(self.metric_names(), math.nan)

    def write_media(self, media: Media, step: int) -> None:
        """Write the histograms and figures of the last measurement to ``media`` (every
        logger's sink: :mod:`spectral_callbacks.reporting.media`)."""

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        """Custom-scalars charts: category -> {chart title: [tags or regexes]}."""
        return {}

    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Check arguments against the model; raise ``ValueError`` naming the argument."""

    def probe_is_complete(self, trainer: pl.Trainer, probe: list[Any]) -> bool:
        """Whether the batches collected so far make the whole probe.

        Under DDP every process must decide alike (the measurement that follows runs
        collectives), so a decision that depends on a process's own shard is reduced.
        """
        return len(probe) >= self.probe_batches

    # -- Lightning hooks ---------------------------------------------------------------------
    def state_key_fields(self) -> dict[str, Any]:
        """Settings that tell two instances of one callback class apart in a checkpoint."""
        fields = {
            "every_n_steps": self.every_n_steps,
            **({"max_overhead": self.max_overhead} if self.every_n_steps is None else {}),
            "probe_batches": self.probe_batches,
            "explicit_probe": self.probe_data is not None,
            "eval_mode": self.eval_mode,
        }
        if self.name is not None:
            fields["name"] = self.name
        return fields

    @property
    def state_key(self) -> str:
        # Lightning reads the key at every hook of every step (profiler labels): built once,
        # from settings that are fixed at construction.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(**self.state_key_fields())
        _refuse_twins_at_trainer_init(self, key)
        return key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.begin_fit(trainer)
        self._refuse_lazy_parameters(pl_module)
        self.validate_setup(trainer, pl_module)  # may resolve what metric_names depend on
        self._refuse_twins(trainer)
        if self.probe_data is not None and not self._probe_complete:
            try:
                batches = as_batch_list(self.probe_data)
            except ValueError as error:
                raise ValueError(f"probe_data: {error}") from None
            # As Lightning does to training batches: a 16-bit model ("bf16-true") gets its
            # floating inputs in its own dtype.
            convert = trainer.precision_plugin.convert_input
            self._probe = [_clone_batch(convert(b)) for b in batches]
            self._probe_complete = True

    def begin_fit(self, trainer: pl.Trainer) -> None:
        """A fit under another Trainer than the last one starts a new run: its steps count
        from 0 again, so the last run's schedule, history, probe and warm starts would be
        misplaced in it (under the overhead budget it would not measure at all). The monitor
        takes a fresh monitor's state, and warns afresh; a checkpoint given to ``fit`` is
        loaded after ``setup`` and restores its own."""
        if self._trainer is not None and self._trainer is not trainer:
            self.load_state_dict({})
            self._warned = set()
        self._trainer = trainer

    def _refuse_twins(self, trainer: pl.Trainer) -> None:
        """Two monitors that would overwrite each other's metrics or checkpoint state."""
        for other in trainer.callbacks:
            if other is self or not isinstance(other, SpectralMonitor):
                continue
            shared = sorted(set(self.metric_names()) & set(other.metric_names()))
            if shared:
                raise TwinMonitorError(self, f"metric {shared[0]!r}")

    def _refuse_lazy_parameters(self, module: nn.Module) -> None:
        """Parameters of lazy modules (``nn.LazyLinear``) take their shapes at the first
        forward. The first measurement comes before the first training step, and would
        initialise them itself, from the monitor's random state instead of the run's."""
        lazy = [n for n, p in module.named_parameters() if nn.parameter.is_lazy(p)]
        if lazy:
            names = ", ".join(lazy[:3]) + (f" and {len(lazy) - 3} more" if len(lazy) > 3 else "")
            raise ValueError(
                f"{type(self).__name__}: parameters {names} are not initialised yet (lazy "
                "modules take their shapes at the first forward); run the model once on an "
                "example batch before fit, e.g. model(next(iter(loader))[0])"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session_start, self._session_end = self.clock(), None
        self._session_start_step = trainer.global_step
        _MEASURING.setdefault(trainer, 0.0)
        for writer in tensorboard_writers(trainer.loggers):
            for category, charts in self.chart_layout().items():
                add_chart_layout(writer, category, charts)
        if self.probe_data is not None:
            self._check_probe_fits(pl_module)

    def probe_forward(self, module: pl.LightningModule, batch: Any) -> Any:
        """What a measurement runs on a probe batch (the loss, the forward pass), to check
        explicit ``probe_data`` against the model before training; nothing by default."""

    def _check_probe_fits(self, module: pl.LightningModule) -> None:
        """One isolated, gradient-free :meth:`probe_forward` of the first probe batch, so that
        ``probe_data`` the model cannot take is refused by name before the first step."""
        device = next(module.parameters()).device
        batch = move_to_device(self._probe[0], device)
        written_state = ModelStateSnapshot(module)
        try:
            with (
                preserved_modes(module, self.eval_mode),
                muted_lightning_logging(module),
                measurement_context(module, 0, second_order=False),
            ):
                self.probe_forward(module, fresh_batch(batch))
        except Exception as error:
            raise ValueError(
                f"{type(self).__name__}: probe_data does not fit the model ({type(error).__name__}:"
                f" {error}); pass batches as the model's training step takes them"
            ) from error
        finally:
            written_state.restore()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_probe_tensors is not None:
            self._rebuild_probe(batch)
        if not self._probe_complete:
            self._probe.append(_clone_batch(batch))
            self._probe_complete = self.probe_is_complete(trainer, self._probe)
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session_end = self.clock()  # the share spent stays that of the run

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch shorter than the probe: measure on what was collected (on every process,
        # if any process collected something: the measurement runs collectives).
        if not self._probe_complete and reduce_scalar(trainer, len(self._probe), "sum") > 0:
            self._probe_complete = True
            self.warn_once("probe", self.short_probe_message(trainer))
            self._maybe_measure(trainer, pl_module)

    def short_probe_message(self, trainer: pl.Trainer) -> str:
        """What a probe cut short by the end of an epoch holds (for the warning)."""
        return (
            f"probe_batches={self.probe_batches}, but the epoch ended after {len(self._probe)} "
            f"batch(es): measuring on those {len(self._probe)}"
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "last_step": self._last_step,
            "last_metrics": dict(self.last_metrics),
            "history": [(step, dict(values)) for step, values in self.history],
            "num_measurements": self.num_measurements,
            "last_figure_step": self._last_figure_step,
            "schedule": self._schedule.state_dict(),
            "spent": self._spent,
            "trained": self._trained_locally(),
            "probe": None,
        }
        if self._probe_complete and self.checkpoint_probe:
            state.update(_checkpointable_probe(self._probe))
        return state

    #: Settings whose change between a checkpoint and the resumed run leaves the saved state
    #: (history, probe, warm starts) valid: it is carried over, with one warning.
    CARRIED_SETTINGS = frozenset({"every_n_steps", "max_overhead", "tol"})

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint whose state of this monitor was saved under other settings: Lightning
        would drop it without a word (the state key names the settings). Say which settings
        changed, and carry the state over where they leave it valid (``CARRIED_SETTINGS``)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        fields = self.state_key_fields()
        for key, state in states.items():
            saved = _state_key_fields(key, type(self).__qualname__)
            if saved is None or saved.get("name") != fields.get("name"):
                continue
            changed = sorted(
                k for k in saved.keys() | fields.keys() if saved.get(k) != fields.get(k)
            )
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={fields.get(k)!r}" for k in changed)
            if set(changed) <= self.CARRIED_SETTINGS:
                self.load_state_dict(state)
                outcome = "its history, probe and warm starts are carried over"
            else:
                outcome = (
                    "its history, probe and warm starts do not fit them and are not carried "
                    "over: the monitor measures afresh"
                )
            self.warn_once(
                "resume",
                f"the checkpoint's state of this monitor was saved with {was}; this run has "
                f"{now}: {outcome}",
            )
            return

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The run state ``state_dict`` holds; what it lacks is a fresh monitor's (so ``{}``
        starts a new run)."""
        self._last_step = state_dict.get("last_step")
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.history = [(step, dict(values)) for step, values in state_dict.get("history", [])]
        self.num_measurements = state_dict.get("num_measurements", len(self.history))
        self._last_figure_step = state_dict.get("last_figure_step")
        self._schedule.load_state_dict(state_dict.get("schedule", {}))
        self._spent = float(state_dict.get("spent", 0.0))
        self._trained_before = float(state_dict.get("trained", 0.0))
        if self.probe_data is not None:
            return
        self._probe, self._probe_complete, self._pending_probe_tensors = [], False, None
        probe = state_dict.get("probe")
        if probe is not None:
            self._probe = list(probe)
            self._probe_complete = True
        elif state_dict.get("probe_tensors") is not None:
            # Batches of the user's own types: their tensors were saved, their structure is
            # taken from the first training batch of the resumed run (same loader, same type).
            self._pending_probe_tensors = [list(t) for t in state_dict["probe_tensors"]]

    def _rebuild_probe(self, template: Any) -> None:
        saved, self._pending_probe_tensors = self._pending_probe_tensors, None
        rebuilt = [_fill_tensors(template, tensors) for tensors in saved]
        if any(batch is None for batch in rebuilt):
            self.warn_once(
                "probe",
                f"the checkpoint's probe batches do not fit the structure of the resumed run's "
                f"batches ({type(template).__name__}); collecting the probe anew, so values "
                "after the resume are measured on other data",
            )
            return
        self._probe = rebuilt
        self._probe_complete = True

    # -- machinery ---------------------------------------------------------------------------
    def _due(self, trainer: pl.Trainer, step: int) -> bool:
        if self._last_step is None:
            return True
        if trainer.fast_dev_run:
            return False  # a smoke run: one measurement proves the wiring
        return self._schedule.due(step, self._last_step, lambda: self._trained(trainer))

    def _trained_locally(self) -> float:
        """Seconds this process has trained: since the session began, less every monitor's
        measurements, plus what the checkpoint says was trained before."""
        if self._session_start is None or self._trainer is None:
            return self._trained_before
        if self._trainer.global_step == self._session_start_step:
            return self._trained_before  # no training step yet in this session
        now = self.clock() if self._session_end is None else self._session_end
        elapsed = now - self._session_start - _MEASURING.get(self._trainer, 0.0)
        return self._trained_before + max(elapsed, 0.0)

    def _trained(self, trainer: pl.Trainer) -> float:
        """:meth:`_trained_locally`, the same on every process (their maximum)."""
        return reduce_scalar(trainer, self._trained_locally(), "max")

    @property
    def overhead(self) -> float:
        """The share of the training time this monitor has spent measuring (NaN before any
        training was timed)."""
        trained = self._trained_locally()
        return self._spent / trained if trained > 0 else math.nan

    def _maybe_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._probe_complete:
            return
        step = trainer.global_step
        if not self._due(trainer, step):
            return
        device = next(pl_module.parameters()).device
        # Batches: a probe of one tensor batch, [x], must not read as the batch [x, y].
        probe = Batches(move_to_device(b, device) for b in self._probe)
        self._probe = probe
        self.measure_and_publish(trainer, pl_module, probe, step)

    def measure_and_publish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batches, step: int
    ) -> None:
        """One measurement on ``probe`` at ``step``, isolated from training (modes, logging),
        its failures logged as NaN with one warning, its metrics published, and the seconds
        of both accounted (the share logged with a measurement counts the publishing, such
        as figures, of the earlier ones)."""
        self._last_step = step
        began = self.clock()
        device = next(pl_module.parameters()).device
        out_of_memory = None
        failed = True  # a failure below warns for itself, not again as a non-finite value
        with (
            preserved_modes(pl_module, self.eval_mode),
            muted_lightning_logging(pl_module),
            measurement_scope(pl_module),
        ):
            try:
                metrics = self.measure(trainer, pl_module, probe)
                failed = False
            except FloatingPointError as error:
                metrics = self.nan_metrics(trainer)
                self.warn_once(
                    "non-finite", f"non-finite value at step {step} ({error}); logging NaN"
                )
            except torch.cuda.OutOfMemoryError as error:
                if trainer.world_size > 1:
                    raise  # the other processes wait in this measurement's all-reduces
                metrics = self.nan_metrics(trainer)
                out_of_memory = str(error).splitlines()[0] if str(error) else "no message"
            except SkippedBatchError as error:
                if trainer.world_size > 1:
                    raise  # as above: the other processes may have a loss and wait
                metrics = self.nan_metrics(trainer)
                self.warn_once("skipped", f"{error}; at step {step} NaN is logged")
        if out_of_memory is not None:
            # Outside the except block, so the failed measurement's tensors are freed first.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.warn_once(
                "out-of-memory",
                f"out of device memory at step {step} ({out_of_memory}); logging NaN. "
                + self.out_of_memory_advice(),
            )
        # What a failed measurement leaves is a failure, whatever the last one left undefined.
        undefined = set() if failed else self.undefined_metrics()
        finite = all(math.isfinite(v) for k, v in metrics.items() if k not in undefined)
        if not failed and not finite:
            self.warn_once("non-finite", f"non-finite spectral value at step {step}; logging it")
        seconds = self.clock() - began
        self._record_cost(trainer, step, seconds, metrics)
        self._report_slow_measurement(step, seconds)
        began = self.clock()
        self._publish(trainer, metrics, step, frozenset(undefined))
        self._record_publishing(trainer, self.clock() - began)

    def _record_cost(
        self, trainer: pl.Trainer, step: int, seconds: float, metrics: dict[str, float]
    ) -> None:
        """Account a measurement's seconds, let the schedule place the next one, and add the
        share spent so far to ``metrics`` (the same numbers on every process)."""
        if self._trainer is not None:
            _MEASURING[self._trainer] = _MEASURING.get(self._trainer, 0.0) + seconds
        cost = reduce_scalar(trainer, seconds, "max")
        trained = self._trained(trainer)
        self._spent += cost
        self._schedule.record(step, cost, trained)
        if self.OVERHEAD_ROW is not None:
            share = self._spent / trained if trained > 0 else math.nan
            metrics[self.metric(self.OVERHEAD_ROW)] = share

    def _report_slow_measurement(self, step: int, seconds: float) -> None:
        """Say once, on the first process, that a measurement took
        :attr:`SLOW_MEASUREMENT_SECONDS` or more, and when the schedule measures next."""
        if seconds < self.SLOW_MEASUREMENT_SECONDS or "slow" in self._warned:
            return
        self._warned.add("slow")
        if self.every_n_steps is not None:
            then = f"with every_n_steps={self.every_n_steps} it recurs every {self.every_n_steps}"
            then += " steps"
        else:
            # This process's seconds: a reduce here would wait for processes that are not slow.
            owed = self._schedule.owed(self._trained_locally())
            then = (
                f"with max_overhead={self.max_overhead:g} the next one comes once training has "
                f"paid for it, after about {max(owed, 0.0):,.0f} s more of training"
            )
        rank_zero_info(
            f"{type(self).__name__}: the measurement at step {step} took {seconds:,.0f} s; "
            f'{then} ("What it costs" on the monitor\'s page says what makes it cheaper)'
        )

    def _record_publishing(self, trainer: pl.Trainer, seconds: float) -> None:
        """Account the seconds of publishing a measurement (loggers, figures): they count in
        the budget as measuring does, from the next decision on (the same on every process,
        though only the first one draws figures)."""
        if self._trainer is not None:
            _MEASURING[self._trainer] = _MEASURING.get(self._trainer, 0.0) + seconds
        cost = reduce_scalar(trainer, seconds, "max")
        self._spent += cost
        self._schedule.add(cost)

    def undefined_metrics(self) -> set[str]:
        """Metrics of the last measurement that are not finite by definition, not by a
        numerical failure (no warning for those), e.g. an adaptive optimizer's ratio before
        its first step (NaN) or an error bound the products cannot give (infinite)."""
        return set()

    def out_of_memory_advice(self) -> str:
        """What a measurement holds in memory and how to make it smaller (for the warning)."""
        return "Use a smaller probe."

    def warn_once(self, topic: str, message: str) -> None:
        """Warn about ``topic`` the first time only; the run carries on either way."""
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(
                f"{type(self).__name__}: {message} (warned once; training goes on)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _publish(
        self,
        trainer: pl.Trainer,
        metrics: dict[str, float],
        step: int,
        undefined: frozenset[str] = frozenset(),
    ) -> None:
        """Record, log and hand ``metrics`` to the listeners, with the names among them that
        are not finite by definition (``undefined``), which a stopping rule must not read as
        a diverged run."""
        self.last_metrics = dict(metrics)
        self.history.append((step, dict(metrics)))
        del self.history[: -self.history_size]
        self.num_measurements += 1
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value, dtype=torch.float32)
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)
        last_figure = self._last_figure_step
        if self.figure_every_n_steps is None:  # the budget: every tenth measurement
            self.figures_due = (self.num_measurements - 1) % FIGURE_EVERY_N_MEASUREMENTS == 0
        else:
            self.figures_due = (
                last_figure is None or step - last_figure >= self.figure_every_n_steps
            )
        if self.figures_due:
            self._last_figure_step = step
        if trainer.is_global_zero:
            sinks, scalars_only = media_sinks(trainer.loggers)
            for logger in scalars_only:
                self.warn_once(
                    f"media:{type(logger).__name__}",
                    f"{type(logger).__name__} has no log_dir: it receives the scalars only, "
                    "not the histograms and figures (TensorBoard, W&B, MLflow and loggers "
                    "with a log_dir, such as CSVLogger, receive them)",
                )
            if sinks:
                self.write_media(Media(sinks), step)
        # Listeners (SpectralEarlyStopping) act on the step of the measurement, whatever
        # their place in the callback list.
        for callback in trainer.callbacks:
            listener = getattr(callback, "on_spectral_measurement", None)
            if listener is not None:
                listener(trainer, step, dict(metrics), undefined=undefined)


def _state_key_fields(key: Any, qualname: str) -> dict[str, Any] | None:
    """The settings in a state key of class ``qualname`` (``Name{'field': value, ...}``, as
    Lightning's ``_generate_state_key`` writes it), or ``None`` for another key."""
    if not isinstance(key, str) or not key.startswith(qualname + "{"):
        return None
    try:
        fields = ast.literal_eval(key[len(qualname) :])
    except (ValueError, SyntaxError):
        return None
    return fields if isinstance(fields, dict) else None


#: With the budget schedule, figures go with every this-many-th measurement (the first too).
FIGURE_EVERY_N_MEASUREMENTS = 10

#: Trainer -> seconds every monitor has spent measuring in this session: none of it counts
#: as training time for any monitor's budget.
_MEASURING: weakref.WeakKeyDictionary[pl.Trainer, float] = weakref.WeakKeyDictionary()


class TwinMonitorError(ValueError):
    """Two monitors of one Trainer would log the same metrics or share a checkpoint state."""

    def __init__(self, monitor: SpectralMonitor, what: str) -> None:
        name = type(monitor).__name__
        super().__init__(
            f"two {name}s share the {what}: give each a different name=... "
            f"(e.g. {name}(..., name='sum_loss')); metric names and checkpoint state then "
            "keep apart"
        )


def _refuse_twins_at_trainer_init(monitor: SpectralMonitor, key: str) -> None:
    """Lightning refuses two callbacks with one state key when the Trainer is built, with a
    message about state keys; read by that check, the key raises ours, naming ``name=``."""
    caller = sys._getframe(2)  # the reader of ``state_key``, two frames up
    if caller.f_code.co_name != "_validate_callbacks_list":
        return
    callbacks = caller.f_locals.get("callbacks") or []
    for other in callbacks:
        if (
            other is not monitor
            and isinstance(other, SpectralMonitor)
            and other._generate_state_key(**other.state_key_fields()) == key
        ):
            raise TwinMonitorError(monitor, f"state key {key!r}")


def _check_probe_data(probe_data: Any) -> None:
    """Explicit probe data must hold batches that hold tensors. An iterator or loader is
    checked when the probe is collected (reading it now would consume it)."""
    if probe_data is None:
        return
    lazy = isinstance(probe_data, (torch.utils.data.DataLoader, Iterator)) or (
        isinstance(probe_data, Iterable)
        and not isinstance(probe_data, (torch.Tensor, list, tuple, Mapping, str))
    )
    if lazy:
        return
    try:
        batches = as_batch_list(probe_data)
    except ValueError as error:
        raise ValueError(f"probe_data: {error}") from None
    for index, batch in enumerate(batches):
        if not _tensors_of(batch):
            raise ValueError(
                f"probe_data must be one batch or a list of batches that hold tensors; batch "
                f"{index} is {batch!r}"
            )


def _is_plain(obj: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` can read ``obj`` back: tensors, numbers,
    strings and ``None`` in plain lists, tuples and ``str``-keyed dicts."""
    if obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)):
        return True
    if type(obj) in (list, tuple):
        return all(_is_plain(item) for item in obj)
    if type(obj) is dict:
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


def _tensors_of(batch: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    map_tensors(batch, collect)
    return found


def _fill_tensors(template: Any, tensors: list[torch.Tensor]) -> Any | None:
    """``template`` with its tensors replaced by ``tensors`` in order (``None`` on a count
    mismatch)."""
    if len(_tensors_of(template)) != len(tensors):
        return None
    supply = iter(tensors)
    return map_tensors(template, lambda _: next(supply), other=copy.deepcopy)


def _checkpointable_probe(probe: list[Any]) -> dict[str, Any]:
    """The probe in a form ``torch.load``'s default ``weights_only=True`` reads back.

    Plain containers are stored as they are (CPU tensors). Batches of other types (named
    tuples, dataclasses, a tokenizer's ``BatchEncoding``) are stored as their tensors alone,
    to be put back into the structure of the resumed run's first batch; a batch whose
    tensors sit in objects that are not containers is not stored (collected anew).
    """
    cpu = [move_to_device(b, torch.device("cpu")) for b in probe]
    if all(_is_plain(b) for b in cpu):
        return {"probe": cpu}
    if any(_has_opaque_leaves(b) for b in cpu):
        return {"probe_tensors": None}
    return {"probe_tensors": [_tensors_of(b) for b in cpu]}


def _has_opaque_leaves(batch: Any) -> bool:
    """Whether ``batch`` holds objects that are neither containers, tensors nor plain values
    (their contents, tensors perhaps, cannot be saved or rebuilt)."""
    opaque: list[Any] = []

    def note(obj: Any) -> Any:
        if not (obj is None or isinstance(obj, (bool, int, float, str))):
            opaque.append(obj)
        return obj

    map_tensors(batch, lambda tensor: tensor, other=note)
    return bool(opaque)


def reduce_scalar(trainer: pl.Trainer, value: float, op: str) -> float:
    """``value`` reduced over every process (``op``: ``"sum"``, ``"min"``, ``"max"``); the
    value itself in one process. Every process must call it, in the same order."""
    if trainer.world_size <= 1:
        return float(value)
    tensor = torch.tensor(float(value), dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op=op))


def current_learning_rate(trainer: pl.Trainer) -> float:
    """Learning rate of the first optimizer's first parameter group (NaN if none)."""
    optimizers: list[torch.optim.Optimizer] = list(getattr(trainer, "optimizers", []) or [])
    if not optimizers or not optimizers[0].param_groups:
        return math.nan
    lr = optimizers[0].param_groups[0].get("lr", math.nan)
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


LossFn = Callable[[nn.Module, Any], torch.Tensor]
