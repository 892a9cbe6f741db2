"""The overhead budget: a monitor without every_n_steps measures as often as its share of the
training time pays for, the same on every process and across a resume."""

from __future__ import annotations

import itertools
import logging
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from spectral_callbacks import SharpnessMonitor, WeightSpectrumMonitor
from spectral_callbacks.callbacks.schedule import GROWTH, BudgetSchedule

from ..models import TanhRegressor, full_batch_loader, regression_data, trainer_kwargs
from ..runs import assert_identical_runs, fit_and_capture


def simulate(steps: int, cost: float, trained, max_overhead: float = 0.05) -> list[int]:
    """The steps a :class:`BudgetSchedule` measures at over ``steps`` steps, each measurement
    taking ``cost`` seconds, ``trained(step)`` the seconds trained before ``step``."""
    schedule = BudgetSchedule(max_overhead=max_overhead)
    measured: list[int] = []
    for step in range(steps):
        last = measured[-1] if measured else None
        if schedule.due(step, last, lambda step=step: trained(step)):
            schedule.record(step, cost, trained(step))
            measured.append(step)
    return measured


def test_the_budget_places_each_measurement_where_training_has_paid_for_it():
    """One second per step, measurements of 3 s at a 5 % share: every measurement after the
    first keeps seconds spent within 5 % of seconds trained, and comes at the first step
    that allows it (or the geometric floor)."""
    steps = simulate(5000, 3.0, float)
    assert steps[0] == 0 and len(steps) > 5
    for earlier, step in itertools.pairwise(steps):
        k = steps.index(step) + 1  # measurements so far, this one included
        assert 3.0 * k / step <= 0.05 + 1e-12  # paid for
        floor = earlier + max(1, math.ceil(GROWTH * earlier))
        # One step sooner would have overspent, unless the geometric floor held it back.
        assert step == floor or 3.0 * k / (step - 1) > 0.05


def test_a_pace_that_changes_after_the_first_step_does_not_overspend():
    """The first step takes 10 s (warm-up), the rest 0.01 s: placed at the first step's pace,
    the second measurement would come far too early; it waits until training has paid."""

    def trained(step: int) -> float:
        return 0.0 if step == 0 else 10.0 + 0.01 * (step - 1)

    steps = simulate(20000, 1.0, trained)
    for k, step in enumerate(steps[1:], start=2):
        assert k * 1.0 <= 0.05 * trained(step) + 1e-9, (step, k)
    # 1 s each at 5 %: 20 s of training per measurement; 10 s come with the first step.
    assert steps[:3] == [0, 3001, 5001]
    assert len(steps) == int(trained(19999) // 20)  # k measurements need 20·k s


def test_cheap_measurements_are_dense_early_and_geometric_later():
    steps = simulate(2000, 1e-6, float)
    assert steps[:11] == list(range(11))  # every step while 10 % of the step is below 1
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert all(gap == max(1, math.ceil(GROWTH * a)) for a, gap in zip(steps, gaps, strict=False))
    assert 50 < len(steps) < 80  # about 24 per decade


class FakeClock(Callback):
    """A clock that advances ``step_seconds`` per training step and ``measurement_seconds``
    per measurement of the monitors it is given (each a number, or a pair: process 0's and
    the others'); stateful, so a resumed run continues it."""

    def __init__(self, monitors, step_seconds=1.0, measurement_seconds=2.0) -> None:
        self.now = 0.0
        self.seconds = {"step": step_seconds, "measurement": measurement_seconds}
        for monitor in monitors:
            measure = monitor.measure

            def timed(trainer, *args, measure=measure, **kwargs):
                self.now += self._seconds("measurement", trainer)
                return measure(trainer, *args, **kwargs)

            monitor.measure = timed
            monitor.clock = lambda: self.now

    def _seconds(self, kind, trainer):
        value = self.seconds[kind]
        return value if not isinstance(value, tuple) else value[min(trainer.global_rank, 1)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.now += self._seconds("step", trainer)

    def state_dict(self):
        return {"now": self.now}

    def load_state_dict(self, state):
        self.now = state["now"]


def _fit(callbacks, steps, ckpt_path=None, checkpoint_dir=None):
    x, y = regression_data(n=32)
    extra = []
    if checkpoint_dir is not None:
        extra = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=25, save_top_k=-1)]
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks + extra,
        **trainer_kwargs(enable_checkpointing=checkpoint_dir is not None),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TanhRegressor(lr=0.05), full_batch_loader(x, y, steps), ckpt_path=ckpt_path)
    return trainer


def test_a_monitor_without_a_schedule_keeps_to_its_share_and_logs_it():
    monitor = SharpnessMonitor(max_overhead=0.1)
    clock = FakeClock([monitor], step_seconds=1.0, measurement_seconds=2.0)
    _fit([clock, monitor], steps=300)  # the clock first: its step is counted when measuring
    steps = [step for step, _ in monitor.history]
    shares = [values["spectral/hessian/sharpness_overhead"] for _, values in monitor.history]
    assert steps[0] == 0 and math.isnan(shares[0])  # nothing trained yet
    assert len(steps) >= 5
    assert all(share <= 0.1 + 1e-9 for share in shares[1:])
    # Each share is what the clock says: 2 s per measurement over the steps trained.
    for k, (step, share) in enumerate(zip(steps[1:], shares[1:], strict=True), start=2):
        assert share == pytest.approx(2.0 * k / step)
    assert monitor.overhead == pytest.approx(2.0 * len(steps) / 300)


