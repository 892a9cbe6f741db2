"""HessianOperator and the public functions against dense float64 Hessians of small models."""

from __future__ import annotations

import copy
import dataclasses
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_callbacks.curvature import HessianOperator, NonFiniteLossError
from spectral_callbacks.curvature.products import explain_second_order_failure
from spectral_callbacks.curvature.products.forward_over_reverse import DisagreeingProducts
from spectral_callbacks.functional import (
    gradient_overlap,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)
from spectral_callbacks.linalg import slq
from spectral_callbacks.linalg._precision import ieee_float32

from ..models import (
    CASES,
    BasisSpy,
    TinyAttention,
    assert_same_state,
    cross_entropy_loss,
    host_random_masks,
    make_case,
    model_state,
    mse,
    noisy_mlp,
    padded_tokens_case,
    tanh_mlp,
)
from ..oracles import assert_within_stated_bounds, dense_hessian_func, dense_hessian_rows


def test_oracles_agree():
    model, batches = make_case("mlp")
    by_func = dense_hessian_func(model, cross_entropy_loss, batches)
    by_rows = dense_hessian_rows(model, cross_entropy_loss, batches)
    assert torch.allclose(by_func, by_rows, atol=1e-12)


def test_default_attention_kernel_has_no_double_backward():
    """The attention case is meaningful: without our math-kernel fallback it fails."""
    model, batches = make_case("attention")
    params = list(model.parameters())
    grads = torch.autograd.grad(cross_entropy_loss(model, batches[0]), params, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for"):
        torch.autograd.grad(sum(g.sum() for g in grads), params)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse"])
def test_hessian_products_match_dense(name, hvp, case_hessian):
    model, batches = make_case(name)
    hessian = case_hessian(name)
    with HessianOperator(model, cross_entropy_loss, batches, hvp=hvp) as op:
        assert op.size == hessian.shape[0]
        block = torch.randn(
            3, op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
        assert torch.allclose(op.matvec(block[0]), hessian @ block[0], atol=1e-10)
        assert op.num_hvps == 4


def test_batches_are_weighted_by_size():
    model, batches = make_case("mlp")
    # One concatenated batch is the same dataset loss as the unequal batches.
    joined = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with (
        HessianOperator(model, cross_entropy_loss, batches) as split,
        HessianOperator(model, cross_entropy_loss, joined) as whole,
    ):
        assert torch.allclose(split.matvec(v), whole.matvec(v), atol=1e-12)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top_k_eigenvalues_match_eigvalsh(name, which, case_hessian):
    model, batches = make_case(name)
    hessian = case_hessian(name)
    exact = torch.linalg.eigvalsh(hessian)
    order = {"LA": exact.flip(0), "SA": exact, "LM": exact[exact.abs().argsort(descending=True)]}[
        which
    ]
    k, tol = 4, 1e-6
    result = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=k, which=which, tol=tol, return_eigenvectors=True
    )
    assert result.converged.all()
    # Each value within its stated error bound of the dense float64 spectrum.
    assert_within_stated_bounds(result, order[:k], tol, slack=1e-12)
    vectors = result.eigenvectors
    residuals = (vectors @ hessian - result.eigenvalues.unsqueeze(1) * vectors).norm(dim=1)
    assert torch.allclose(residuals, result.residuals, rtol=1e-3, atol=1e-12)
    assert result.num_hvps >= k


@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_methods_agree_on_a_model(method, case_hessian):
    model, batches = make_case("cnn")
    exact = torch.linalg.eigvalsh(case_hessian("cnn")).flip(0)[:3]
    result = hessian_eigenvalues(model, cross_entropy_loss, batches, k=3, tol=1e-6, method=method)
    assert result.method == method
    assert torch.allclose(result.eigenvalues, exact, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_bounded_basis_matches_eigvalsh(monkeypatch, name, case_hessian):
    spy = BasisSpy(monkeypatch)
    model, batches = make_case(name)
    hessian = case_hessian(name)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    k, tol = 2, 1e-6
    result = hessian_eigenvalues(
        model,
        cross_entropy_loss,
        batches,
        k=k,
        tol=tol,
        max_iter=2000,
        max_basis=6,
        return_eigenvectors=True,
    )
    # every restart with a full basis of 6 vectors
    assert spy.restart_steps and set(spy.restart_steps) == {5}
    assert result.converged.all()
    assert_within_stated_bounds(result, exact[:k], tol, slack=1e-12)
    vectors = result.eigenvectors
    residuals = (vectors @ hessian - result.eigenvalues.unsqueeze(1) * vectors).norm(dim=1)
    assert torch.allclose(residuals, result.residuals, rtol=1e-3, atol=1e-12)


def test_float32_model_within_tolerance_of_float64(case_hessian):
    model, batches = make_case("mlp")
    exact = torch.linalg.eigvalsh(case_hessian("mlp"))[-1]
    model32 = copy.deepcopy(model).float()
    batches32 = [(x.float(), y) for x, y in batches]
    result = hessian_eigenvalues(model32, cross_entropy_loss, batches32, k=1, tol=1e-3)
    assert result.eigenvalues.dtype == torch.float64
    assert abs(float(result.eigenvalues[0]) - float(exact)) <= 1e-3 * abs(float(exact))


@pytest.mark.parametrize("name", CASES)
def test_trace_against_exact(name, case_hessian):
    model, batches = make_case(name)
    exact = float(torch.trace(case_hessian(name)))
    estimate = hessian_trace(model, cross_entropy_loss, batches, num_hvps=30, seed=3)
    assert abs(estimate.estimate - exact) <= 4 * estimate.stderr
    full = hessian_trace(model, cross_entropy_loss, batches, num_hvps=10_000)
    assert full.num_hvps == case_hessian(name).shape[0] and full.stderr == 0
    assert full.estimate == pytest.approx(exact, abs=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_trace_deflated_by_a_top_k_solve_against_exact(name, case_hessian):
    model, batches = make_case(name)
    hessian = case_hessian(name)
    exact = float(torch.trace(hessian))
    top = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=4, tol=1e-8, return_eigenvectors=True
    )
    estimate = hessian_trace(model, cross_entropy_loss, batches, num_hvps=30, seed=3, deflate=top)
    assert abs(estimate.estimate - exact) <= 4 * estimate.stderr
    # Independent reference for the complement's part: the dense Hessian projected off the
    # top-4 eigenvectors, whose Frobenius norm bounds the Hutchinson variance.
    vectors = top.eigenvectors.double()
    projector = torch.eye(hessian.shape[0], dtype=torch.float64) - vectors.T @ vectors
    rest = projector @ hessian @ projector
    assert estimate.stderr <= 4 * float(torch.linalg.matrix_norm(rest)) * (2 / 30) ** 0.5
    assert estimate.num_hvps <= 30
    values_only = dataclasses.replace(top, eigenvectors=None)
    with pytest.raises(ValueError, match="return_eigenvectors=True"):
        hessian_trace(model, cross_entropy_loss, batches, deflate=values_only)


@pytest.mark.parametrize("name", CASES)
def test_density_deflated_by_a_top_k_solve_against_exact(name, case_hessian):
    model, batches = make_case(name)
    spectrum = torch.linalg.eigvalsh(case_hessian(name))
    n = spectrum.numel()
    top = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=4, tol=1e-8, return_eigenvectors=True
    )
    density = hessian_density(
        model, cross_entropy_loss, batches, num_probes=3, steps=n, seed=1, deflate=top
    )
    # The top four are exact nodes of weight 1/n; run to the end, each probe's rule of the
    # complement reaches the smallest eigenvalue.
    assert torch.allclose(density.nodes[:, -4:], spectrum[-4:].flip(0).expand(3, -1), atol=1e-7)
    assert torch.allclose(density.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert density.lambda_min == pytest.approx(float(spectrum[0]), abs=1e-7)
    with pytest.raises(ValueError, match="return_eigenvectors=True"):
        hessian_density(
            model, cross_entropy_loss, batches, deflate=dataclasses.replace(top, eigenvectors=None)
        )


@pytest.mark.parametrize("name", CASES)
def test_density_moments_match_dense(name, case_hessian):
    model, batches = make_case(name)
    hessian = case_hessian(name)
    g = torch.Generator().manual_seed(2)
    probes = (2 * torch.randint(0, 2, (3, hessian.shape[0]), generator=g) - 1).double()
    steps = 6
    with HessianOperator(model, cross_entropy_loss, batches) as op:
        density = slq(op, steps=steps, probes=probes)
    power = probes.clone()
    scale = torch.linalg.matrix_norm(hessian, ord=2)
    for order in range(2 * steps):
        exact = (probes * power).sum(dim=1) / (probes * probes).sum(dim=1)
        assert torch.allclose(density.moment(order), exact, rtol=1e-7, atol=1e-9 * scale**order), (
            order
        )
        power = power @ hessian
    public = hessian_density(model, cross_entropy_loss, batches, num_probes=4, steps=8)
    assert public.num_hvps == 32
    assert torch.allclose(public.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))
    grid = torch.linspace(float(public.nodes.min()) - 1, float(public.nodes.max()) + 1, 2001)
    assert float(torch.trapezoid(public.evaluate(grid, sigma=0.05), grid)) == pytest.approx(
        1.0, abs=1e-4
    )
    assert 0.0 <= public.negative_mass <= public.negative_mass + public.near_zero_mass <= 1.0


def test_negative_mass_against_the_dense_spectrum_of_a_trained_tanh_mlp():
    # The demo's model: after 2,000 steps of gradient descent 48 % of its Hessian's
    # eigenvalues are negative, all within 0.6 % of λ_max of zero. Quadrature nodes below
    # zero carry 75 % of the mass there, so the monitors report the resolved fractions.
    from spectral_callbacks.workloads import TanhRegressor, teacher_regression

    torch.manual_seed(1)
    x, y = teacher_regression()
    model = TanhRegressor(lr=0.3).double()
    x, y = x.double(), y.double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(2000):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    eigenvalues = torch.linalg.eigvalsh(dense_hessian_func(model, mse, [(x, y)]))
    density = hessian_density(model, mse, (x, y), num_probes=8, steps=48)
    assert density.spectral_radius == pytest.approx(float(eigenvalues.abs().max()), rel=1e-6)
    cut = 0.01 * float(eigenvalues.abs().max())
    assert float((eigenvalues < 0).double().mean()) > 0.4  # the bulk straddles zero
    assert density.negative_mass == pytest.approx(
        float((eigenvalues < -cut).double().mean()), abs=0.03
    )
    assert density.near_zero_mass == pytest.approx(
        float((eigenvalues.abs() <= cut).double().mean()), abs=0.03
    )
    # The smallest eigenvalue, -0.6 % of λ_max, from the same quadrature's smallest node.
    low = float(eigenvalues[0])
    assert -0.01 * float(eigenvalues[-1]) < low < 0
    assert low <= density.lambda_min <= low + 1e-5 * float(eigenvalues[-1])
    assert abs(density.lambda_min - low) <= density.lambda_min_residual


def test_parameter_filter_gives_the_diagonal_block(case_hessian):
    model, batches = make_case("mlp")
    hessian = case_hessian("mlp")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[: names.index("2.weight")])
    stop = start + sizes[names.index("2.weight")] + sizes[names.index("2.bias")]
    block = hessian[start:stop, start:stop]
    exact = torch.linalg.eigvalsh(block).flip(0)[:2]
    for selector in ("^2\\.", ["2"], lambda name: name.startswith("2.")):
        result = hessian_eigenvalues(
            model, cross_entropy_loss, batches, k=2, tol=1e-8, params=selector
        )
        assert torch.allclose(result.eigenvalues, exact, rtol=1e-6), selector


