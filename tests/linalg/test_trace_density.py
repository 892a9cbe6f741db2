"""Trace estimators and stochastic Lanczos quadrature against exact float64 quantities."""

from __future__ import annotations

import pytest
import torch

from spectral_callbacks.linalg import (
    FULL_REORTHOGONALISATION_BYTES,
    ZERO_TOLERANCE,
    DenseOperator,
    deflated_hutchinson,
    eigenpairs,
    estimate_trace,
    exact_trace,
    hutchinson,
    hutchpp,
    slq,
)

from ..oracles import InexactDense, matrix_with_spectrum


@pytest.fixture
def hessian_like():
    # Outliers over a bulk, as Hessians of trained networks look (Sagun et al.).
    g = torch.Generator().manual_seed(11)
    spectrum = torch.cat(
        [torch.tensor([30.0, 18.0, 9.0, -2.0]), 0.3 * torch.randn(196, generator=g)]
    )
    return matrix_with_spectrum(spectrum, seed=12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator", [hutchpp, hutchinson])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_within_four_standard_errors(hessian_like, estimator, seed, dtype):
    exact = float(torch.trace(hessian_like))
    est = estimator(DenseOperator(hessian_like.to(dtype)), num_hvps=60, seed=seed)
    assert est.num_hvps == 60
    assert 0 < est.stderr < float("inf")
    assert abs(est.estimate - exact) <= 4 * est.stderr, (est, exact)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hutchpp_on_a_low_rank_operator_is_exact_to_its_precision(dtype):
    # Rank 5 under a sketch of 20: the QR of a rank-deficient sketch must still give an
    # orthonormal basis, whose top part then holds the whole trace.
    spectrum = torch.cat([torch.tensor([30.0, 18.0, 9.0, -2.0, 0.5]), torch.zeros(195)])
    a = matrix_with_spectrum(spectrum, seed=5)
    est = hutchpp(DenseOperator(a.to(dtype)), num_hvps=60, seed=0)
    eps = torch.finfo(dtype).eps
    assert est.estimate == pytest.approx(55.5, rel=0, abs=1e3 * eps * 30)
    assert est.stderr <= 1e3 * eps * 30


def test_hutchpp_beats_hutchinson_on_outlier_spectra(hessian_like):
    # Hutch++ removes the outliers exactly, so its error bar is much smaller.
    a = DenseOperator(hessian_like)
    assert hutchpp(a, num_hvps=60).stderr < 0.5 * hutchinson(a, num_hvps=60).stderr


def top_ritz_pairs(a: torch.Tensor, k: int):
    result = eigenpairs(DenseOperator(a), k=k, tol=1e-6, return_eigenvectors=True)
    return result.eigenvectors, result.eigenvalues


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deflated_hutchinson_within_four_standard_errors(hessian_like, seed, dtype):
    # Deflated by the Ritz pairs of our own solver, as HessianSpectrumMonitor does.
    vectors, values = top_ritz_pairs(hessian_like.to(dtype), k=4)
    est = deflated_hutchinson(
        DenseOperator(hessian_like.to(dtype)), vectors, values, num_hvps=20, seed=seed
    )
    exact = float(torch.trace(hessian_like))
    assert est.num_hvps == 20 and est.method == "deflated hutchinson"
    assert 0 < est.stderr < float("inf")
    assert abs(est.estimate - exact) <= 4 * est.stderr, (est, exact)


def test_deflated_hutchinson_beats_hutchpp_at_equal_products(hessian_like):
    # The outliers are found by the top-k solve anyway; Hutch++ spends 2/3 of its products
    # finding them again, the deflated estimator spends all of them on the rest.
    a = DenseOperator(hessian_like)
    vectors, values = top_ritz_pairs(hessian_like, k=4)
    deflated = deflated_hutchinson(a, vectors, values, num_hvps=60)
    assert deflated.stderr < 0.9 * hutchpp(a, num_hvps=60).stderr


def test_deflated_hutchinson_is_exact_when_the_eigenvectors_span_the_range():
    spectrum = torch.cat([torch.tensor([30.0, 18.0, 9.0, -2.0]), torch.zeros(96)])
    a = matrix_with_spectrum(spectrum, seed=5)
    values, vectors = torch.linalg.eigh(a)
    est = deflated_hutchinson(DenseOperator(a), vectors.T[[0, -3, -2, -1]], values[[0, -3, -2, -1]])
    assert est.estimate == pytest.approx(55.0, abs=1e-10) and est.stderr <= 1e-10


def test_deflated_hutchinson_orthonormalises_rows_that_are_not(hessian_like):
    # Skewed rows: orthonormalised, their Rayleigh quotients computed (2 more products).
    vectors, values = top_ritz_pairs(hessian_like, k=2)
    skewed = torch.stack([vectors[0], vectors[0] + vectors[1]])
    est = deflated_hutchinson(DenseOperator(hessian_like), skewed, values, num_hvps=20)
    exact = deflated_hutchinson(DenseOperator(hessian_like), vectors, values, num_hvps=20)
    assert est.num_hvps == 22
    assert est.estimate == pytest.approx(exact.estimate, rel=1e-9)
    # Rows orthonormal to 1e-3 (a float32 Lanczos basis of a large model): orthonormalised,
    # the Ritz values trusted, no extra products.
    g = torch.Generator().manual_seed(3)
    rough = vectors + 1e-3 * torch.randn(vectors.shape, generator=g, dtype=vectors.dtype)
    near = deflated_hutchinson(DenseOperator(hessian_like), rough, values, num_hvps=20)
    assert near.num_hvps == 20
    assert near.estimate == pytest.approx(exact.estimate, rel=1e-2)
    with pytest.raises(ValueError, match="eigenvalues has 1 entries for 2 eigenvectors"):
        deflated_hutchinson(DenseOperator(hessian_like), vectors, values[:1])


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_exact_when_budget_covers_dimension(method):
    a = matrix_with_spectrum(torch.linspace(-3, 7, 40), seed=3)
    op = DenseOperator(a)
    est = estimate_trace(op, num_hvps=40, method=method)
    assert est.stderr == 0.0 and est.method == "exact"
    assert est.num_hvps == 40 == op.num_matvecs
    assert est.estimate == pytest.approx(float(torch.trace(a)), abs=1e-10)
    assert exact_trace(DenseOperator(a), block_size=7).estimate == pytest.approx(
        float(torch.trace(a)), abs=1e-10
    )


def test_trace_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_trace(DenseOperator(torch.eye(3, dtype=torch.float64)), method="girard")


@pytest.mark.parametrize("steps", [5, 12])
def test_slq_reproduces_probe_moments(hessian_like, steps):
    """Gauss quadrature with m nodes is exact for vᵀHʲv, j < 2m."""
    g = torch.Generator().manual_seed(5)
    probes = (2 * torch.randint(0, 2, (4, 200), generator=g) - 1).double()
    density = slq(DenseOperator(hessian_like), steps=steps, probes=probes)
    assert density.nodes.shape == (4, steps)
    assert torch.allclose(density.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))
    scale = torch.linalg.matrix_norm(hessian_like, ord=2)
    power = probes.clone()
    for order in range(2 * steps):
        exact = (probes * power).sum(dim=1) / (probes * probes).sum(dim=1)
        quadrature = density.moment(order)
        assert torch.allclose(quadrature, exact, rtol=1e-8, atol=1e-10 * scale**order), order
        power = power @ hessian_like


