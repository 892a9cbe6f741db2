"""Hessian-vector products from differences of first-order gradients (hvp="gradient_difference")."""

from __future__ import annotations

import copy
import math
import pathlib

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spectral_callbacks import SharpnessMonitor
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.functional import batch_sharpness, hessian_eigenvalues, hessian_trace
from spectral_callbacks.linalg import ScaledOperator, lanczos

from ..models import (
    NoisyClassifier,
    Saturating,
    Skewed,
    TinyAttention,
    assert_same_state,
    classification_loader,
    cross_entropy_loss,
    make_case,
    model_state,
    skewed_loss,
    trainer_kwargs,
)
from ..oracles import dense_hessian_rows
from ..runs import assert_identical_runs, fit_and_capture, run_worker, small_spectrum_monitor


def _relative_errors(model, batches, loss=cross_entropy_loss, **options):
    with (
        HessianOperator(model, loss, batches) as exact,
        HessianOperator(model, loss, batches, hvp="gradient_difference", **options) as diff,
    ):
        g = torch.Generator().manual_seed(0)
        block = torch.randn(4, exact.size, generator=g, dtype=exact.dtype)
        truth = exact.matmat(block).double()
        approx = diff.matmat(block).double()
        assert diff.num_hvps == 4
        return float(((approx - truth).norm(dim=1) / truth.norm(dim=1)).max()), diff


@pytest.mark.parametrize("case", ["mlp", "cnn", "attention"])
def test_product_error_against_exact_products(case):
    model, batches = make_case(case)  # float64; the CNN's BatchNorm in train mode
    central, operator = _relative_errors(model, batches)
    richardson, other = _relative_errors(model, batches, richardson=True)
    eps = torch.finfo(torch.float64).eps
    assert central < 100 * eps ** (2 / 3) and richardson < 100 * eps ** (2 / 3)
    # The error the operator states (measured when it chose its step) bounds the real one
    # within a factor of 10, so the solvers' confirmation floor is not an underestimate.
    assert central <= 10 * operator.product_relative_error < 1e3 * eps ** (2 / 3)
    assert richardson <= 10 * other.product_relative_error
    single = copy.deepcopy(model).float()
    data = [(x.float(), y) for x, y in batches]
    central32, operator32 = _relative_errors(single, data)
    assert central32 < 100 * torch.finfo(torch.float32).eps ** (2 / 3)
    assert central32 <= 10 * operator32.product_relative_error


def test_products_leave_the_model_exactly_as_found():
    model, batches = make_case("cnn")
    model.train()
    loss = cross_entropy_loss(model, batches[0])
    loss.backward()  # a .grad that must survive
    before = model_state(model)
    g = torch.Generator().manual_seed(4)
    with HessianOperator(model, cross_entropy_loss, batches, hvp="gradient_difference") as op:
        op.matmat(torch.randn(3, op.size, generator=g, dtype=torch.float64))
    assert_same_state(before, model_state(model))


def test_dropout_masks_are_equal_in_both_gradients_of_a_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    model.train()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    # With equal masks the difference is the derivative of one fixed function: the product
    # of the same seeded masks by double backward.
    error, _ = _relative_errors(model, [(x, y)])
    assert error < 1e-8


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward has no derivative of its own."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x):
        return self.second(OnceDifferentiableTanh.apply(self.first(x)))


class ReferenceNet(CustomOpNet):
    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _truth(model, batches, loss=cross_entropy_loss):
    return torch.linalg.eigvalsh(dense_hessian_rows(model, loss, batches)).flip(0)


class WeightNormByHand(nn.Module):
    """``weight_norm(nn.Linear(4, 6))``, tanh, ``nn.Linear(6, 3)`` with ``w = g v / ‖v‖``
    (row norms) in plain ops and the parameters in the same order: the truth for torch's
    parametrization, whose fused kernel's double backward drops terms."""

    def __init__(self, source: nn.Sequential) -> None:
        super().__init__()
        weight = source[0].parametrizations.weight
        self.bias = nn.Parameter(source[0].bias.detach().clone())
        self.g = nn.Parameter(weight.original0.detach().clone())
        self.v = nn.Parameter(weight.original1.detach().clone())
        self.second = copy.deepcopy(source[2])

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return self.second(torch.tanh(nn.functional.linear(x, w, self.bias)))


def custom_function_and_truth() -> tuple[nn.Module, nn.Module]:
    model, reference = CustomOpNet().double(), ReferenceNet().double()
    reference.load_state_dict(model.state_dict())
    return model, reference