class _NoisyModel(nn.Module):
    """Dropout and BatchNorm in train mode: randomness and buffers a measurement must not touch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = noisy_mlp(4, 8, 3, dropout=0.3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.body(x))


def test_measurements_leave_the_model_untouched():
    torch.manual_seed(0)
    model = _NoisyModel().double()
    model.train()
    model.body[3].eval()  # a mixed-mode model: one submodule in eval
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    cross_entropy_loss(model, (x, y)).backward()  # .grad present and non-zero
    before = model_state(model)
    for hvp in ("reuse_graph", "forward_over_reverse"):
        hessian_eigenvalues(model, cross_entropy_loss, (x, y), k=2, hvp=hvp)
        hessian_eigenvalues(model, cross_entropy_loss, (x, y), k=5, method="block_lanczos", hvp=hvp)
        hessian_trace(model, cross_entropy_loss, (x, y), num_hvps=9, hvp=hvp)
        hessian_density(model, cross_entropy_loss, (x, y), num_probes=2, steps=4, hvp=hvp)
    assert_same_state(before, model_state(model))


def test_dropout_masks_are_fixed_within_a_measurement():
    """With dropout active the Hessian is that of one fixed mask; both paths agree."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double().train()
    )
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,)))
    n = sum(p.numel() for p in model.parameters())
    eye = torch.eye(n, dtype=torch.float64)
    with HessianOperator(model, cross_entropy_loss, batch, hvp="reuse_graph", seed=4) as a:
        h_reuse = a.matmat(eye)
    with HessianOperator(model, cross_entropy_loss, batch, hvp="forward_over_reverse", seed=4) as b:
        h_vmap = b.matmat(eye)
    assert torch.allclose(h_reuse, h_reuse.T, atol=1e-12)
    assert torch.allclose(h_reuse, h_vmap, atol=1e-12)