def test_density_integrates_to_one_and_counts_negative_mass():
    # Half of the spectrum negative: the quadrature's negative mass must say so.
    spectrum = torch.cat([-torch.linspace(0.5, 2, 60), torch.linspace(0.5, 4, 60)])
    a = matrix_with_spectrum(spectrum, seed=8)
    density = slq(DenseOperator(a), num_probes=16, steps=40, seed=1)
    assert density.num_hvps == 16 * 40
    assert density.negative_mass == pytest.approx(0.5, abs=0.1)
    grid = torch.linspace(-6, 8, 4001)
    values = density.evaluate(grid, sigma=0.1)
    assert torch.all(values >= 0)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-6)
    low, high = density.support
    # Extreme Ritz values converge first: they bracket the spectrum from inside.
    assert -2.0 <= low < -2.0 + 1e-4 and 4.0 - 1e-4 < high <= 4.0 + 1e-12


def _ritz_pairs_by_rayleigh_ritz(a: torch.Tensor, probe: torch.Tensor, steps: int):
    """Ritz values and residual norms ``‖A y - θ y‖`` of the Krylov space of ``probe``,
    built independently: QR of the power basis, then Rayleigh-Ritz in float64."""
    powers = [probe / probe.norm()]
    for _ in range(steps - 1):
        powers.append(a @ powers[-1])
        powers[-1] = powers[-1] / powers[-1].norm()
    basis, _ = torch.linalg.qr(torch.stack(powers, dim=1))
    values, small = torch.linalg.eigh(basis.T @ a @ basis)
    vectors = basis @ small
    residuals = (a @ vectors - vectors * values).norm(dim=0)
    return values, residuals


