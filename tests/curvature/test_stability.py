"""The optimizer-aware stability ratio: thresholds, quadratics with real optimizers, end to end."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spectral_callbacks import SharpnessMonitor, SpectralEarlyStopping
from spectral_callbacks.curvature import stability_preconditioner
from spectral_callbacks.curvature.preconditioner import heavy_ball_threshold, nesterov_threshold
from spectral_callbacks.functional import hessian_eigenvalues, optimizer_stability_ratio

from ..models import Quadratic, TanhRegressor, full_batch_loader, regression_data, trainer_kwargs


def spectral_radius(coefficients) -> float:
    return float(np.abs(np.roots(coefficients)).max())


def numerical_boundary(polynomial, high=50.0) -> float:
    """The smallest h > 0 where the update's spectral radius reaches 1 (bisection)."""
    low = 1e-6
    assert spectral_radius(polynomial(low)) < 1
    while spectral_radius(polynomial(high)) < 1:
        high *= 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if spectral_radius(polynomial(mid)) < 1 else (low, mid)
    return low


@settings(max_examples=40, deadline=None)
@given(beta=st.floats(min_value=0.0, max_value=0.98), tau=st.floats(min_value=0.0, max_value=0.9))
def test_heavy_ball_threshold_is_where_the_spectral_radius_reaches_one(beta, tau):
    # b <- beta b + (1 - tau) h theta; theta <- theta - b  (per eigen-direction, h = eta lambda)
    def polynomial(h):
        return [1.0, -(1 + beta - (1 - tau) * h), beta]

    assert heavy_ball_threshold(beta, tau) == pytest.approx(
        numerical_boundary(polynomial), rel=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(beta=st.floats(min_value=0.0, max_value=0.98))
def test_nesterov_threshold_is_where_the_spectral_radius_reaches_one(beta):
    def polynomial(h):
        return [1.0, -(1 + beta) * (1 - h), beta * (1 - h)]

    assert nesterov_threshold(beta) == pytest.approx(numerical_boundary(polynomial), rel=1e-6)


def quadratic_loss(model, batch):
    return model.loss()


OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=1.0), 0),
    "sgd-weight-decay": (lambda p: torch.optim.SGD(p, lr=1.0, weight_decay=0.5), 0),
    "heavy-ball": (lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9), 0),
    "heavy-ball-dampened": (lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5, dampening=0.3), 0),
    "nesterov": (lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, nesterov=True), 0),
    # Adaptive optimizers with a large eps keep their preconditioner nearly frozen, which is
    # the assumption of the linear analysis; warm-up steps at lr 0 fill their state. (With a
    # small eps, RMSprop and Adagrad past the edge grow ~50x and then stabilise themselves:
    # their second-moment estimate follows the growing gradients and shrinks the step.)
    "adam": (lambda p: torch.optim.Adam(p, lr=1.0, eps=1e3), 400),
    "adam-l2": (lambda p: torch.optim.Adam(p, lr=1.0, eps=1e3, weight_decay=0.5), 400),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1.0, eps=1e3, weight_decay=0.0), 400),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1.0, eps=1e5), 600),
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=1.0, eps=1e5, centered=True), 600),
    "rmsprop-momentum": (lambda p: torch.optim.RMSprop(p, lr=1.0, eps=1e5, momentum=0.5), 600),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=1.0, eps=1e6, lr_decay=1e-4), 1),
}


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_real_optimizer_converges_or_diverges_as_the_ratio_says(name, factor):
    make, warmup = OPTIMIZERS[name]
    model = Quadratic()
    optimizer = make(model.parameters())
    _set_lr(optimizer, 0.0)
    for _ in range(warmup):  # fill the optimizer's state without moving θ
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
    _set_lr(optimizer, 1.0)
    at_unit_lr = optimizer_stability_ratio(
        model, quadratic_loss, torch.zeros(1), optimizer, tol=1e-10
    ).eos_ratio
    # D is proportional to the learning rate, so this lr puts the ratio at `factor`.
    _set_lr(optimizer, factor / at_unit_lr)
    ratio = optimizer_stability_ratio(
        model, quadratic_loss, torch.zeros(1), optimizer, tol=1e-10
    ).eos_ratio
    assert ratio == pytest.approx(factor, rel=1e-8)
    start = float(model.theta.norm())
    largest = start
    for _ in range(3000):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
        norm = float(model.theta.norm())
        largest = max(largest, norm)
        if not math.isfinite(norm) or norm > 1e3 * start or norm < 1e-6 * start:
            break
    if factor < 1:
        assert float(model.theta.norm()) < 1e-3 * start, (name, float(model.theta.norm()))
    else:
        assert largest > 1e2 * start, (name, largest / start)