class HostRandomMLP(nn.Module):
    """A tanh MLP whose training forward masks its input from NumPy and Python's random."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x):
        return self.net(host_random_masks(x) if self.training else x)


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse", "gradient_difference"])
def test_numpy_and_python_random_draws_are_fixed_within_a_measurement(hvp):
    """Masks a model draws from NumPy's global RNG or ``random`` (wav2vec2's SpecAugment)
    are those of the measurement's seed in every forward pass, so the Hessian is that of one
    fixed mask; the caller's NumPy and Python streams are left where they were."""
    torch.manual_seed(0)
    model = HostRandomMLP().double().train()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,)))

    def seeded_loss(module, b):
        np.random.seed(4)
        random.seed(4)
        return cross_entropy_loss(module, b)

    dense = dense_hessian_rows(model, seeded_loss, [batch])
    np.random.seed(11)
    random.seed(11)
    numpy_before, python_before = np.random.get_state()[1].copy(), random.getstate()
    with HessianOperator(model, cross_entropy_loss, batch, hvp=hvp, seed=4) as operator:
        measured = operator.matmat(torch.eye(operator.size, dtype=torch.float64))
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    assert random.getstate() == python_before
    # Outside a `with` block every forward pass saves and restores the streams itself.
    unscoped = HessianOperator(model, cross_entropy_loss, batch, hvp=hvp, seed=4)
    try:
        torch.testing.assert_close(unscoped.matmat(torch.eye(unscoped.size).double()), measured)
    finally:
        unscoped.close()
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    assert random.getstate() == python_before
    tolerance = 1e-6 if hvp == "gradient_difference" else 1e-12
    torch.testing.assert_close(measured, dense, rtol=0, atol=tolerance * float(dense.abs().max()))