def torch_weight_norm_and_truth() -> tuple[nn.Module, nn.Module]:
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    return model, WeightNormByHand(model)


@pytest.mark.parametrize(
    ("case", "data_seed"),
    [(custom_function_and_truth, 1), (torch_weight_norm_and_truth, 2)],
    ids=["once_differentiable", "torch_weight_norm"],
)
def test_a_double_backward_that_drops_terms_is_found_and_measured_under_auto(case, data_seed):
    """torch 2.13 raises nothing for these: double backward silently drops second-order
    terms (of a ``@once_differentiable`` function; of torch's own ``weight_norm``, used by
    wav2vec2's positional convolution and vocoders), which the symmetry probe of the first
    product finds; ``auto`` then measures by gradient differences, to the float64 truth."""
    torch.manual_seed(0)
    model, reference = case()
    g = torch.Generator().manual_seed(data_seed)
    batches = [(torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,)))]
    truth = _truth(reference, batches)
    with pytest.raises(RuntimeError, match=r"asymmetric Hessian.*gradient_difference"):
        hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, hvp="reuse_graph")
    with pytest.warns(RuntimeWarning, match="switches to hvp='gradient_difference'"):
        result = hessian_eigenvalues(model, cross_entropy_loss, batches, k=3, tol=1e-6)
    torch.testing.assert_close(result.eigenvalues, truth[:3], rtol=1e-6, atol=0)
    assert bool(result.converged.all())


class FarFromOrigin(nn.Module):
    """A log-cosh regression whose parameters include a far-off vector (‖θ‖ = 1e4) that the
    loss hardly sees: the a-priori step ``ε^{1/3} (1 + ‖θ‖)`` is far too long for the
    regression's curvature."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 1, bias=False)
        self.offset = nn.Parameter(torch.full((100,), 1e3))

    def forward(self, x):
        return self.linear(x) + 1e-6 * self.offset.sum()


@pytest.mark.parametrize("richardson", [False, True], ids=["central", "richardson"])
def test_the_first_product_is_as_accurate_as_the_stated_error(richardson):
    torch.manual_seed(0)
    model = FarFromOrigin().double()
    x = torch.randn(32, 6, dtype=torch.float64)

    def loss(m, batch):
        return torch.log(torch.cosh(4 * m(batch))).mean()

    dense = dense_hessian_rows(model, loss, [x])
    u = torch.randn(dense.shape[0], dtype=torch.float64)
    u /= u.norm()
    exact = dense @ u
    with HessianOperator(model, loss, x, hvp="gradient_difference", richardson=richardson) as op:
        first, later = op.matmat(torch.stack([u, u]))  # the first vector calibrates the step
        stated = op.product_relative_error
    for product in (first, later):
        assert float((product - exact).norm() / exact.norm()) <= 10 * stated


def _skewed_top(richardson: bool, preconditioned: bool, adapt: bool):
    """λ_max of ``Skewed``'s Hessian (36), or of ``D^½ H D^½`` with ``D_uu = 2`` (72), over
    gradient differences, by an operator built before any product: the actual error and
    the result."""
    model = Skewed().double()
    diagonal = torch.ones(401, dtype=torch.float64)
    diagonal[-1] = 2.0
    with HessianOperator(
        model, skewed_loss, torch.zeros(1), hvp="gradient_difference", richardson=richardson
    ) as hessian:
        if not adapt:
            hessian.adapt_products = lambda: False
        operator = ScaledOperator(hessian, diagonal) if preconditioned else hessian
        a_priori = operator.product_relative_error
        result = lanczos(operator, k=1, tol=1e-9)
        # What the solver read of the products is the error measured, not the a-priori one.
        assert operator.product_relative_error == hessian.product_relative_error != a_priori
    exact = 0.01 * 60.0**2 * (2.0 if preconditioned else 1.0)  # a b² cosh(0) D_uu
    return abs(float(result.eigenvalues[0]) - exact), result


@pytest.mark.parametrize("preconditioned", [False, True], ids=["hessian", "preconditioned"])
@pytest.mark.parametrize("richardson", [False, True], ids=["central", "richardson"])
def test_error_bounds_hold_along_directions_the_calibration_did_not_see(richardson, preconditioned):
    """With the step as calibrated (no adaptation), the pair's bound is the error measured
    along its own vector (for ``D^½ H D^½``: ``D^½ δ(D^½ v)``), which covers the actual
    error far above ``tol``."""
    error, result = _skewed_top(richardson, preconditioned, adapt=False)
    assert error > 0  # the truncation is visible ...
    assert error <= float(result.errors[0])  # ... and within the stated bound
    assert not bool(result.converged[0])  # which is above tol · λ


@pytest.mark.parametrize("preconditioned", [False, True], ids=["hessian", "preconditioned"])
@pytest.mark.parametrize("richardson", [False, True], ids=["central", "richardson"])
def test_solves_re_choose_the_step_for_the_directions_they_find(richardson, preconditioned):
    """The calibration sees the quadratic ``w``; along ``u`` the step is far too long. The
    solver's second run, at the step the errors measured along ``u`` call for, brings the
    value's error down by at least 20× (central: 1.4e-5 → 1.9e-7), within its bound."""
    fixed_error, fixed = _skewed_top(richardson, preconditioned, adapt=False)
    error, result = _skewed_top(richardson, preconditioned, adapt=True)
    assert error <= float(result.errors[0])
    assert 20 * error < fixed_error
    assert result.num_hvps > fixed.num_hvps
    assert result.num_iterations > fixed.num_iterations


