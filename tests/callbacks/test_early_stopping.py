"""SpectralEarlyStopping on scripted series of measurements, and end to end."""

from __future__ import annotations

import csv
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from spectral_callbacks import (
    RepresentationMonitor,
    SharpnessMonitor,
    SpectralEarlyStopping,
    WeightSpectrumMonitor,
)
from spectral_callbacks.callbacks import SpectralMonitor

from ..models import TanhRegressor, full_batch_loader, regression_data, trainer_kwargs

KEY = "spectral/hessian/eos_ratio"


class ScriptedMonitor(SpectralMonitor):
    """Publishes a scripted value of one metric at every step, through the real path."""

    def __init__(self, series: list[float], key: str = KEY, undefined=()) -> None:
        super().__init__(every_n_steps=1)
        self.series = series
        self.key = key
        self.undefined_steps = set(undefined)  # steps whose value is NaN by definition
        self._step = 0

    def metric_names(self) -> list[str]:
        return [self.key]

    def measure(self, trainer, module, probe):
        self._step = trainer.global_step
        return {self.key: self.series[trainer.global_step]}

    def undefined_metrics(self) -> set[str]:
        return {self.key} if self._step in self.undefined_steps else set()


def run(series, stopper, steps=None, key=KEY, undefined=(), **overrides):
    x, y = regression_data(n=16)
    steps = steps or len(series) - 1
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[ScriptedMonitor(series, key, undefined), stopper],
        **trainer_kwargs(**overrides),
    )
    trainer.fit(TanhRegressor(), full_batch_loader(x, y, steps))
    return trainer


def test_above_rule_stops_after_patience_measurements_in_a_row(tmp_path, capsys):
    series = [0.5, 1.2, 0.9, 1.2, 1.3, 1.4, 1.5, 1.6]
    stopper = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=2)
    logger = CSVLogger(tmp_path, name="es", version=0)
    trainer = run(series, stopper, logger=logger)
    assert trainer.global_step == 4 and stopper.stopped_step == 4
    assert stopper.stopped_value == pytest.approx(1.3)
    assert "above 1.1 for 2 measurement(s) in a row" in stopper.stopped_reason
    assert "SpectralEarlyStopping at step 4" in capsys.readouterr().out
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        triggered = [
            int(r["step"])
            for r in csv.DictReader(handle)
            if r.get("spectral/early_stopping/triggered")
        ]
    assert triggered == [4]


def test_warn_action_keeps_training_and_records_every_trip():
    series = [1.2, 1.3, 0.5, 1.2, 1.2, 1.2]
    stopper = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=2, action="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(series, stopper)
    assert trainer.global_step == 5
    # Trips at step 1 (1.2, 1.3) and step 4 (1.2, 1.2); the count restarts after a trip.
    assert [step for step, _, _ in stopper.events] == [1, 4]
    assert stopper.stopped_step == 1
    assert len([w for w in caught if "action='warn'" in str(w.message)]) == 2


def test_below_rule():
    stopper = SpectralEarlyStopping(KEY, rule="below", threshold=0.2, patience=1)
    trainer = run([0.5, 0.4, 0.1, 0.3, 0.3], stopper)
    assert trainer.global_step == 2 and stopper.stopped_step == 2


@pytest.mark.parametrize(("warmup", "expected"), [(0, 1), (2, 4)])
def test_collapse_rule_ignores_the_warmup_dip(warmup, expected):
    key = "spectral/repr/encoder/rankme"
    series = [10.0, 2.0, 12.0, 11.0, 5.0, 4.0, 3.0]
    stopper = SpectralEarlyStopping.rank_collapse("encoder", fraction=0.5, warmup_steps=warmup)
    assert stopper.monitor == key
    trainer = run(series, stopper, key=key)
    assert stopper.stopped_step == expected == trainer.global_step
    assert "collapsed below 0.5 of its peak" in stopper.stopped_reason
    assert stopper.peak == (10.0 if warmup == 0 else 12.0)


def test_collapse_absolute_floor_and_interrupted_streaks():
    key = "spectral/repr/encoder/rankme"
    series = [10.0, 3.0, 9.0, 3.0, 2.5, 9.0, 9.0]
    stopper = SpectralEarlyStopping.rank_collapse(
        "encoder", fraction=None, min_value=4.0, patience=2
    )
    run(series, stopper, key=key)
    # Step 1 is one violation, step 2 resets it, steps 3-4 are two in a row.
    assert stopper.stopped_step == 4
    assert "below the floor 4" in stopper.stopped_reason


def test_improvement_rule_keeps_stock_semantics_counted_in_measurements():
    series = [5.0, 4.0, 3.0, 3.0, 3.5, 3.2, 1.0, 1.0]
    stopper = SpectralEarlyStopping(KEY, mode="min", patience=3, min_delta=0.0)
    trainer = run(series, stopper)
    # Best 3.0 at step 2; steps 3, 4, 5 do not improve: stop at 5.
    assert trainer.global_step == 5 and stopper.stopped_step == 5
    assert float(stopper.best_score) == 3.0