def test_the_seconds_of_publishing_count_in_the_budget():
    # Figures and loggers can take longer than a cheap measurement: 1 s to measure and 2 s
    # to publish, at a 10 % share, must space the measurements by 30 s of training, not 10.
    monitor = SharpnessMonitor(max_overhead=0.1)
    clock = FakeClock([monitor], step_seconds=1.0, measurement_seconds=1.0)
    publish = monitor._publish

    def slow_publish(*args, **kwargs):
        clock.now += 2.0
        return publish(*args, **kwargs)

    monitor._publish = slow_publish
    _fit([clock, monitor], steps=300)
    steps = [step for step, _ in monitor.history]
    assert len(steps) >= 5
    assert monitor.overhead == pytest.approx(3.0 * len(steps) / 300)
    assert monitor.overhead <= 0.1 + 1e-9
    # The share logged with measurement k counts its own measuring and the publishing of
    # the k - 1 before it.
    for k, (step, values) in enumerate(monitor.history[1:], start=2):
        share = values["spectral/hessian/sharpness_overhead"]
        assert share == pytest.approx((3.0 * k - 2.0) / step)


@pytest.mark.parametrize("every_n_steps", [None, 10])
def test_a_slow_measurement_is_reported_once_with_when_the_next_comes(every_n_steps, caplog):
    """40 s a measurement (the progress bar stands still meanwhile): said once, on the
    console Lightning's own messages go to; at the budget's 5 % the next is owed
    (40 + 40) / 0.05 s of training, with every_n_steps the cost recurs every n steps."""
    monitor = SharpnessMonitor(every_n_steps=every_n_steps)
    clock = FakeClock([monitor], step_seconds=1.0, measurement_seconds=40.0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _fit([clock, monitor], steps=30)
    said = [r.getMessage() for r in caplog.records if "SharpnessMonitor" in r.getMessage()]
    assert len(said) == 1 and len(monitor.history) == (1 if every_n_steps is None else 4)
    assert said[0].startswith("SharpnessMonitor: the measurement at step 0 took 40 s; ")
    if every_n_steps is None:
        assert "after about 1,600 s more of training" in said[0]
    else:
        assert "with every_n_steps=10 it recurs every 10 steps" in said[0]


def test_a_measurement_below_half_a_minute_is_not_reported(caplog):
    monitor = SharpnessMonitor(every_n_steps=10)
    clock = FakeClock([monitor], step_seconds=1.0, measurement_seconds=29.0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _fit([clock, monitor], steps=30)
    assert len(monitor.history) == 4  # steps 0, 10, 20, 30
    assert not [r for r in caplog.records if "SharpnessMonitor" in r.getMessage()]


def test_a_resumed_run_continues_the_schedule_of_the_uninterrupted_run(tmp_path):
    whole_monitor = SharpnessMonitor(max_overhead=0.1)
    _fit([FakeClock([whole_monitor]), whole_monitor], steps=120)
    first = SharpnessMonitor(max_overhead=0.1)
    _fit([FakeClock([first]), first], steps=50, checkpoint_dir=tmp_path)
    resumed = SharpnessMonitor(max_overhead=0.1)
    path = str(tmp_path / "epoch=0-step=50.ckpt")
    _fit([FakeClock([resumed]), resumed], steps=120, ckpt_path=path)
    whole = [step for step, _ in whole_monitor.history]
    assert [step for step, _ in resumed.history] == whole
    assert [step for step, _ in first.history] == [s for s in whole if s <= 50]
    assert resumed.history[-1][1] == pytest.approx(whole_monitor.history[-1][1], nan_ok=True)


def test_a_run_resumed_without_every_n_steps_goes_on_measuring(tmp_path):
    """A checkpoint of a fixed schedule holds no budget decision: the budgeted monitor of
    the resumed run decides at its first step and measures (it never measured again)."""
    first = SharpnessMonitor(every_n_steps=10)
    _fit([FakeClock([first]), first], steps=50, checkpoint_dir=tmp_path)
    resumed = SharpnessMonitor()
    path = str(tmp_path / "epoch=0-step=50.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the changed settings are warned about
        _fit([FakeClock([resumed]), resumed], steps=120, ckpt_path=path)
    steps = [step for step, _ in resumed.history]
    assert steps[: len(first.history)] == [step for step, _ in first.history]
    assert steps[len(first.history) :][:1] == [51]


def test_training_is_bit_identical_with_budgeted_monitors():
    plain = fit_and_capture([])
    budgeted = fit_and_capture([SharpnessMonitor(), WeightSpectrumMonitor()])
    assert_identical_runs(plain, budgeted)


def test_max_overhead_is_a_share_below_one():
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="max_overhead must be"):
            SharpnessMonitor(max_overhead=bad)
