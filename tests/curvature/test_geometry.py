"""Where the gradient points and how the top eigenspace moves, against dense float64 truth."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as L
import pytest
import torch

from spectral_callbacks import HessianSpectrumMonitor
from spectral_callbacks.linalg import principal_angles, subspace_fraction, subspace_overlap

from ..models import (
    Quadratic,
    TanhRegressor,
    full_batch_loader,
    mse,
    regression_data,
    trainer_kwargs,
)
from ..oracles import dense_hessian_rows


def test_subspace_measures_in_closed_form():
    n = 6
    e = torch.eye(n, dtype=torch.float64)
    plane = e[:2]
    v = torch.tensor([3.0, 0.0, 4.0, 0, 0, 0], dtype=torch.float64)
    assert subspace_fraction(plane, v) == pytest.approx(9 / 25, rel=1e-14)
    assert math.isnan(subspace_fraction(plane, torch.zeros(n)))
    angle = 0.3
    turned = torch.stack([e[0], math.cos(angle) * e[1] + math.sin(angle) * e[2]])
    angles = principal_angles(plane, turned)
    torch.testing.assert_close(angles, torch.tensor([0.0, angle], dtype=torch.float64))
    assert subspace_overlap(plane, turned) == pytest.approx((1 + math.cos(angle) ** 2) / 2)
    # Not orthonormal rows span the same space: the same answers.
    skewed = torch.stack([turned[0] + 2 * turned[1], 3 * turned[1]])
    assert subspace_overlap(plane, skewed) == pytest.approx(subspace_overlap(plane, turned))


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))


def test_the_spectrum_monitor_logs_overlap_rotation_and_trace_stability():
    x, y = regression_data(n=32, d=3, dtype=torch.float64)
    torch.manual_seed(0)
    model = TanhRegressor(lr=0.2, d=3, width=5).double()
    k = 2
    monitor = HessianSpectrumMonitor(
        every_n_steps=5, k=k, tol=1e-10, trace_hvps=10_000, density=False
    )
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=10, callbacks=[monitor, snapshots], **trainer_kwargs())
    trainer.fit(model, full_batch_loader(x, y, 10))
    history = dict(monitor.history)
    assert sorted(history) == [0, 5, 10]
    assert "spectral/hessian/eigenspace_overlap" not in history[0]  # nothing to compare yet
    vectors = {}
    for step, values in history.items():
        probe = TanhRegressor(d=3, width=5).double()
        probe.load_state_dict(snapshots.states[step])
        dense = dense_hessian_rows(probe, mse, [(x, y)])
        eigenvectors = torch.linalg.eigh(dense).eigenvectors
        top = eigenvectors[:, -k:].T
        vectors[step] = top
        params = list(probe.parameters())
        gradient = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(mse(probe, (x, y)), params)]
        )
        expected = float((top @ gradient).pow(2).sum() / gradient.pow(2).sum())
        assert values["spectral/hessian/gradient_overlap"] == pytest.approx(expected, rel=1e-6)
        assert values["spectral/hessian/trace_lr_ratio"] == pytest.approx(
            float(dense.trace()) * 0.2 / 2, rel=1e-9
        )
    for before, after in ((0, 5), (5, 10)):
        overlap = float((vectors[before] @ vectors[after].T).pow(2).sum()) / k
        assert history[after]["spectral/hessian/eigenspace_overlap"] == pytest.approx(
            overlap, rel=1e-6
        )
        cosines = torch.linalg.svdvals(vectors[before] @ vectors[after].T).clamp(max=1.0)
        assert history[after]["spectral/hessian/eigenspace_angle"] == pytest.approx(
            float(torch.arccos(cosines.min())), abs=1e-6
        )


def test_functional_gradient_overlap_against_the_dense_hessian():
    from spectral_callbacks.functional import gradient_overlap

    from ..models import cross_entropy_loss, make_case

    model, batches = make_case("mlp")
    dense = dense_hessian_rows(model, cross_entropy_loss, batches)
    top = torch.linalg.eigh(dense).eigenvectors[:, -3:].T
    params = [p for p in model.parameters()]
    total = sum(b[0].shape[0] for b in batches)
    gradient = sum(
        (b[0].shape[0] / total)
        * torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(cross_entropy_loss(model, b), params)]
        )
        for b in batches
    )
    expected = float((top @ gradient).pow(2).sum() / gradient.pow(2).sum())
    value = gradient_overlap(model, cross_entropy_loss, batches, k=3, tol=1e-10)
    assert value == pytest.approx(expected, rel=1e-6)
    given = gradient_overlap(model, cross_entropy_loss, batches, eigenvectors=top)
    assert given == pytest.approx(expected, rel=1e-10)


def test_layer_traces_against_dense_diagonal_blocks():
    from spectral_callbacks.functional import hessian_layer_traces

    from ..models import cross_entropy_loss, make_case

    model, batches = make_case("mlp")  # layers "0", "2", "4"
    dense = dense_hessian_rows(model, cross_entropy_loss, batches)
    sizes = {"0": 4 * 6 + 6, "2": 6 * 5 + 5, "4": 5 * 3 + 3}
    bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    truth = {
        name: float(dense[a:b, a:b].trace())
        for name, a, b in zip(sizes, bounds[:-1], bounds[1:], strict=True)
    }
    exact = hessian_layer_traces(model, cross_entropy_loss, batches, num_hvps=10_000)
    assert list(exact) == ["0", "2", "4"]
    for name, estimate in exact.items():
        assert estimate.estimate == pytest.approx(truth[name], rel=1e-10)
        assert estimate.stderr == 0.0
    sampled = hessian_layer_traces(model, cross_entropy_loss, batches, num_hvps=40, seed=1)
    for name, estimate in sampled.items():
        assert abs(estimate.estimate - truth[name]) < 5 * estimate.stderr + 1e-12


def test_sam_sharpness_on_a_quadratic_is_exact():
    from spectral_callbacks.functional import sam_sharpness

    from ..models import model_state

    g = torch.Generator().manual_seed(4)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T
    model = Quadratic(a, seed=3)
    before = model_state(model)
    rho = 0.1
    result = sam_sharpness(model, lambda mod, batch: mod(batch), torch.zeros(1), radius=rho)
    theta = model.theta.detach()
    grad = a @ theta
    unit = grad / grad.norm()
    assert result.gradient_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    expected = rho * float(grad.norm()) + 0.5 * rho**2 * float(unit @ a @ unit)
    assert result.sharpness == pytest.approx(expected, rel=1e-12)
    assert result.perturbed_gradient_norm == pytest.approx(
        float((a @ (theta + rho * unit)).norm()), rel=1e-12
    )
    after = model_state(model)
    assert torch.equal(before["params"]["theta"], after["params"]["theta"])
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        sam_sharpness(model, lambda mod, batch: mod(batch), torch.zeros(1), radius=0.0)


def test_the_spectrum_monitor_logs_layer_traces_and_sam_sharpness(tmp_path):
    from spectral_callbacks.functional import sam_sharpness

    x, y = regression_data(n=32, d=3, dtype=torch.float64)
    torch.manual_seed(0)
    model = TanhRegressor(lr=0.0, d=3, width=5).double()  # lr 0: the final model is measured
    monitor = HessianSpectrumMonitor(
        every_n_steps=2,
        k=1,
        trace=False,
        density=False,
        layer_traces=10_000,
        sam_radius=0.05,
        layer_lambda_max=True,
        tol=1e-10,
    )
    logger = L.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs(logger=logger))
    trainer.fit(model, full_batch_loader(x, y, 2))
    values = monitor.last_metrics
    dense = dense_hessian_rows(model, mse, [(x, y)])
    offset = 0
    for layer in ("net.0", "net.2", "net.4"):
        size = sum(p.numel() for n, p in model.named_parameters() if n.startswith(layer + "."))
        block = float(dense[offset : offset + size, offset : offset + size].trace())
        offset += size
        assert values[f"spectral/hessian/layer/{layer}/trace"] == pytest.approx(block, rel=1e-9)
        assert values[f"spectral/hessian/layer/{layer}/trace_per_param"] == pytest.approx(
            block / size, rel=1e-9
        )
        top = float(
            torch.linalg.eigvalsh(dense[offset - size : offset, offset - size : offset])[-1]
        )
        assert values[f"spectral/hessian/layer/{layer}/lambda_max"] == pytest.approx(top, rel=1e-8)
    reference = sam_sharpness(model, mse, (x, y), radius=0.05)
    assert values["spectral/hessian/sam_sharpness"] == pytest.approx(reference.sharpness, rel=1e-9)
    assert values["spectral/hessian/sam_gradient_norm"] == pytest.approx(
        reference.perturbed_gradient_norm, rel=1e-9
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "spectral/hessian/layer_traces" in events.Tags()["images"]
    with pytest.raises(ValueError, match="layer_traces must be 0"):
        HessianSpectrumMonitor(layer_traces=1)
    with pytest.raises(ValueError, match="sam_radius must be a finite number > 0"):
        HessianSpectrumMonitor(sam_radius=-1.0)


def test_training_stays_bit_identical_with_every_geometry_measure():
    from ..runs import assert_identical_runs, fit_and_capture, small_spectrum_monitor

    monitor = small_spectrum_monitor(layer_traces=4, sam_radius=0.05, layer_lambda_max=True)
    assert_identical_runs(fit_and_capture([]), fit_and_capture([monitor]))
    assert math.isfinite(monitor.last_metrics["spectral/hessian/sam_sharpness"])
    assert math.isfinite(monitor.last_metrics["spectral/hessian/gradient_overlap"])


def test_layer_lambda_max_against_dense_diagonal_blocks():
    from spectral_callbacks.functional import hessian_layer_lambda_max

    from ..models import cross_entropy_loss, make_case

    model, batches = make_case("mlp")
    dense = dense_hessian_rows(model, cross_entropy_loss, batches)
    sizes = {"0": 30, "2": 35, "4": 18}
    bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    results = hessian_layer_lambda_max(model, cross_entropy_loss, batches, tol=1e-10)
    assert list(results) == ["0", "2", "4"]
    for (name, a), b in zip(zip(sizes, bounds[:-1], strict=True), bounds[1:], strict=True):
        truth = float(torch.linalg.eigvalsh(dense[a:b, a:b])[-1])
        assert float(results[name].eigenvalues[0]) == pytest.approx(truth, rel=1e-8)