def test_non_finite_values_stop_when_check_finite():
    stopper = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=5)
    run([0.5, math.nan, 0.5, 0.5], stopper)
    assert stopper.stopped_step == 1 and "not finite" in stopper.stopped_reason


@pytest.mark.parametrize("rule", ["above", "improvement"])
def test_values_undefined_by_definition_are_not_checked(rule):
    """NaN by definition (an adaptive optimizer's ratio before its first step) is not a
    diverged run: not checked, not counted; the same NaN from a failure still stops."""
    settings = {"threshold": 1.1} if rule == "above" else {"mode": "max"}
    stopper = SpectralEarlyStopping(KEY, rule=rule, patience=2, **settings)
    series = [math.nan, 0.5, 2.0, 2.0, 2.0] if rule == "above" else [math.nan, 3.0, 2.0, 1.0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*undefined")  # one undefined value: none
        trainer = run(series, stopper, undefined={0})
    assert stopper.stopped_step == 3 and trainer.global_step == 3
    failed = SpectralEarlyStopping(KEY, rule=rule, patience=2, **settings)
    run(series, failed)
    assert failed.stopped_step == 0 and "not finite" in failed.stopped_reason


@pytest.mark.parametrize("value", [math.nan, 2.0], ids=["NaN", "a stand-in"])
def test_a_value_that_stays_undefined_is_warned_once_and_never_stops(value):
    """NaN by definition, or a finite stand-in the monitor warned about (λ_max · lr / 2 for
    an optimizer without a derivation): never checked, however far past the threshold."""
    stopper = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=1)
    said = r"eos_ratio is not defined for this run .* not checked"
    with pytest.warns(RuntimeWarning, match=said) as caught:
        trainer = run([value] * 5, stopper, undefined=range(5))
    assert len([w for w in caught if "not defined" in str(w.message)]) == 1
    assert stopper.stopped_reason is None and trainer.global_step == 4


def test_adam_does_not_stop_the_sharpness_rule_before_its_first_step():
    """Before Adam's first step its ratio is NaN by definition; the preset must not read it
    as a diverged run (it stopped every Adam run at step 0)."""
    from ..models import NoisyClassifier, classification_loader

    stopper = SpectralEarlyStopping.sharpness()
    monitor = SharpnessMonitor(every_n_steps=2)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=6, callbacks=[monitor, stopper], **trainer_kwargs())
    trainer.fit(NoisyClassifier(), classification_loader())
    assert math.isnan(dict(monitor.history)[0][KEY])
    assert trainer.global_step == 6 and stopper.stopped_reason is None


def test_missing_key_names_the_callback_that_produces_it():
    stopper = SpectralEarlyStopping.sharpness()
    trainer = L.Trainer(max_steps=1, callbacks=[stopper], **trainer_kwargs())
    x, y = regression_data(n=8)
    with pytest.raises(ValueError, match="add SharpnessMonitor to the Trainer's callbacks"):
        trainer.fit(TanhRegressor(), full_batch_loader(x, y, 2))
    lenient = SpectralEarlyStopping("spectral/repr/encoder/rankme", strict=False)
    trainer = L.Trainer(max_steps=1, callbacks=[lenient], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="RepresentationMonitor"):
        trainer.fit(TanhRegressor(), full_batch_loader(x, y, 2))


def test_a_monitor_of_another_layer_is_named_not_asked_for():
    """rank_collapse("net.3") beside a RepresentationMonitor of "net.1": the message says the
    monitor is there and watches other layers, and names the close match."""
    stopper = SpectralEarlyStopping.rank_collapse("net.3")
    monitor = RepresentationMonitor(layers=["net.1"], every_n_steps=1, num_samples=8)
    trainer = L.Trainer(max_steps=1, callbacks=[monitor, stopper], **trainer_kwargs())
    x, y = regression_data(n=8)
    with pytest.raises(ValueError) as raised:
        trainer.fit(TanhRegressor(), full_batch_loader(x, y, 2))
    message = str(raised.value)
    assert "add RepresentationMonitor" not in message
    assert "the Trainer's RepresentationMonitor logs other names" in message
    assert "spectral/repr/net.1/rankme" in message


def test_presets_watch_a_named_monitor():
    """monitor_name= points a preset at the monitor given that name=: the keys are the names
    those monitors log, and the sharpness rule reads its named monitor in a run."""
    named = [
        (SpectralEarlyStopping.sharpness(monitor_name="val"), SharpnessMonitor(name="val")),
        (
            SpectralEarlyStopping.rank_collapse("net.1", monitor_name="a"),
            RepresentationMonitor(layers=["net.1"], name="a"),
        ),
        (SpectralEarlyStopping.alpha_band(monitor_name="w"), WeightSpectrumMonitor(name="w")),
    ]
    for stopper, monitor in named:
        assert monitor.produces(stopper.monitor), stopper.monitor
    stopper = SpectralEarlyStopping.sharpness(monitor_name="val", margin=0.0, patience=1)
    monitor = SharpnessMonitor(every_n_steps=2, name="val")
    x, y = regression_data(n=32)
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=4, callbacks=[monitor, stopper], **trainer_kwargs())
    trainer.fit(TanhRegressor(lr=1.0), full_batch_loader(x, y, 4))
    assert stopper.stopped_step == 0  # λ_max · 1.0 / 2 > 1 on this model at step 0
    assert stopper.stopped_value == pytest.approx(monitor.history[0][1][stopper.monitor])
    with pytest.raises(ValueError, match="monitor_name must be None or a non-empty string"):
        SpectralEarlyStopping.sharpness(monitor_name="a/b")