def test_lambda_min_is_the_smallest_ritz_value_with_its_residual(hessian_like):
    """Few steps, so the smallest Ritz value has not converged and its residual is large:
    both must equal an independent Rayleigh-Ritz on the same Krylov space, interlacing puts
    λ_min below it, and an eigenvalue lies within the residual."""
    spectrum = torch.linalg.eigvalsh(hessian_like)
    g = torch.Generator().manual_seed(5)
    probes = (2 * torch.randint(0, 2, (3, 200), generator=g) - 1).double()
    density = slq(DenseOperator(hessian_like), steps=6, probes=probes)
    assert density.residuals.shape == density.nodes.shape == (3, 6)
    for p in range(3):
        values, residuals = _ritz_pairs_by_rayleigh_ritz(hessian_like, probes[p], steps=6)
        assert torch.allclose(density.nodes[p], values, rtol=1e-9, atol=1e-9)
        assert torch.allclose(density.residuals[p], residuals, rtol=1e-6, atol=1e-9)
    low, residual = density.lambda_min, density.lambda_min_residual
    assert low == pytest.approx(float(density.nodes.min()))
    assert residual == pytest.approx(float(density.residuals.reshape(-1)[density.nodes.argmin()]))
    assert residual > 1e-3  # unconverged: the bound below has something to check
    assert float(spectrum[0]) <= low
    assert float((spectrum - low).abs().min()) <= residual

    converged = slq(DenseOperator(hessian_like), num_probes=4, steps=64, seed=0)
    assert converged.lambda_min == pytest.approx(-2.0, abs=1e-8)  # the outlier below the bulk
    assert converged.lambda_min_residual < 1e-6


@pytest.mark.parametrize("inexact", ["float32", "stated 1e-3"])
def test_lambda_min_residual_is_at_least_what_the_products_resolve(hessian_like, inexact):
    """A converged node's Ritz residual falls to the rounding of the float64 recurrence (0
    here), far below what inexact products resolve: the residual stated for λ_min is at
    least the products' error floor (10 unit roundoffs of float32, or the stated relative
    error, times the spectral radius) and covers the actual error against the float64
    spectrum."""
    spectrum = torch.linalg.eigvalsh(hessian_like)
    if inexact == "float32":
        operator, relative = DenseOperator(hessian_like.float()), 10 * 2.0**-24
    else:
        operator, relative = InexactDense(hessian_like, 1e-3, seed=3), 1e-3
    density = slq(operator, num_probes=4, steps=64, seed=0)
    assert density.lambda_min_residual >= relative * density.spectral_radius
    assert abs(density.lambda_min - float(spectrum[0])) <= density.lambda_min_residual
    assert abs(density.lambda_min - float(spectrum[0])) > 1e-12  # the products moved it