def test_a_direction_far_outside_the_step_s_h2_regime_is_called_unresolved():
    """bfloat16 differences along ``u`` (``Saturating``): the value falls far short of
    ``a b² = 9`` and a two-step estimate of the error falls short of that (3.3 for an
    error of 4.0 before this rule); the error is stated as infinite instead, in the
    operator's rows and the solver's bound, while a direction the differences resolve
    (a ``w`` coordinate, the loss quadratic there) keeps a finite error."""
    model, data = Saturating(), torch.zeros(1)
    result = hessian_eigenvalues(model, skewed_loss, data, k=1, tol=1e-2, hvp="gradient_difference")
    assert abs(float(result.eigenvalues[0]) - 9.0) > 1.0  # far off ...
    assert math.isinf(float(result.errors[0]))  # ... and not bounded
    assert not bool(result.converged[0])
    u, w = torch.zeros(2, 401)
    u[-1], w[0] = 1.0, 1.0
    with HessianOperator(model, skewed_loss, data, hvp="gradient_difference") as operator:
        operator.matmat(w[None])  # the calibration
        errors = operator.product_errors_along(torch.stack([u, w]))
    assert torch.isinf(errors[0]).all()
    assert torch.isfinite(errors[1]).all() and float(errors[1].norm()) < 0.25


@pytest.mark.parametrize("adapt", [False, True], ids=["as-calibrated", "second-solve"])
def test_bounds_cover_the_error_near_the_edge_of_the_h2_regime(adapt):
    """float32, ``a b² = 100`` along ``u``, 40,000 coordinates of ``w`` (the calibration
    barely sees ``u``): at the calibrated step (``b h ≈ 0.8``) the two-step estimate is 6 %
    below the error (16.3 for 17.3), after the second solve (``b h ≈ 0.03``) its rounding
    puts it 1.5 % below (0.0343 for 0.0348). The bound carries both margins."""
    model = Saturating(a=0.01, b=100.0, size=40_000, w0=0.005, dtype=torch.float32)
    with HessianOperator(model, skewed_loss, torch.zeros(1), hvp="gradient_difference") as op:
        if not adapt:
            op.adapt_products = lambda: False
        result = lanczos(op, k=1, tol=1e-3)
    error = abs(float(result.eigenvalues[0]) - 100.0)
    assert error > (1e-4 if adapt else 10.0)  # the truncation is visible ...
    assert error <= float(result.errors[0]) <= 2 * error  # ... covered, and not by much


class HalfSquare(nn.Module):
    """``½‖θ‖²`` at ``θ = 0``: every difference is exact, ``(h v − (−h v)) / 2h = v``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(8, dtype=torch.float64))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.theta**2).sum()


def test_exact_differences_have_zero_error_along_any_vector():
    """No truncation and no gradient to round: the error rows are zeros (not ``0/0``), and
    the eigenvalue 1 is converged with a bound at the float64 floor."""
    with HessianOperator(
        HalfSquare(), skewed_loss, torch.zeros(1), hvp="gradient_difference"
    ) as operator:
        result = lanczos(operator, k=1, tol=1e-6)
        errors = operator.product_errors_along(torch.eye(8, dtype=torch.float64)[:2])
    assert torch.equal(errors, torch.zeros_like(errors))
    assert float(result.eigenvalues[0]) == 1.0 and bool(result.converged[0])
    assert float(result.errors[0]) < 1e-12


class SaturatingModule(L.LightningModule):
    """``Saturating`` trained where it stands (``lr = 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Saturating()

    def training_step(self, batch, batch_idx):
        return self.net(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_monitor_logs_an_unresolved_value_as_unbounded_and_says_why():
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-2, hvp="gradient_difference")
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="cannot resolve the curvature along its eigenvector"):
        trainer.fit(SaturatingModule(), [torch.zeros(1)])
    assert monitor.last_metrics["spectral/hessian/lambda_max_error"] == math.inf
    assert monitor.last_metrics["spectral/hessian/lambda_max_converged"] == 0.0


