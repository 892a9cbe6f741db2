"""BatchSharpnessMonitor: q(B) = g_Bᵀ H_B g_B / ‖g_B‖² on each measured step's own batch, against
closed forms and dense float64 Hessians of that batch at the step's parameters."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from spectral_callbacks import BatchSharpnessMonitor, SharpnessMonitor, SpectralEarlyStopping
from spectral_callbacks.functional import batch_sharpness

from ..models import (
    NoisyClassifier,
    TanhRegressor,
    classification_loader,
    mse,
    regression_data,
    trainer_kwargs,
)
from ..oracles import dense_hessian_func
from ..runs import Snapshots, assert_identical_runs, fit_and_capture


class LeastSquares(LightningModule):
    """``mean((X w − y)²)``: ``H_B = 2 X_Bᵀ X_B / b`` exactly."""

    def __init__(self, d: int = 5, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Linear(d, 1, bias=False).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(x, y, batch_size):
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _fit(model, callbacks, loader, steps, **overrides):
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs(**overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return trainer


def _dense_q(model, batches) -> float:
    """q of the union of ``batches`` (weighted by size) from the dense float64 Hessian."""
    hessian = dense_hessian_func(model, mse, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(b[0].shape[0] for b in batches)
    grads = [torch.autograd.grad(mse(model, b) * (b[0].shape[0] / total), params) for b in batches]
    g = torch.cat([sum(parts).reshape(-1) for parts in zip(*grads, strict=True)]).double()
    return float(g @ hessian @ g / (g @ g))


def test_least_squares_matches_the_closed_form_at_every_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = LeastSquares()
    monitor = BatchSharpnessMonitor(every_n_steps=1, window=1)
    snapshots = Snapshots()
    _fit(model, [monitor, snapshots], _loader(x, y, 8), steps=8)
    assert [step for step, _ in monitor.history] == list(range(8))
    for step, values in monitor.history:
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        w = snapshots.states[step]["net.weight"].reshape(-1, 1)
        grad = 2 * xb.T @ (xb @ w - yb) / 8
        hessian = 2 * xb.T @ xb / 8
        q = float(grad.T @ hessian @ grad / (grad.T @ grad))
        assert values["spectral/hessian/batch_sharpness"] == pytest.approx(q, rel=1e-10)
        assert values["spectral/hessian/batch_sharpness_sample"] == pytest.approx(q, rel=1e-10)
        # Plain SGD: the edge is q · lr / 2 = 1.
        assert values["spectral/hessian/batch_eos_ratio"] == pytest.approx(q * 0.05 / 2)


def test_an_mlp_matches_the_dense_hessian_of_each_batch_and_the_window_averages():
    x, y = regression_data(n=48, dtype=torch.float64)
    torch.manual_seed(1)
    model = TanhRegressor(lr=0.05, momentum=0.9).double()
    monitor = BatchSharpnessMonitor(every_n_steps=2, window=2)
    snapshots = Snapshots()
    _fit(model, [monitor, snapshots], _loader(x, y, 8), steps=6)
    steps = [step for step, _ in monitor.history]
    assert steps == [0, 2, 4]
    probe = copy.deepcopy(model)
    samples = []
    for step, values in monitor.history:
        probe.load_state_dict(snapshots.states[step])
        batch = (x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8])
        samples.append(_dense_q(probe, [batch]))
        assert values["spectral/hessian/batch_sharpness_sample"] == pytest.approx(
            samples[-1], rel=1e-9
        )
        mean = sum(samples[-2:]) / len(samples[-2:])
        assert values["spectral/hessian/batch_sharpness"] == pytest.approx(mean, rel=1e-9)
        # Heavy-ball momentum β = 0.9: the edge is q · lr / (2 + 2β).
        ratio = values["spectral/hessian/batch_eos_ratio"]
        assert ratio == pytest.approx(mean * 0.05 / 3.8, rel=1e-9)
    # The functional API gives the same number.
    direct = batch_sharpness(probe, mse, batch)
    assert direct.value == pytest.approx(samples[-1], rel=1e-9) and direct.num_hvps == 1


def test_under_gradient_accumulation_the_batch_is_the_union_of_its_micro_batches():
    x, y = regression_data(n=64, dtype=torch.float64)
    torch.manual_seed(2)
    model = TanhRegressor(lr=0.05).double()
    monitor = BatchSharpnessMonitor(every_n_steps=1, window=1)
    snapshots = Snapshots()
    _fit(model, [monitor, snapshots], _loader(x, y, 8), steps=3, accumulate_grad_batches=2)
    assert [step for step, _ in monitor.history] == [0, 1, 2]
    probe = copy.deepcopy(model)
    for step, values in monitor.history:
        probe.load_state_dict(snapshots.states[step])
        first = 16 * step
        micro = [(x[i : i + 8], y[i : i + 8]) for i in (first, first + 8)]
        expected = _dense_q(probe, micro)
        assert values["spectral/hessian/batch_sharpness"] == pytest.approx(expected, rel=1e-9)


def test_adam_has_no_scalar_edge_and_the_ratio_is_undefined_without_a_warning():
    x, y = regression_data(n=32)

    class AdamRegressor(TanhRegressor):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    monitor = BatchSharpnessMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
        trainer.fit(AdamRegressor(), _loader(x, y, 8))
    assert all(math.isnan(v["spectral/hessian/batch_eos_ratio"]) for _, v in monitor.history)
    assert all(math.isfinite(v["spectral/hessian/batch_sharpness"]) for _, v in monitor.history)
    assert not [w for w in caught if "non-finite" in str(w.message)]


def test_training_is_bit_identical_with_the_monitor():
    plain = fit_and_capture([])
    watched = fit_and_capture(
        [BatchSharpnessMonitor(every_n_steps=1), BatchSharpnessMonitor(name="b")]
    )
    assert_identical_runs(plain, watched)


def test_a_stopper_can_watch_batch_sharpness_and_manual_optimization_needs_a_loss():
    x, y = regression_data(n=32)
    monitor = BatchSharpnessMonitor(every_n_steps=1, window=1)
    stopper = SpectralEarlyStopping(
        "spectral/hessian/batch_eos_ratio", rule="above", threshold=0.0, patience=2
    )
    trainer = _fit(TanhRegressor(lr=0.05), [monitor, stopper], _loader(x, y, 8), steps=10)
    assert stopper.stopped_step == 1 and trainer.global_step == 2

    class Manual(TanhRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(F.mse_loss(self(batch[0]), batch[1]))
            optimizer.step()

    with pytest.raises(ValueError, match="pass loss_fn"):
        _fit(Manual(), [BatchSharpnessMonitor(every_n_steps=1)], _loader(x, y, 8), steps=2)
    monitor = BatchSharpnessMonitor(every_n_steps=1, window=1, loss_fn=mse)
    _fit(Manual(), [monitor], _loader(x, y, 8), steps=2)
    assert [step for step, _ in monitor.history] == [0, 1]


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        BatchSharpnessMonitor(window=0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        BatchSharpnessMonitor(loss_fn=lambda model: model)


class SkipsShortBatches(NoisyClassifier):
    """Skips (returns None for) a batch of fewer than 16 samples, as Lightning allows."""

    def training_step(self, batch, batch_idx):
        if batch[0].shape[0] < 16:
            return None
        return super().training_step(batch, batch_idx)


def test_a_batch_the_training_step_skips_logs_nan_and_training_goes_on():
    """Each epoch ends with a batch of 4 that the module skips: batch sharpness, measured on
    each step's own batch, has no loss there and logs NaN with one warning; the other steps
    and the fixed-probe monitor are measured as usual."""
    batch_monitor = BatchSharpnessMonitor(every_n_steps=1)
    sharpness = SharpnessMonitor(every_n_steps=3)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=2, callbacks=[batch_monitor, sharpness], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SkipsShortBatches(), classification_loader(n=100, batch_size=16))
    ours = [str(w.message) for w in caught if "Monitor" in str(w.message)]
    assert len(ours) == 1 and "returned None (it skips this batch)" in ours[0], ours
    values = {s: v["spectral/hessian/batch_sharpness_sample"] for s, v in batch_monitor.history}
    assert sorted(values) == list(range(14))
    assert [s for s, v in values.items() if math.isnan(v)] == [6, 13]
    assert all(v["spectral/hessian/lambda_max"] > 0 for _, v in sharpness.history)