class EmbeddingRegressor(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)

    def forward(self, indices):
        return self.head(torch.tanh(self.embedding(indices))).squeeze(-1)


def test_sparse_embedding_gradients_are_measured_like_dense_ones():
    """``nn.Embedding(sparse=True)`` has sparse gradients (and sparse second derivatives):
    every measure equals that of the same model with a dense embedding."""
    torch.manual_seed(0)
    dense_model = EmbeddingRegressor(sparse=False).double()
    sparse_model = EmbeddingRegressor(sparse=True).double()
    sparse_model.load_state_dict(dense_model.state_dict())
    g = torch.Generator().manual_seed(3)
    batch = (torch.randint(0, 10, (32,), generator=g), torch.randn(32, generator=g).double())
    truth = torch.linalg.eigvalsh(dense_hessian_rows(dense_model, mse, [batch]))
    result = hessian_eigenvalues(sparse_model, mse, batch, k=3, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, truth.flip(0)[:3], rtol=1e-10, atol=1e-12)
    trace = hessian_trace(sparse_model, mse, batch, num_hvps=200)
    assert trace.estimate == pytest.approx(float(truth.sum()), rel=1e-10)
    overlaps = [
        gradient_overlap(m, mse, batch, k=2, tol=1e-10) for m in (dense_model, sparse_model)
    ]
    assert overlaps[1] == pytest.approx(overlaps[0], rel=1e-8)


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_torchscript_submodules_keep_off_the_forward_over_reverse_path():
    """``torch.func.functional_call`` cannot hand a ``torch.jit.script`` module the
    parameters it differentiates: forward-over-reverse products would miss its terms (here
    they read the Hessian as 0, converged, for a true λ_max of 0.90). Asked for, that path is
    refused; ``auto`` never takes it."""
    torch.manual_seed(0)
    plain = tanh_mlp((4, 6, 2)).double()
    model = Holder(torch.jit.script(copy.deepcopy(plain)))
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,)))
    truth = torch.linalg.eigvalsh(dense_hessian_rows(plain, cross_entropy_loss, [batch]))
    for hvp in ("auto", "reuse_graph", "gradient_difference"):
        result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=3, tol=1e-9, hvp=hvp)
        torch.testing.assert_close(result.eigenvalues, truth.flip(0)[:3], rtol=1e-7, atol=0)
    for hvp in ("forward_over_reverse", "compiled"):
        with pytest.raises(ValueError, match=r"TorchScript modules \(inner, inner\.0"):
            HessianOperator(model, cross_entropy_loss, batch, hvp=hvp)
    with HessianOperator(model, cross_entropy_loss, batch) as operator:
        operator.device = torch.device("cuda")  # where auto takes vmapped blocks: not here
        assert operator.path_for(8) == "reuse_graph"
    with HessianOperator(plain, cross_entropy_loss, batch) as operator:
        operator.device = torch.device("cuda")
        assert operator.path_for(8) == "forward_over_reverse"


