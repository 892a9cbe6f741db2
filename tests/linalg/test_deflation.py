"""The deflated trace and density against exact float64 spectra and the undeflated estimators."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_callbacks.linalg import (
    ZERO_TOLERANCE,
    DenseOperator,
    ScaledOperator,
    SpectralDensity,
    count_outliers,
    deflated_hutchinson,
    deflated_spectrum,
    eigenpairs,
    lanczos,
    slq,
)
from spectral_callbacks.linalg.deflation import ComplementOperator

from ..oracles import matrix_with_spectrum


def outliers_over_a_bulk(n: int = 300, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hessian-like matrix (eight outliers far above a bulk with negative mass) and its
    spectrum, ascending."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([80.0, 61.0, 47.0, 35.0, 26.0, 20.0, 15.0, 12.0])
    bulk = torch.cat([2.0 * torch.rand(n - 58, generator=g) - 0.4, torch.zeros(50)])
    spectrum = torch.cat([outliers, bulk]).double()
    return matrix_with_spectrum(spectrum, seed=seed + 1), torch.sort(spectrum).values


def density_of(operator, top, probes: int, steps: int, seed: int) -> SpectralDensity:
    """The deflated density alone (no trace)."""
    return deflated_spectrum(
        operator, top.eigenvectors, top.eigenvalues, None, probes, steps, seed
    ).density


@pytest.fixture(scope="module")
def solved():
    matrix, spectrum = outliers_over_a_bulk()
    operator = DenseOperator(matrix)
    top = eigenpairs(operator, k=10, tol=1e-8, return_eigenvectors=True, seed=0)
    return operator, spectrum, top


def test_trace_is_deflated_hutchinson_with_the_same_probes_at_fewer_products(solved):
    operator, spectrum, top = solved
    alone = deflated_hutchinson(operator, top.eigenvectors, top.eigenvalues, num_hvps=33, seed=5)
    before = operator.num_matvecs
    both = deflated_spectrum(
        operator, top.eigenvectors, top.eigenvalues, 33, 4, density_steps=20, seed=5
    )
    assert both.trace.estimate == pytest.approx(alone.estimate, rel=1e-12)
    assert both.trace.stderr == pytest.approx(alone.stderr, rel=1e-9)
    assert both.trace.num_hvps == 33
    assert both.num_hvps == operator.num_matvecs - before == 4 * 20 + (33 - 4)
    assert abs(both.trace.estimate - float(spectrum.sum())) <= 4 * both.trace.stderr


def test_trace_with_more_density_probes_than_trace_probes(solved):
    operator, _, top = solved
    alone = deflated_hutchinson(operator, top.eigenvectors, top.eigenvalues, num_hvps=3, seed=2)
    both = deflated_spectrum(operator, top.eigenvectors, top.eigenvalues, 3, 6, 10, seed=2)
    assert both.trace.estimate == pytest.approx(alone.estimate, rel=1e-12)
    assert both.num_hvps == 6 * 10


def test_density_holds_the_ritz_values_and_the_complement(solved):
    operator, spectrum, top = solved
    n, k = operator.size, 10
    density = density_of(operator, top, 3, 40, 1)
    assert density.num_hvps == 3 * 40
    assert torch.allclose(density.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    # Every eigenvalue of the top 10 is a node of each probe's rule, with weight 1/n.
    ritz = density.nodes[:, -k:]
    assert torch.allclose(ritz, top.eigenvalues.expand(3, -1), atol=1e-10)
    assert torch.allclose(density.weights[:, -k:], torch.full((3, k), 1.0 / n, dtype=torch.float64))
    # The complement's nodes lie within the complement's spectrum (Cauchy interlacing).
    rest = density.nodes[:, :-k][density.weights[:, :-k] > 1e-14]
    assert float(rest.max()) <= float(spectrum[-k - 1]) + 1e-8
    assert float(rest.min()) >= float(spectrum[0]) - 1e-8
    assert float(spectrum[0]) - 1e-10 <= density.lambda_min <= float(spectrum[0]) + 1e-3


def test_first_moment_is_the_trace_over_n_on_average():
    # Degree 1 is exact per probe, so the mean first moment is the deflated Hutchinson
    # estimate over n, an unbiased estimate of tr(A)/n.
    matrix, spectrum = outliers_over_a_bulk(n=200)
    operator = DenseOperator(matrix)
    top = eigenpairs(operator, k=8, tol=1e-10, return_eigenvectors=True)
    density = density_of(operator, top, 200, 12, 0)
    assert float(density.moment(1).mean()) * 200 == pytest.approx(float(spectrum.sum()), rel=2e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambda_min_converges_faster_and_the_outliers_are_exact(solved, seed):
    # Without the outliers the recurrence reaches the low end sooner (its convergence rate
    # is set by the gap over the remaining range); the outliers enter as exact nodes of
    # weight 1/n instead of scattered probe weights.
    operator, spectrum, top = solved
    n = operator.size
    deflated = density_of(operator, top, 4, 24, seed)
    full = slq(operator, num_probes=4, steps=24, seed=seed)
    lowest = float(spectrum[0])
    assert 0 <= deflated.lambda_min - lowest <= full.lambda_min - lowest
    truth = count_outliers(top.eigenvalues, SpectralDensity.of_spectrum(spectrum), n)
    report = count_outliers(top.eigenvalues, deflated, n)
    assert report.count == truth.count == 8
    assert report.bulk_edge == pytest.approx(truth.bulk_edge, abs=0.1)


def test_negative_and_near_zero_mass_against_the_exact_fractions(solved):
    operator, spectrum, top = solved
    density = density_of(operator, top, 8, 40, 0)
    radius = float(spectrum.abs().max())
    negative = float((spectrum < -ZERO_TOLERANCE * radius).double().mean())
    near_zero = float((spectrum.abs() <= ZERO_TOLERANCE * radius).double().mean())
    assert density.negative_mass == pytest.approx(negative, abs=0.04)
    assert density.near_zero_mass == pytest.approx(near_zero, abs=0.06)


def test_eigenvectors_of_the_whole_space_leave_only_the_ritz_values():
    spectrum = torch.tensor([4.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    matrix = matrix_with_spectrum(spectrum, seed=0)
    values, vectors = torch.linalg.eigh(matrix)
    result = deflated_spectrum(DenseOperator(matrix), vectors.T, values, 2, 2, 5)
    assert result.density.num_hvps == 0
    assert torch.allclose(torch.sort(result.density.nodes[0]).values, values)
    assert result.trace.estimate == pytest.approx(6.0, rel=1e-12)
    assert result.trace.stderr == 0


def test_exact_trace_when_the_probes_cover_the_dimension(solved):
    operator, spectrum, top = solved
    result = deflated_spectrum(operator, top.eigenvectors, top.eigenvalues, 10**4, 2, 8)
    assert result.trace.method == "exact"
    assert result.trace.estimate == pytest.approx(float(spectrum.sum()), rel=1e-10)
    assert result.num_hvps == operator.size + 2 * 8


def test_non_finite_products_give_nan_everywhere(solved):
    operator, _, top = solved
    poisoned = DenseOperator(operator.matrix.clone())
    poisoned.matrix[3, 5] = poisoned.matrix[5, 3] = float("nan")
    result = deflated_spectrum(poisoned, top.eigenvectors, top.eigenvalues, 8, 2, 6)
    assert torch.isnan(torch.tensor(result.trace.estimate))
    assert torch.isnan(torch.tensor(result.density.lambda_min))
    assert torch.isnan(torch.tensor(result.density.negative_mass))


def test_bad_arguments_name_themselves(solved):
    operator, _, top = solved
    with pytest.raises(ValueError, match="density_steps"):
        deflated_spectrum(operator, top.eigenvectors, top.eigenvalues, density_steps=0)
    with pytest.raises(ValueError, match="trace_hvps"):
        deflated_spectrum(operator, top.eigenvectors, top.eigenvalues, trace_hvps=1)
    with pytest.raises(ValueError, match="eigenvalues has 2 entries"):
        deflated_spectrum(operator, top.eigenvectors, top.eigenvalues[:2])


class DirectionalErrors(DenseOperator):
    """A dense operator whose products carry an error ``δ(v) = E v`` that it knows."""

    errors_vary_by_direction = True

    def __init__(self, matrix: torch.Tensor, error: torch.Tensor) -> None:
        super().__init__(matrix)
        self.error = error

    def product_errors_along(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.error


def test_product_errors_carry_through_a_projection_and_a_scaling():
    """``P A P`` and ``D^½ A D^½`` report ``M δ(M v)``, the error of their own products."""
    g = torch.Generator().manual_seed(0)
    matrix, error = (torch.randn(6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    inner = DirectionalErrors(matrix + matrix.T, error)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q.T
    projection = torch.eye(6, dtype=torch.float64) - basis.T @ basis
    diagonal = torch.rand(6, generator=g, dtype=torch.float64)
    vectors = torch.randn(3, 6, generator=g, dtype=torch.float64)
    for derived, m in (
        (ComplementOperator(inner, basis), projection),
        (ScaledOperator(inner, diagonal), torch.diag(diagonal.sqrt())),
    ):
        assert derived.errors_vary_by_direction
        torch.testing.assert_close(derived.product_errors_along(vectors), vectors @ m @ error @ m)
    assert not ComplementOperator(DenseOperator(matrix + matrix.T), basis).errors_vary_by_direction


class UnresolvedErrors(DirectionalErrors):
    """Products whose error no direction resolves: every row infinite."""

    def product_errors_along(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.full_like(vectors, math.inf)


def test_an_unresolved_direction_stays_unbounded_through_a_projection():
    """An infinite error row turns NaN through ``P`` (``inf - inf``); the solver's bound is
    still infinite, not NaN, and the pair is not converged."""
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    inner = UnresolvedErrors(matrix + matrix.T, torch.zeros(6, 6, dtype=torch.float64))
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q.T
    complement = ComplementOperator(inner, basis)
    vector = torch.randn(1, 6, generator=g, dtype=torch.float64)
    assert torch.isnan(complement.product_errors_along(vector)).any()
    result = lanczos(complement, k=1, tol=1e-8)
    assert math.isinf(float(result.errors[0]))
    assert not bool(result.converged[0])