def test_sgd_without_momentum_is_exactly_lambda_max_lr_over_two():
    model = Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.07)
    ratio = optimizer_stability_ratio(model, quadratic_loss, torch.zeros(1), optimizer)
    assert ratio.eos_ratio == pytest.approx(10.0 * 0.07 / 2, rel=1e-9)
    assert ratio.threshold == 2.0 and ratio.preconditioned_sharpness == pytest.approx(0.7, rel=1e-9)


def test_parameter_groups_with_different_steps_and_thresholds():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9},
            {"params": model[2].parameters(), "lr": 0.02},
        ]
    )
    params = list(model.parameters())
    preconditioner = stability_preconditioner(optimizer, params)
    sizes = [p.numel() for p in params]
    first = sizes[0] + sizes[1]
    assert torch.all(preconditioner.step[:first] == 0.1) and torch.all(
        preconditioner.step[first:] == 0.02
    )
    assert torch.allclose(preconditioner.threshold[:first], torch.tensor(3.8, dtype=torch.float64))
    # The ratio is the top eigenvalue of D̃^½ H D̃^½, checked against the dense Hessian.
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    shapes = [p.shape for p in params]

    def loss_of(vector):
        values, offset = [], 0
        for shape in shapes:
            values.append(vector[offset : offset + shape.numel()].reshape(shape))
            offset += shape.numel()
        names = [n for n, _ in model.named_parameters()]
        return loss_fn(
            lambda inp: torch.func.functional_call(
                model, dict(zip(names, values, strict=True)), (inp,)
            ),
            (x, y),
        )

    hessian = torch.func.hessian(loss_of)(flat)
    scale = preconditioner.scaled_step.sqrt()
    exact = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1]
    ratio = optimizer_stability_ratio(model, loss_fn, (x, y), optimizer, tol=1e-10)
    assert ratio.eos_ratio == pytest.approx(float(exact), rel=1e-8)
    assert math.isnan(ratio.threshold)
    by_blocks = optimizer_stability_ratio(
        model, loss_fn, (x, y), optimizer, tol=1e-10, method="block_lanczos", block_size=2
    )
    assert by_blocks.eos_ratio == pytest.approx(float(exact), rel=1e-8)
    assert by_blocks.num_hvps % 2 == 0
    via_functional = hessian_eigenvalues(
        model, loss_fn, (x, y), k=1, tol=1e-10, preconditioner=preconditioner
    )
    assert float(via_functional.eigenvalues[0]) == pytest.approx(float(exact), rel=1e-8)
    plain_d = hessian_eigenvalues(
        model, loss_fn, (x, y), k=1, tol=1e-10, preconditioner=preconditioner.step
    )
    exact_d = torch.linalg.eigvalsh(
        preconditioner.step.sqrt()[:, None] * hessian * preconditioner.step.sqrt()[None, :]
    )[-1]
    assert float(plain_d.eigenvalues[0]) == pytest.approx(float(exact_d), rel=1e-8)