class ListHeld(nn.Module):
    """Its head's weight also kept in a plain list, and read from there in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.held = [self.head.weight]

    def forward(self, x):
        return F.linear(torch.tanh(self.first(x)), self.held[0], self.head.bias)


def test_forward_over_reverse_products_are_checked_against_double_backward():
    """``functional_call`` replaces the registered ``head.weight``, not the list's reference
    to it, so forward-over-reverse reads that block as 0: its first product is compared with
    double backward's, and the path is refused; double backward is exact."""
    torch.manual_seed(0)
    model = ListHeld().double()
    g = torch.Generator().manual_seed(6)
    batch = (torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,)))
    truth = torch.linalg.eigvalsh(dense_hessian_rows(model, cross_entropy_loss, [batch]))
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, tol=1e-9)
    torch.testing.assert_close(result.eigenvalues, truth.flip(0)[:2], rtol=1e-7, atol=0)
    with pytest.raises(RuntimeError, match=r"differ from double backward's by .* plain list"):
        hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, hvp="forward_over_reverse")


def test_warm_start_after_a_training_step_needs_fewer_hvps():
    model, batches = make_case("mlp")
    first = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=1, tol=1e-3, return_eigenvectors=True
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in batches:
        optimizer.zero_grad()
        cross_entropy_loss(model, batch).backward()
        optimizer.step()
    cold = hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, tol=1e-3)
    warm = hessian_eigenvalues(
        model, cross_entropy_loss, batches, k=1, tol=1e-3, start=first.eigenvectors
    )
    assert warm.converged.all() and cold.converged.all()
    assert abs(float(warm.eigenvalues[0] - cold.eigenvalues[0])) <= 2e-3 * abs(
        float(cold.eigenvalues[0])
    )
    # The random part of the mixed warm start (WARM_START_MIXING) has to be filtered out as
    # in a cold start, so on this 83-parameter model the saving is small: 8 against 10 (a pure
    # warm start took 4). On models with 10^4-10^6 parameters it is a half to two thirds.
    assert warm.num_hvps < cold.num_hvps, (warm.num_hvps, cold.num_hvps)


def test_measurement_inside_autocast_is_done_in_full_precision():
    model, batches = make_case("mlp")
    model32 = copy.deepcopy(model).float()
    batches32 = [(x.float(), y) for x, y in batches]
    plain = hessian_eigenvalues(model32, cross_entropy_loss, batches32, k=1, tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = hessian_eigenvalues(model32, cross_entropy_loss, batches32, k=1, tol=1e-6)
    assert float(inside.eigenvalues[0]) == pytest.approx(float(plain.eigenvalues[0]), rel=1e-6)


@pytest.fixture
def reduced_float32_precision():
    """float32 matrix products at bfloat16 precision on the CPU (oneDNN), as
    ``torch.set_float32_matmul_precision("medium")`` sets them; put back after the test."""
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


def test_measurement_under_reduced_float32_precision_is_done_in_ieee_float32(
    reduced_float32_precision,
):
    """Under "medium", oneDNN runs float32 products in bfloat16 on CPUs that have it (a
    64-wide product off by about 3e-3; CPUs without bfloat16 units stay in float32): every
    forward pass of the measurement sees IEEE float32 settings, the result agrees with
    float64 to float32's accuracy, and the user's setting is as it was."""
    torch.manual_seed(0)
    model = tanh_mlp((64, 64, 4))
    batch = (torch.randn(64, 64), torch.randint(0, 4, (64,)))
    exact = hessian_eigenvalues(
        copy.deepcopy(model).double(),
        cross_entropy_loss,
        (batch[0].double(), batch[1]),
        k=2,
        tol=1e-10,
    ).eigenvalues
    seen = []

    def loss(module, b):
        seen.append(torch.get_float32_matmul_precision())
        return cross_entropy_loss(module, b)

    result = hessian_eigenvalues(model, loss, batch, k=2, tol=1e-5)
    assert seen and set(seen) == {"highest"}
    assert bool(result.converged.all())
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-6, atol=0)
    assert torch.get_float32_matmul_precision() == "medium"