class FirstOrderCosh(torch.autograd.Function):
    """``cosh`` without a double backward: ``hvp="auto"`` switches to differences."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.cosh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sinh(x)


def test_a_solve_that_switched_to_differences_re_chooses_the_step_from_a_cold_start():
    """Under ``hvp="auto"`` the products turn inexact only at the first one, so no Ritz
    vectors were formed for a second run (``return_eigenvectors=False``): it starts cold
    at the re-chosen step, and is as accurate as the warm one."""

    def loss(model, batch):
        return 0.5 * (model.w**2).sum() + model.a * FirstOrderCosh.apply(model.b * model.u).sum()

    fixed_error, _ = _skewed_top(richardson=False, preconditioned=False, adapt=False)
    with pytest.warns(RuntimeWarning, match="carries no graph"):
        result = hessian_eigenvalues(Skewed().double(), loss, torch.zeros(1), k=1, tol=1e-9)
    error = abs(float(result.eigenvalues[0]) - 36.0)
    assert result.eigenvectors is None
    assert error <= float(result.errors[0])
    assert 20 * error < fixed_error


class CheckpointedNet(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        hidden = checkpoint(self.block, self.embed(x), use_reentrant=self.reentrant)
        return self.head(hidden)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(reentrant):
    torch.manual_seed(0)
    model = CheckpointedNet(reentrant).double()
    plain = CheckpointedNet(False).double()
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,)))
        for n in (5, 8)
    ]
    truth = _truth(plain, batches)
    model.embed.weight.grad = torch.ones_like(model.embed.weight)
    grad = model.embed.weight.grad
    result = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=3, tol=1e-6, hvp="gradient_difference"
    )
    torch.testing.assert_close(result.eigenvalues, truth[:3], rtol=1e-6, atol=0)
    assert model.embed.weight.grad is grad and bool((grad == 1).all())
    assert model.head.weight.grad is None


def test_reentrant_checkpointing_is_explained_and_measured_by_differences_under_auto():
    torch.manual_seed(0)
    model = CheckpointedNet(reentrant=True).double()
    plain = CheckpointedNet(False).double()
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,)))
    dense = dense_hessian_rows(plain, cross_entropy_loss, [batch])
    with pytest.raises(
        RuntimeError, match=r"runs through torch.utils.checkpoint with use_reentrant"
    ):
        hessian_eigenvalues(model, cross_entropy_loss, batch, k=1, hvp="reuse_graph")
    with pytest.warns(RuntimeWarning, match="switches to hvp='gradient_difference'"):
        sharpness = batch_sharpness(model, cross_entropy_loss, batch)  # its gradient first
    gradient = torch.cat(
        [
            p.reshape(-1)
            for p in torch.autograd.grad(cross_entropy_loss(plain, batch), plain.parameters())
        ]
    )
    exact = float(gradient @ dense @ gradient / (gradient @ gradient))
    assert sharpness.value == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_top_k_and_trace_match_the_dense_hessian(case):
    model, batches = make_case(case)
    dense = dense_hessian_rows(model, cross_entropy_loss, batches)
    truth = torch.linalg.eigvalsh(dense).flip(0)
    result = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=3, tol=1e-6, hvp="gradient_difference"
    )
    torch.testing.assert_close(result.eigenvalues, truth[:3], rtol=1e-6, atol=0)
    trace = hessian_trace(
        model, cross_entropy_loss, batches, num_hvps=10_000, hvp="gradient_difference"
    )
    assert trace.estimate == pytest.approx(float(dense.trace()), rel=1e-6)


def test_a_tiny_gpt_on_default_attention_kernels():
    torch.manual_seed(0)
    model = TinyAttention().double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1]))]
    truth = _truth(model, batches)
    result = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=2, tol=1e-6, hvp="gradient_difference"
    )
    torch.testing.assert_close(result.eigenvalues, truth[:2], rtol=1e-6, atol=0)


def test_float32_residuals_are_not_claimed_below_the_differences_error():
    model, batches = make_case("mlp")
    single = copy.deepcopy(model).float()
    data = [(x.float(), y) for x, y in batches]
    truth = _truth(model, batches)
    loose = hessian_eigenvalues(
        single, cross_entropy_loss, data, k=1, tol=1e-3, hvp="gradient_difference"
    )
    assert bool(loose.converged.all())
    assert float(loose.eigenvalues[0]) == pytest.approx(float(truth[0]), rel=1e-3)
    tight = hessian_eigenvalues(
        single, cross_entropy_loss, data, k=1, tol=1e-7, hvp="gradient_difference"
    )
    assert not bool(tight.converged.any())  # ε^{2/3} ≈ 2e-5 cannot reach 1e-7


def test_the_monitors_train_bit_identically_with_gradient_differences():
    monitors = [
        SharpnessMonitor(every_n_steps=2, hvp="gradient_difference"),
        small_spectrum_monitor(hvp="gradient_difference"),
    ]
    assert_identical_runs(fit_and_capture([]), fit_and_capture(monitors))
    values = monitors[0].last_metrics
    assert math.isfinite(values["spectral/hessian/lambda_max"])


def test_sharpness_monitor_values_agree_across_paths():
    results, converged = {}, {}
    for hvp in ("reuse_graph", "gradient_difference"):
        monitor = SharpnessMonitor(every_n_steps=2, tol=1e-3, hvp=hvp, eval_mode=True)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=4, callbacks=[monitor], **trainer_kwargs())
        trainer.fit(NoisyClassifier(), classification_loader())
        results[hvp] = [v["spectral/hessian/lambda_max"] for _, v in monitor.history]
        converged[hvp] = [v["spectral/hessian/lambda_max_converged"] for _, v in monitor.history]
    assert results["gradient_difference"] == pytest.approx(results["reuse_graph"], rel=1e-3)
    assert converged["gradient_difference"] == [1.0, 1.0, 1.0]


def test_differences_leave_other_graphs_of_the_model_valid():
    model, batches = make_case("mlp")
    g = torch.Generator().manual_seed(5)
    vector = torch.randn(1, sum(p.numel() for p in model.parameters()), generator=g).double()
    with HessianOperator(model, cross_entropy_loss, batches) as exact:
        first = exact.matmat(vector)  # builds and keeps its first-order graph
        with HessianOperator(
            model, cross_entropy_loss, batches, hvp="gradient_difference"
        ) as differences:
            differences.matmat(vector)
        assert torch.equal(exact.matmat(vector), first)


def test_a_model_sharded_by_fully_shard_matches_the_unsharded_one(tmp_path):
    """torch's FSDP2 over two CPU processes (gloo), shards of 4 and 6 samples."""
    import json
    import socket

    from .fsdp_worker import loss_fn, model_and_data

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = pathlib.Path(__file__).with_name("fsdp_worker.py")
    run_worker(worker, str(tmp_path), port, timeout=300)
    records = [json.loads((tmp_path / f"fsdp{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1]  # every process holds the same numbers
    record = records[0]
    assert record["sharded"] and record["restored"] and record["grads_kept"]
    model, x, y = model_and_data()
    truth = hessian_eigenvalues(model, loss_fn, (x, y), k=2, tol=1e-10)
    assert record["eigenvalues"] == pytest.approx(truth.eigenvalues.tolist(), rel=1e-6)
    assert all(record["converged"])
    # Sharded, the second solve at a step chosen along u, as in one process.
    skewed = record["skewed"]
    fixed_error, fixed = _skewed_top(richardson=False, preconditioned=False, adapt=False)
    error = abs(skewed["eigenvalue"] - 36.0)
    assert error <= skewed["error_bound"] and 20 * error < fixed_error
    assert skewed["num_iterations"] > fixed.num_iterations


def test_sharded_parameters_refuse_the_double_backward_paths():
    model, batches = make_case("mlp")
    with pytest.raises(ValueError, match="shard"):
        # A stand-in for a sharded parameter: anything with a device mesh.
        model[0].weight.device_mesh = object()
        model[0].weight.to_local = lambda: model[0].weight
        HessianOperator(model, cross_entropy_loss, batches, hvp="reuse_graph")


def test_auto_announces_its_switch_once_per_model_and_loss():
    import warnings

    torch.manual_seed(0)
    model = CustomOpNet().double()
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,)))]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):  # three measurements: three operators
            hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, tol=1e-4)
    assert (
        len([w for w in record if "switches to hvp='gradient_difference'" in str(w.message)]) == 1
    )