class AdamRegressor(TanhRegressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class AdamaxRegressor(TanhRegressor):
    def configure_optimizers(self):
        return torch.optim.Adamax(self.parameters(), lr=self.lr)


def test_adam_settles_at_its_adaptive_edge_of_stability():
    """Cohen et al. 2022: full-batch Adam hovers where λ_max(P⁻¹H) = 38/lr, not at 2/lr."""
    torch.manual_seed(0)
    x, y = regression_data(n=64)
    torch.manual_seed(1)
    monitor = SharpnessMonitor(every_n_steps=25)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(AdamRegressor(lr=0.03), full_batch_loader(x, y, 800))
    history = dict(monitor.history)
    assert math.isnan(history[0]["spectral/hessian/eos_ratio"])  # no preconditioner before step 1
    late = [history[s] for s in range(300, 801, 25)]
    ratios = [v["spectral/hessian/eos_ratio"] for v in late]
    naive = [v["spectral/hessian/lambda_max"] * 0.03 / 2 for v in late]
    assert all(0.7 < r < 1.3 for r in ratios), ratios
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.12)
    assert max(naive) < 0.3  # the plain ratio is far from the edge
    assert all(v["spectral/hessian/stability_threshold"] == pytest.approx(38.0) for v in late)
    assert all(math.isnan(v["spectral/hessian/stability_limit"]) for v in late)


def test_unsupported_optimizer_logs_the_plain_ratio_with_one_warning():
    torch.manual_seed(0)
    x, y = regression_data(n=32)
    monitor = SharpnessMonitor(every_n_steps=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(AdamaxRegressor(lr=0.01), full_batch_loader(x, y, 6))
    ours = [w for w in caught if "SharpnessMonitor" in str(w.message)]
    assert len(ours) == 1 and "Adamax is not supported" in str(ours[0].message)
    for _, values in monitor.history:
        assert values["spectral/hessian/eos_ratio"] == pytest.approx(
            values["spectral/hessian/lambda_max"] * 0.01 / 2
        )


class AscentRegressor(TanhRegressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, maximize=True)


@pytest.mark.parametrize("optimizer_aware", [True, False])
@pytest.mark.parametrize(
    "module, unsupported",
    [(AdamaxRegressor, "Adamax is not supported"), (AscentRegressor, "maximize=True")],
    ids=["Adamax", "SGD ascent"],
)
def test_no_stopping_rule_acts_on_the_stand_in_ratio(module, unsupported, optimizer_aware):
    """``λ_max · lr / 2`` stands in for the ratio of an optimizer without a derivation (and
    of gradient ascent, whose edge λ_min sets): logged, warned, but it says nothing of that
    run's stability, so the sharpness rule does not stop on it (it stopped LBFGS and
    Adadelta runs, whose lr of 1 puts it above 1). Asked for with ``optimizer_aware=False``,
    it is the ratio the rule reads."""
    torch.manual_seed(0)
    x, y = regression_data(n=32)
    monitor = SharpnessMonitor(every_n_steps=2, optimizer_aware=optimizer_aware)
    stopper = SpectralEarlyStopping.sharpness(margin=0.0, patience=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor, stopper], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module(lr=0.5), full_batch_loader(x, y, 4))
    first = monitor.history[0][1]
    assert first["spectral/hessian/eos_ratio"] == pytest.approx(
        first["spectral/hessian/lambda_max"] * 0.5 / 2
    )
    assert first["spectral/hessian/eos_ratio"] > 1.0
    said = [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]
    if optimizer_aware:
        assert stopper.stopped_step is None and trainer.global_step == 4
        assert len(said) == 1 and unsupported in said[0] and "no SpectralEarlyStopping" in said[0]
    else:
        assert stopper.stopped_step == 0 and not said


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_uses_the_bias_corrections_of_the_next_update(amsgrad):
    """After t steps: D = lr / ((1 - β₁^{t+1}) (√(v / (1 - β₂^{t+1})) + ε)), the step the ratio
    predicts, not the one taken (1 - β₂^t), which differs by √2 at t = 1 (docs/sharpness.md)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad
    )
    x = torch.randn(8, 3)
    for _ in range(1):  # t = 1
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    params = list(model.parameters())
    preconditioner = stability_preconditioner(optimizer, params)
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    v = torch.cat([optimizer.state[p][key].reshape(-1) for p in params])
    t = 1
    expected = lr / ((1 - beta1 ** (t + 1)) * ((v / (1 - beta2 ** (t + 1))).sqrt() + eps))
    assert torch.allclose(preconditioner.step, expected, rtol=1e-6)
    taken = lr / ((1 - beta1 ** (t + 1)) * ((v / (1 - beta2**t)).sqrt() + eps))
    assert float((preconditioner.step / taken).mean()) == pytest.approx(2**0.5, rel=1e-3)