def test_code_that_reads_the_legacy_precision_flags_still_can_inside_and_after():
    """Hugging Face's CTC loss runs under ``torch.backends.cudnn.flags()``, which reads
    torch's legacy TF32 flags. Per-operation settings made inside a measurement made those
    getters raise, inside and for the rest of the run; the guard keeps them readable and
    puts back the same flags (also where it turns cuDNN's TF32 off, as on a GPU)."""
    model, batches = make_case("mlp")
    model32 = copy.deepcopy(model).float()
    batch = (batches[0][0].float(), batches[0][1])

    def ctc_like_loss(module, b):
        with torch.backends.cudnn.flags(enabled=False):
            return cross_entropy_loss(module, b)

    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    result = hessian_eigenvalues(model32, ctc_like_loss, batch, k=1, tol=1e-4)
    assert bool(result.converged.all())
    with ieee_float32({"cpu", "cuda"}):
        assert torch.backends.cudnn.allow_tf32 is False
        with torch.backends.cudnn.flags(enabled=False):
            pass
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == flags


def test_float32_attention_model_runs_under_default_kernels():
    torch.manual_seed(0)
    model = TinyAttention()
    x, y = torch.randn(4, 6, 8), torch.randint(0, 3, (4,))
    result = hessian_eigenvalues(model, cross_entropy_loss, (x, y), k=1, tol=1e-3)
    assert result.converged.all() and torch.isfinite(result.eigenvalues).all()


# -- errors ---------------------------------------------------------------------------------


def test_non_scalar_loss_is_rejected():
    model = tanh_mlp().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match="scalar"):
        hessian_eigenvalues(
            model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batch, k=1
        )


def test_detached_loss_is_rejected():
    model = tanh_mlp().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match="requires_grad=False"):
        hessian_eigenvalues(model, lambda m, b: cross_entropy_loss(m, b).detach(), batch, k=1)


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse"])
def test_non_finite_loss_raises(hvp):
    model = tanh_mlp().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(NonFiniteLossError, match="nan"):
        hessian_eigenvalues(
            model, lambda m, b: cross_entropy_loss(m, b) * float("nan"), batch, k=1, hvp=hvp
        )


def test_parameter_filter_matching_nothing_lists_names():
    model = tanh_mlp().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match=r"selects no trainable parameter.*0\.weight"):
        hessian_eigenvalues(model, cross_entropy_loss, batch, params="^decoder")
    with pytest.raises(ValueError, match=r"close matches: \['0.weight'"):
        hessian_eigenvalues(model, cross_entropy_loss, batch, params=["0.weigth"])


def test_model_without_trainable_parameters_is_rejected():
    model = tanh_mlp().double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(
            model, cross_entropy_loss, (torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
        )


def test_k_larger_than_parameter_count_is_rejected():
    model = nn.Linear(2, 1).double()
    batch = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="larger than the operator's dimension 3"):
        hessian_eigenvalues(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), batch, k=4)


def test_bad_hvp_path_is_rejected():
    with pytest.raises(ValueError, match="hvp must be one of"):
        HessianOperator(nn.Linear(2, 1), cross_entropy_loss, torch.zeros(1, 2), hvp="magic")


def test_missing_second_derivative_is_explained():
    error = RuntimeError("derivative for aten::_cudnn_rnn_backward is not implemented")
    explained = explain_second_order_failure(error)
    assert "cudnn" in str(explained).lower() and "torch.backends.cudnn.flags(enabled=False)" in str(
        explained
    )
    assert explain_second_order_failure(RuntimeError("something else")) is None