def test_an_unnamed_preset_beside_a_named_monitor_is_told_monitor_name():
    stopper = SpectralEarlyStopping.sharpness()
    monitor = SharpnessMonitor(every_n_steps=1, name="val")
    trainer = L.Trainer(max_steps=1, callbacks=[monitor, stopper], **trainer_kwargs())
    x, y = regression_data(n=8)
    with pytest.raises(ValueError, match="monitor_name='val'"):
        trainer.fit(TanhRegressor(), full_batch_loader(x, y, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "sideways"}, "rule must be one of"),
        ({"action": "panic"}, "action must be one of"),
        ({"rule": "above"}, "needs threshold"),
        ({"rule": "collapse"}, "needs fraction"),
        ({"rule": "collapse", "fraction": 1.5}, "fraction must be in"),
        ({"warmup_steps": -1}, "warmup_steps must be"),
        ({"patience": 0}, "patience must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralEarlyStopping(KEY, **kwargs)


def test_resume_continues_the_patience_count(tmp_path):
    series = [0.5, 0.5, 0.5, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2]
    # Uninterrupted: violations at 3, 4, 5 -> stop at 5 with patience 3.
    uninterrupted = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=3)
    run(series, uninterrupted)
    assert uninterrupted.stopped_step == 5
    # Stopped at step 4 (two violations counted), resumed from its checkpoint.
    x, y = regression_data(n=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    first = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=3)
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[ScriptedMonitor(series), first, checkpoint],
        **trainer_kwargs(enable_checkpointing=True),
    )
    trainer.fit(
        TanhRegressor(),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2),
    )
    assert first.violations == 2 and first.stopped_step is None
    resumed = SpectralEarlyStopping(KEY, rule="above", threshold=1.1, patience=3)
    trainer = L.Trainer(
        max_steps=8, callbacks=[ScriptedMonitor(series), resumed], **trainer_kwargs()
    )
    trainer.fit(
        TanhRegressor(),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2),
        ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"),
    )
    assert resumed.stopped_step == uninterrupted.stopped_step == 5
    assert trainer.global_step == 5


def test_end_to_end_sharpness_rule_trips_at_a_large_learning_rate():
    """Full-batch GD past the edge: eos_ratio stays above 1 + margin and the run stops."""
    torch.manual_seed(0)
    x, y = regression_data(n=64)
    torch.manual_seed(1)
    monitor = SharpnessMonitor(every_n_steps=10)
    stopper = SpectralEarlyStopping.sharpness(margin=0.1, patience=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[stopper, monitor], **trainer_kwargs())
    trainer.fit(TanhRegressor(lr=0.6), full_batch_loader(x, y, 400))
    ratios = [values[KEY] for _, values in monitor.history]
    assert ratios[0] > 1.1  # already past the edge at initialisation
    assert stopper.stopped_step is not None and trainer.global_step == stopper.stopped_step < 400
    assert all(r > 1.1 or not math.isfinite(r) for r in ratios[-2:])
    assert "spectral/hessian/eos_ratio" in stopper.stopped_reason


@pytest.mark.parametrize(
    ("key", "producer"),
    [
        ("spectral/hessian/eos_ratio", "SharpnessMonitor"),
        ("spectral/hessian/adam/lambda_max", "SharpnessMonitor"),
        ("spectral/hessian/eig_7", "HessianSpectrumMonitor"),
        ("spectral/ggn/trace", "HessianSpectrumMonitor"),
        ("spectral/hessian/layer/net.0/trace_per_param", "HessianSpectrumMonitor"),
        ("spectral/ggn/lambda_max", None),  # the GGN has no sharpness monitor
        ("spectral/hessian/not_a_metric", None),
        ("spectral/repr/encoder/rankme", "RepresentationMonitor"),
        ("spectral/repr/probe/encoder.0/alpha_req", "RepresentationMonitor"),
        ("spectral/repr/encoder/lambda_max", None),
        ("spectral/weights/net.0/alpha", "WeightSpectrumMonitor"),
        ("spectral/weights/all_layers/farms_alpha", "WeightSpectrumMonitor"),
        ("spectral/weights/net.0/left_subspace_angle", "WeightSpectrumMonitor"),
        ("spectral/weights/net.0/rankme", None),
    ],
)
def test_the_missing_producer_is_read_off_the_metric_tables(key, producer):
    from spectral_callbacks.callbacks.early_stopping import producer_of

    assert producer_of(key) == producer