def test_two_vector_slq_keeps_the_moments_and_agrees_with_full_reorthogonalisation(
    hessian_like,
):
    """The three-term recurrence (two vectors per probe) for operators whose bases do not
    fit: exact moments while orthogonality holds (12 steps), and at 64 steps, after the
    outliers 30, 18, 9 and -2 have converged and orthogonality is lost (ghost copies), the
    same fractions and extreme values as full reorthogonalisation."""
    operator = DenseOperator(hessian_like)
    g = torch.Generator().manual_seed(6)
    probes = (2 * torch.randint(0, 2, (4, 200), generator=g) - 1).double()
    density = slq(operator, steps=12, probes=probes, reorthogonalize=False)
    assert not density.reorthogonalized
    power = probes.clone()
    for order in range(24):
        exact = (probes * power).sum(dim=1) / (probes * probes).sum(dim=1)
        assert torch.allclose(density.moment(order), exact, rtol=1e-8, atol=1e-10 * 30**order)
        power = power @ hessian_like

    full = slq(operator, num_probes=8, steps=64, seed=3, reorthogonalize=True)
    local = slq(operator, num_probes=8, steps=64, seed=3, reorthogonalize=False)
    assert full.reorthogonalized and not local.reorthogonalized
    ghosts = int((local.nodes[0] - 30.0).abs().lt(1e-6).sum())
    assert ghosts >= 2  # orthogonality was lost: 30 appears more than once
    assert local.negative_mass == pytest.approx(full.negative_mass, abs=0.03)
    assert local.near_zero_mass == pytest.approx(full.near_zero_mass, abs=0.03)
    assert local.lambda_min == pytest.approx(-2.0, abs=1e-8)
    assert local.lambda_min_residual < 1e-6
    assert local.support[1] == pytest.approx(30.0, abs=1e-8)


def test_slq_reorthogonalises_fully_while_the_bases_fit(monkeypatch, hessian_like):
    from spectral_callbacks.linalg import quadrature

    operator = DenseOperator(hessian_like)  # 8 probes x 65 x 200 float64: 832 KB of bases
    assert FULL_REORTHOGONALISATION_BYTES >= 2**20
    assert slq(operator, steps=64).reorthogonalized
    monkeypatch.setattr(quadrature, "FULL_REORTHOGONALISATION_BYTES", 800_000)
    assert not slq(operator, steps=64).reorthogonalized
    assert slq(operator, steps=60).reorthogonalized  # 61 basis vectors: 780,800 bytes


def test_negative_mass_leaves_out_the_unresolved_bulk_near_zero():
    # Tiny eigenvalues of both signs between resolved negative and positive parts, as in a
    # Hessian's near-zero bulk. Quadrature gives the bulk one node of arbitrary sign, so the
    # fractions are taken beyond ±1 % of the spectral radius, where they are resolved.
    g = torch.Generator().manual_seed(3)
    bulk = 1e-5 * (2 * torch.rand(160, generator=g, dtype=torch.float64) - 1)
    spectrum = torch.cat(
        [-torch.linspace(0.5, 2, 80, dtype=torch.float64), bulk, torch.linspace(0.5, 4, 160)]
    )
    density = slq(DenseOperator(matrix_with_spectrum(spectrum, seed=4)), steps=40, seed=2)
    assert density.spectral_radius == pytest.approx(4.0, rel=1e-3)
    cut = ZERO_TOLERANCE * density.spectral_radius
    exact_negative = float((spectrum < -cut).double().mean())  # 0.2
    exact_near_zero = float((spectrum.abs() <= cut).double().mean())  # 0.4
    assert density.negative_mass == pytest.approx(exact_negative, abs=0.03)
    assert density.near_zero_mass == pytest.approx(exact_near_zero, abs=0.03)
    # mass_below is the plain quadrature estimate; at a resolved threshold it is accurate.
    assert density.mass_below(-1.0) == pytest.approx(
        float((spectrum < -1.0).double().mean()), abs=0.03
    )
    assert density.mass_below(5.0) == pytest.approx(1.0)


def test_slq_exact_when_steps_exhaust_the_space():
    a = matrix_with_spectrum(torch.tensor([-1.0, 0.5, 2.0, 3.0, 3.0]), seed=9)
    density = slq(DenseOperator(a), num_probes=3, steps=50)
    assert density.nodes.shape == (3, 5)
    # The rule carries the whole spectral measure of each probe: weights on true eigenvalues.
    present = density.weights > 1e-12
    nodes = density.nodes[present]
    assert torch.all(
        torch.min((nodes.unsqueeze(1) - torch.tensor([-1.0, 0.5, 2.0, 3.0])).abs(), dim=1).values
        < 1e-9
    )