def _sum_ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.parametrize("params", [None, ["0"]], ids=["all", "subset"])
def test_summed_losses_over_unequal_batches_match_the_dense_hessian_of_the_sum(params):
    model, batches = make_case("mlp")  # batches of 7, 4 and 9 samples
    dense = dense_hessian_func(model, _sum_ce, batches, reduction="sum")
    if params is not None:
        first = sum(p.numel() for p in model[0].parameters())
        dense = dense[:first, :first]
    exact = torch.linalg.eigvalsh(dense)
    result = hessian_eigenvalues(
        model, _sum_ce, batches, k=3, tol=1e-10, reduction="sum", params=params
    )
    torch.testing.assert_close(result.eigenvalues, exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    trace = hessian_trace(model, _sum_ce, batches, num_hvps=10_000, reduction="sum", params=params)
    assert trace.estimate == pytest.approx(float(dense.trace()), rel=1e-10)
    density = hessian_density(
        model, _sum_ce, batches, num_probes=2, steps=dense.shape[0], reduction="sum", params=params
    )
    assert float(density.nodes.max()) == pytest.approx(float(exact[-1]), rel=1e-8)
    # The mean-weighted reading of the same sums is a different Hessian.
    mean_weighted = hessian_eigenvalues(model, _sum_ce, batches, k=1, tol=1e-10, params=params)
    assert abs(float(mean_weighted.eigenvalues[0]) / float(exact[-1]) - 1) > 0.3


@pytest.mark.parametrize("hvp", ["auto", "gradient_difference"])
def test_a_loss_linear_in_the_parameters_has_a_zero_hessian_and_no_warning(hvp):
    """λ = 0 is right: no 'custom autograd.Function' hint for the gradients without a graph,
    no 'not smooth' hint from a step calibrated on zero curvature."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = hessian_eigenvalues(model, lambda m, b: m(b).mean(), x, k=2, hvp=hvp)
    assert result.eigenvalues.tolist() == [0.0, 0.0] and bool(result.converged.all())


class _RenormalisedEmbedding(nn.Module):
    """Token sums through ``nn.Embedding(max_norm=...)``: the forward pass rescales the
    looked-up rows in place before reading them."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 3, max_norm=0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embedding(tokens).sum(1)))


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse", "gradient_difference"])
def test_embedding_rows_renormalised_by_the_forward_pass_are_put_back(hvp):
    """The measurement's forward passes rescale the probe's rows, and the weight is put back
    afterwards; the eigenvalues are those of the Hessian at the rescaled rows (what the
    training step differentiates: the rescaling happens outside autograd)."""
    torch.manual_seed(0)
    model = _RenormalisedEmbedding().double()
    tokens = torch.tensor([[0, 1, 2], [2, 3, 4], [1, 4, 0], [3, 3, 2]])
    batch = (tokens, torch.tensor([0, 1, 1, 0]))
    before = model_state(model)
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, tol=1e-10, hvp=hvp)
    assert_same_state(before, model_state(model))

    rescaled = copy.deepcopy(model)
    with torch.no_grad():
        rescaled(tokens)  # rescales rows 0..4, in place
    assert not torch.equal(rescaled.embedding.weight, model.embedding.weight)
    rescaled.embedding.max_norm = None
    exact = torch.linalg.eigvalsh(dense_hessian_func(rescaled, cross_entropy_loss, [batch]))
    tolerance = 1e-5 if hvp == "gradient_difference" else 1e-8
    assert torch.allclose(result.eigenvalues, exact.flip(0)[:2], rtol=tolerance)


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse", "gradient_difference"])
def test_padding_rows_are_held_fixed_on_every_product_path(hvp):
    """Forward-mode autograd moves the output along a padding row that the backward pass
    gives no gradient: without holding that row fixed, forward-over-reverse products and
    gradient differences disagree with double backward's (Gemma 2: by 100 %)."""
    model, batch, plain = padded_tokens_case()
    exact = dense_hessian_func(plain, cross_entropy_loss, [batch])
    exact[:3], exact[:, :3] = 0.0, 0.0  # the embedding's padding row comes first
    with HessianOperator(model, cross_entropy_loss, batch, hvp=hvp) as operator:
        block = torch.randn(3, operator.size, generator=torch.Generator().manual_seed(1))
        products = operator.matmat(block.double())
    tolerance = 1e-4 if hvp == "gradient_difference" else 1e-10
    torch.testing.assert_close(products, block.double() @ exact, rtol=tolerance, atol=tolerance)
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, tol=1e-10, hvp=hvp)
    top = torch.linalg.eigvalsh(exact).flip(0)[:2]
    assert torch.allclose(result.eigenvalues, top, rtol=100 * tolerance)


