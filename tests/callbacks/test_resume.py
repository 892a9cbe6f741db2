"""A run resumed from its checkpoint measures and stops like the uninterrupted run."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import HessianSpectrumMonitor, SharpnessMonitor, SpectralEarlyStopping
from spectral_callbacks.callbacks import (
    BatchSharpnessMonitor,
    RepresentationMonitor,
    WeightSpectrumMonitor,
)

from ..models import (
    AnyBatchRegressor,
    ListDataset,
    Pair,
    TanhRegressor,
    regression_data,
    trainer_kwargs,
)
from ..runs import assert_same_history, read_events, small_spectrum_monitor, spectral_history


def loader(seed=0, batch_size=64):
    torch.manual_seed(seed)
    x, y = regression_data(n=64)
    # One full batch per epoch: full-batch GD, and every step is an epoch boundary.
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def callbacks(threshold):
    return [
        SharpnessMonitor(every_n_steps=5),
        small_spectrum_monitor(every_n_steps=10, trace_hvps=9),
        SpectralEarlyStopping(
            "spectral/hessian/lambda_max", rule="above", threshold=threshold, patience=2
        ),
    ]


def fit(tmp_path, name, threshold, max_steps, ckpt_path=None, checkpoint_dir=None):
    extra = []
    if checkpoint_dir is not None:
        extra.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=5, save_top_k=-1))
    monitors = callbacks(threshold)
    logger = TensorBoardLogger(tmp_path, name=name, version=0)
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=monitors + extra,
        **trainer_kwargs(logger=logger, enable_checkpointing=checkpoint_dir is not None),
    )
    torch.manual_seed(1)
    trainer.fit(TanhRegressor(lr=0.1), loader(), ckpt_path=ckpt_path)
    return trainer, monitors, logger


def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    # Progressive sharpening makes λ_max grow; put the threshold between steps 10 and 15 so
    # the rule trips at 15 and 20 (patience 2) and the run stops at 20.
    _, (probe_run, _, _), _ = fit(tmp_path, "probe", threshold=1e9, max_steps=20)
    values = dict(probe_run.history)
    lam = {s: v["spectral/hessian/lambda_max"] for s, v in values.items()}
    assert lam[0] < lam[5] < lam[10] < lam[15] < lam[20]
    threshold = 0.5 * (lam[10] + lam[15])

    whole, (sharp_u, spec_u, stop_u), log_u = fit(
        tmp_path, "uninterrupted", threshold, max_steps=40
    )
    assert stop_u.stopped_step == 20 and whole.global_step == 20

    checkpoints = tmp_path / "checkpoints"
    first, _, log_i = fit(
        tmp_path, "interrupted", threshold, max_steps=15, checkpoint_dir=checkpoints
    )
    assert first.global_step == 15
    resumed, (sharp_r, spec_r, stop_r), _ = fit(
        tmp_path,
        "interrupted",
        threshold,
        max_steps=40,
        ckpt_path=str(checkpoints / "epoch=14-step=15.ckpt"),
    )
    assert stop_r.stopped_step == stop_u.stopped_step == 20 and resumed.global_step == 20
    assert stop_r.stopped_reason == stop_u.stopped_reason
    # The restored warm-start vectors and probe make the resumed solves the same computations.
    assert spectral_history(sharp_r) == spectral_history(sharp_u)
    assert spectral_history(spec_r) == spectral_history(spec_u)

    events_u, events_i = read_events(log_u.log_dir), read_events(log_i.log_dir)
    for tag in ("spectral/hessian/lambda_max", "spectral/hessian/eig_1", "spectral/hessian/trace"):
        steps_u = [e.step for e in events_u.Scalars(tag)]
        steps_i = [e.step for e in events_i.Scalars(tag)]
        assert steps_i == steps_u, tag  # no duplicate, no missing step
        assert [e.value for e in events_i.Scalars(tag)] == pytest.approx(
            [e.value for e in events_u.Scalars(tag)], rel=0, abs=0
        )


def _fit_pairs(tmp_path, max_steps, monitor, ckpt_path=None, every=None):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    pairs = [Pair(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    loader = torch.utils.data.DataLoader(ListDataset(pairs), batch_size=None)

    class Learning(AnyBatchRegressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callbacks = [monitor]
    if every is not None:
        callbacks.append(
            L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)
        )
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=callbacks,
        **trainer_kwargs(enable_checkpointing=every is not None),
    )
    trainer.fit(Learning(), loader, ckpt_path=ckpt_path)
    return trainer


def test_a_probe_of_named_tuples_survives_a_checkpoint_read_with_weights_only(tmp_path):
    whole = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "whole", 8, whole)
    first = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "ckpt", 3, first, every=3)  # an epoch boundary: 3 batches an epoch
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(path)  # torch's default: weights_only=True
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "SharpnessMonitor" in k]
    assert state["probe"] is None and len(state["probe_tensors"]) == 2
    resumed = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "resumed", 8, resumed, ckpt_path=str(path))
    assert isinstance(resumed._probe[0], Pair)
    assert spectral_history(resumed) == spectral_history(whole)


def test_checkpoints_carry_warm_start_vectors_only_when_asked_or_small():
    vector = torch.ones(10)
    monitor = SharpnessMonitor()
    monitor._start = vector
    assert torch.equal(monitor.state_dict()["warm_start"]["start"], vector)
    off = SharpnessMonitor(checkpoint_warm_start=False)
    off._start = vector
    assert "warm_start" not in off.state_dict()
    large = HessianSpectrumMonitor(k=2)
    large._start = torch.empty(3, 2**22)  # 48 MiB: kept
    assert "warm_start" in large.state_dict()
    large._start = torch.empty(3, 2**23)  # 96 MiB: over the default bound of 64 MiB
    with pytest.warns(RuntimeWarning, match="left out of checkpoints"):
        assert "warm_start" not in large.state_dict()
    with pytest.raises(TypeError, match="checkpoint_warm_start must be True or False"):
        SharpnessMonitor(checkpoint_warm_start="no")


def _train_and_checkpoint(tmp_path, monitor, steps=4):
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        callbacks=[monitor, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        **trainer_kwargs(enable_checkpointing=True),
    )
    torch.manual_seed(1)
    trainer.fit(TanhRegressor(lr=0.1), loader())
    return str(tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    ("changed", "carried"),
    [({"every_n_steps": 3}, True), ({"tol": 1e-4}, True), ({"params": "net.0"}, False)],
)
def test_a_changed_setting_on_resume_is_said_once_and_the_state_carried_where_valid(
    tmp_path, changed, carried
):
    first = SharpnessMonitor(every_n_steps=2)
    path = _train_and_checkpoint(tmp_path, first)
    resumed = SharpnessMonitor(**{"every_n_steps": 2, **changed})
    trainer = L.Trainer(max_steps=6, max_epochs=-1, callbacks=[resumed], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="saved with") as record:
        torch.manual_seed(1)
        trainer.fit(TanhRegressor(lr=0.1), loader(), ckpt_path=path)
    (warning,) = [w for w in record if "saved with" in str(w.message)]
    (setting,) = changed
    assert setting in str(warning.message)
    carried_steps = [step for step, _ in first.history]
    resumed_steps = [step for step, _ in resumed.history]
    assert (resumed_steps[: len(carried_steps)] == carried_steps) == carried
    assert (resumed._start is not None and resumed_steps[0] == 0) == carried


def test_monitors_handed_to_a_new_trainer_start_a_new_run(tmp_path):
    """Callbacks given to a second Trainer (a notebook that runs fit again) measure as fresh
    ones would: the new Trainer counts its steps from 0, so the first run's schedule,
    history, probe and warm starts were misplaced in it (under the overhead budget it
    measured nothing at all, and the probe was the first run's data); its warnings are said
    again. A checkpoint given to a new Trainer still restores the monitors' state."""

    def callbacks():
        return [
            SharpnessMonitor(every_n_steps=2, max_iter=3),  # unconverged: warns each run
            SharpnessMonitor(name="budget"),
            small_spectrum_monitor(every_n_steps=3, trace_hvps=9),
            RepresentationMonitor(layers=["net.1"], every_n_steps=2, num_samples=32),
            WeightSpectrumMonitor(every_n_steps=2, drift_rank=2),
            BatchSharpnessMonitor(every_n_steps=2),
            BatchSharpnessMonitor(name="budget"),
            SpectralEarlyStopping(
                "spectral/hessian/lambda_max", rule="above", threshold=0.0, patience=3
            ),
        ]

    def fit(monitors, model, seed, **kwargs):
        trainer = L.Trainer(max_steps=7, max_epochs=-1, callbacks=monitors, **trainer_kwargs())
        torch.manual_seed(1)
        trainer.fit(model, loader(seed, batch_size=16), **kwargs)
        return trainer

    def unconverged(caught):
        return [w for w in caught if "lambda_max did not reach tol" in str(w.message)]

    reused, model = callbacks(), TanhRegressor(lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fit(reused, model, seed=0)
    assert len(unconverged(caught)) == 1
    first.save_checkpoint(tmp_path / "first.ckpt")
    after_first = [spectral_history(m) for m in reused[:-1]]
    stopped_first = reused[-1].stopped_step
    assert stopped_first == 4  # the third measurement of λ_max > 0

    fresh, same_model = callbacks(), copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(reused, model, seed=1)
    assert len(unconverged(caught)) == 1  # a new run warns afresh
    fit(fresh, same_model, seed=1)
    for used, new in zip(reused[:-1], fresh[:-1], strict=True):
        if new.every_n_steps is None:  # later steps of the budget depend on the clock
            assert spectral_history(used)[0] == spectral_history(new)[0]  # step 0, run 2's
            steps = [step for step, _ in used.history]
            assert steps == sorted(set(steps))
        else:
            assert_same_history(used, new)
    assert reused[-1].stopped_step == fresh[-1].stopped_step == stopped_first

    resumed = reused[0]
    fit(reused, TanhRegressor(lr=0.1), seed=0, ckpt_path=str(tmp_path / "first.ckpt"))
    assert spectral_history(resumed)[: len(after_first[0])] == after_first[0]