class _MixedPrecision(nn.Module):
    """Two layers in their own dtypes, each fed its own dtype (a bfloat16 model with a
    float32 head, Hugging Face's ``_keep_in_fp32_modules``)."""

    def __init__(self, first: torch.dtype, second: torch.dtype) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8).to(first)
        self.second = nn.Linear(8, 3).to(second)

    def forward(self, x):
        hidden = torch.tanh(self.first(x.to(self.first.weight.dtype)))
        return self.second(hidden.to(self.second.weight.dtype))


@pytest.mark.parametrize(
    ("first", "second", "vectors", "relative_error"),
    [
        (torch.bfloat16, torch.float32, torch.float32, 2e-2),  # a few units of 2^-8
        (torch.float32, torch.float64, torch.float64, 1e-5),
    ],
)
@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse"])
def test_parameters_of_several_dtypes_each_compute_in_their_own(
    first, second, vectors, relative_error, hvp
):
    torch.manual_seed(0)
    model = _MixedPrecision(first, second)
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    # The reference: the float64 Hessian at the weights as they are (rounded to their dtype).
    exact = dense_hessian_func(copy.deepcopy(model).double(), cross_entropy_loss, [batch])
    with HessianOperator(model, cross_entropy_loss, batch, hvp=hvp) as operator:
        assert (operator.dtype, operator.product_dtype) == (vectors, first)
        block = torch.randn(3, operator.size, generator=torch.Generator().manual_seed(3))
        products = operator.matmat(block)
    assert products.dtype == vectors
    expected = block.double() @ exact
    assert (products.double() - expected).norm() / expected.norm() < relative_error
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=1, tol=1e-2, hvp=hvp)
    top = torch.linalg.eigvalsh(exact)[-1]
    assert abs(float(result.eigenvalues[0]) - float(top)) < 2 * relative_error * float(top)


def _doubling_loss(model, batch):
    """Scales its inputs in place before the loss, as a step that normalises ``x /= 255``."""
    x, y = batch
    x.mul_(2.0)
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse", "gradient_difference"])
def test_a_loss_that_edits_its_batch_in_place_sees_the_batch_as_given_at_every_call(hvp):
    """Every call of the loss gets a fresh copy of the batch: the in-place edit neither
    compounds over the products (x, 2x, 4x, ...) nor reaches the caller's batch."""
    model, batches = make_case("mlp")
    batch = batches[0]
    given = batch[0].clone()
    written_out = lambda m, b: F.cross_entropy(m(2.0 * b[0]), b[1])  # noqa: E731
    exact = dense_hessian_func(model, written_out, [batch])
    with HessianOperator(model, _doubling_loss, batch, hvp=hvp) as operator:
        block = torch.randn(3, operator.size, generator=torch.Generator().manual_seed(4))
        products = operator.matmat(block.double())
        products = operator.matmat(block.double())  # again: nothing compounded
    tolerance = 1e-5 if hvp == "gradient_difference" else 1e-10
    torch.testing.assert_close(products, block.double() @ exact, rtol=tolerance, atol=tolerance)
    assert torch.equal(batch[0], given)


def test_a_gradient_hook_that_freezes_entries_is_run_both_ways_or_named():
    """Partial freezing by a gradient hook: double backward runs the hook on both passes
    (``P H P``, the matrix of the entries that train); forward-mode products cannot run it
    and name it; gradient differences see ``P H`` and warn."""
    model, batches = make_case("mlp")  # tanh_mlp: "0.weight" comes first
    exact = dense_hessian_func(model, cross_entropy_loss, batches)
    trains = torch.zeros_like(model[0].weight)
    trains[:2] = 1.0  # only the first two rows train
    keep = torch.ones(exact.shape[0], dtype=torch.float64)
    keep[: trains.numel()] = trains.reshape(-1)
    projected = keep[:, None] * exact * keep[None, :]
    handle = model[0].weight.register_hook(lambda grad: grad * trains)
    try:
        with HessianOperator(model, cross_entropy_loss, batches, hvp="reuse_graph") as operator:
            block = torch.randn(2, operator.size, generator=torch.Generator().manual_seed(5))
            products = operator.matmat(block.double())
        torch.testing.assert_close(products, block.double() @ projected, rtol=1e-10, atol=1e-12)
        with pytest.raises(DisagreeingProducts, match=r"gradient hooks on \['0\.weight'\]"):
            hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, hvp="forward_over_reverse")
        with pytest.warns(RuntimeWarning, match=r"gradient hooks on \['0\.weight'\]"):
            hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, hvp="gradient_difference")
    finally:
        handle.remove()
