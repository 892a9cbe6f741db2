"""Eigensolvers on explicit symmetric matrices with known spectra (float64 oracles)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spectral_callbacks.linalg.eigsh as eigsh
from spectral_callbacks.functional import (
    hessian_eigenvalues,
)
from spectral_callbacks.linalg import DenseOperator, block_lanczos, eigenpairs, lanczos, slq
from spectral_callbacks.linalg.eigsh import confirm_ritz_pairs, select_ritz

from ..models import (
    BasisSpy,
    make_case,
)
from ..oracles import (
    InexactDense,
    assert_within_stated_bounds,
    dense_hessian_func,
    matrix_with_spectrum,
)

SOLVERS = {"lanczos": lanczos, "block_lanczos": block_lanczos}


def expected(eigenvalues: torch.Tensor, k: int, which: str) -> torch.Tensor:
    values = torch.sort(eigenvalues.double()).values
    return values[select_ritz(values, k, which)]


SPECTRA = {
    # well separated, indefinite
    "indefinite": torch.cat(
        [torch.tensor([9.0, 7.0, 5.5, -11.0, -8.0]), torch.linspace(-2, 2, 115)]
    ),
    # clustered top eigenvalues (relative gaps 1e-3)
    "clustered": torch.cat([torch.tensor([5.0, 4.995, 4.99, 4.985]), torch.linspace(-1, 3, 116)]),
    # tiny gap at the top
    "tiny_gap": torch.cat([torch.tensor([3.0, 3.0 - 1e-6]), torch.linspace(0, 2.5, 118)]),
    # a Hessian-like spectrum: outliers over a bulk near zero
    "bulk_outliers": torch.cat(
        [
            torch.tensor([40.0, 25.0, 12.0]),
            0.05 * torch.randn(117, generator=torch.Generator().manual_seed(3)),
        ]
    ),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_eigenvalues_match_exact_spectrum(name, which, solver):
    spectrum = SPECTRA[name]
    a = matrix_with_spectrum(spectrum)
    k = 3
    tol = 1e-8
    result = SOLVERS[solver](
        DenseOperator(a), k=k, which=which, tol=tol, max_iter=120, return_eigenvectors=True
    )
    want = expected(spectrum, k, which)
    assert result.eigenvalues.dtype == torch.float64
    assert result.converged.all(), (result.eigenvalues, result.residuals)
    # Each value within its stated error bound (residual²/gap where a gap is certified, the
    # residual otherwise) of the exact eigenvalue, and the bound within tol (clusters, tiny
    # gaps and outliers included).
    assert_within_stated_bounds(result, want, tol, slack=1e-13)
    vectors = result.eigenvectors
    assert vectors.shape == (k, a.shape[0])
    # The vectors' residuals are those stated (the projected matrix's are the true ones).
    true_residuals = (vectors @ a - result.eigenvalues.unsqueeze(1) * vectors).norm(dim=1)
    assert torch.allclose(true_residuals, result.residuals, rtol=1e-3, atol=1e-12)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(k, dtype=torch.float64))


def test_degenerate_eigenvalue_needs_a_block():
    # λ = 4 with multiplicity 3 at the top: a single Krylov vector sees it once.
    spectrum = torch.cat([torch.tensor([4.0, 4.0, 4.0, 3.5]), torch.linspace(-1, 3, 96)])
    a = matrix_with_spectrum(spectrum, seed=1)
    result = block_lanczos(DenseOperator(a), k=4, tol=1e-10, block_size=4)
    assert result.converged.all()
    assert torch.allclose(
        result.eigenvalues, torch.tensor([4.0, 4.0, 4.0, 3.5], dtype=torch.float64), atol=1e-9
    )


def test_invariant_subspace_breakdown_restarts_exactly():
    # Two distinct eigenvalues: Krylov spaces become invariant after two steps, so both
    # solvers must restart (β = 0) and go on with exact values, not garbage.
    spectrum = torch.cat([torch.full((3,), 2.0), torch.full((57,), -1.0)])
    a = matrix_with_spectrum(spectrum, seed=2)
    single = lanczos(DenseOperator(a), k=4, tol=1e-10, max_iter=20, return_eigenvectors=True)
    # Each restart contributes one copy of each eigenvalue, and a check that lands on a
    # breakdown does not end the solve: restarts go on until one adds no wanted value, so
    # the third copy of 2 is found too (it once stopped at [2, 2, -1, -1] after 4 products).
    assert single.num_hvps < 20 and bool(single.converged.all())
    assert torch.allclose(
        single.eigenvalues, torch.tensor([2.0, 2.0, 2.0, -1.0], dtype=torch.float64), atol=1e-10
    )
    vectors = single.eigenvectors
    assert torch.allclose(vectors @ vectors.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(vectors @ a, single.eigenvalues.unsqueeze(1) * vectors, atol=1e-10)
    block = block_lanczos(DenseOperator(a), k=4, tol=1e-10, block_size=4)
    assert torch.allclose(
        block.eigenvalues, torch.tensor([2.0, 2.0, 2.0, -1.0], dtype=torch.float64), atol=1e-10
    )


def test_full_dimension_is_exact():
    spectrum = torch.linspace(-3, 5, 12)
    a = matrix_with_spectrum(spectrum, seed=4)
    result = lanczos(DenseOperator(a), k=12, which="LA", tol=1e-10)
    assert result.num_hvps == 12
    assert torch.allclose(result.eigenvalues, spectrum.double().flip(0), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=5, max_value=60),
    k=st.integers(min_value=1, max_value=4),
    which=st.sampled_from(["LA", "SA", "LM"]),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_random_symmetric_matrices(n, k, which, seed):
    g = torch.Generator().manual_seed(seed)
    spectrum = (
        torch.randn(n, generator=g, dtype=torch.float64)
        * torch.rand(1, generator=g, dtype=torch.float64)
        * 10
    )
    a = matrix_with_spectrum(spectrum, seed=seed)
    k = min(k, n)
    result = lanczos(DenseOperator(a), k=k, which=which, tol=1e-9, max_iter=n)
    # With max_iter = n the Krylov space is the whole space unless it converged first.
    want = expected(spectrum, k, which)
    scale = spectrum.abs().max()
    assert torch.allclose(result.eigenvalues, want, rtol=0, atol=1e-6 * scale), (
        result.eigenvalues,
        want,
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=5, max_value=40),
    p=st.integers(min_value=1, max_value=6),
    k=st.integers(min_value=1, max_value=4),
    which=st.sampled_from(["LA", "SA", "LM"]),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_block_lanczos_on_random_symmetric_matrices(n, p, k, which, seed):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.randn(n, generator=g, dtype=torch.float64) * 10
    a = matrix_with_spectrum(spectrum, seed=seed)
    result = block_lanczos(
        DenseOperator(a), k=min(k, n), which=which, tol=1e-9, block_size=min(p, n)
    )
    want = expected(spectrum, min(k, n), which)
    assert torch.allclose(result.eigenvalues, want, rtol=0, atol=1e-8 * spectrum.abs().max()), (
        result.eigenvalues,
        want,
    )


def test_block_lanczos_finishes_a_dimension_that_blocks_do_not_divide():
    # n = 10, p = 3: three whole blocks span 9 dimensions, and the top value is triple, so
    # the 9-dimensional Krylov space cannot hold the answer. The budget covers n products.
    spectrum = torch.tensor([5.0, 5.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    a = matrix_with_spectrum(spectrum, seed=3)
    result = block_lanczos(DenseOperator(a), k=4, tol=1e-10, block_size=3, return_eigenvectors=True)
    assert torch.allclose(result.eigenvalues, spectrum[:4].double(), atol=1e-12)
    assert result.all_converged and result.num_hvps <= 9 + 10
    vectors = result.eigenvectors
    assert torch.allclose(vectors @ a, result.eigenvalues.unsqueeze(1) * vectors, atol=1e-12)


def test_warm_start_from_previous_eigenvector_needs_fewer_products():
    spectrum = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-2, 8, 198)])
    a = matrix_with_spectrum(spectrum, seed=5)
    cold = lanczos(DenseOperator(a), k=1, tol=1e-3, return_eigenvectors=True)
    # A nearby matrix, as after a few optimiser steps.
    g = torch.Generator().manual_seed(6)
    e = torch.randn(200, 200, generator=g, dtype=torch.float64) * 1e-3
    b = a + 0.5 * (e + e.T)
    cold_b = lanczos(DenseOperator(b), k=1, tol=1e-3)
    warm_b = lanczos(DenseOperator(b), k=1, tol=1e-3, start=cold.eigenvectors)
    assert cold_b.converged.all() and warm_b.converged.all()
    assert torch.allclose(warm_b.eigenvalues, cold_b.eigenvalues, rtol=1e-3)
    # The random part of the mixed start must be filtered out too, so the saving is small
    # on this 200 x 200 matrix (9 against 11; a pure warm start took 2). On models with
    # millions of parameters it is most of a cold solve (bench/results/warm-starts-2026-11-23.md).
    assert warm_b.num_hvps < cold_b.num_hvps, (warm_b.num_hvps, cold_b.num_hvps)


def _crossing_pair(new_values: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvectors ``Q`` and two matrices sharing them: ``A`` with spectrum 10, 9, 8, 7, 6,
    then [-2, 5]; ``B`` the same with the eigenvalues at the given indices changed."""
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0]), torch.linspace(-2, 5, 295)])
    q, _ = torch.linalg.qr(
        torch.randn(300, 300, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    )
    changed = spectrum.clone()
    for index, value in new_values.items():
        changed[index] = value
    return q, (q * spectrum.double()) @ q.T, (q * changed.double()) @ q.T


@pytest.mark.parametrize("mixing", [1.0, 0.0])
def test_warm_start_finds_an_eigenvalue_that_overtook_the_previous_top(mixing):
    # The second eigenvector's value rises above the first's: the previous top eigenvector
    # has no component along it, so only the random part of the start can reveal it.
    q, _, b = _crossing_pair({1: 11.0})
    result = lanczos(DenseOperator(b), k=1, tol=1e-6, start=q[:, 0], start_mixing=mixing)
    assert result.converged.all()
    found = float(result.eigenvalues[0])
    if mixing:
        assert found == pytest.approx(11.0, rel=1e-6)
    else:  # a pure warm start stays in the old direction's invariant subspace
        assert found == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_warm_started_top_k_finds_a_new_entrant(solver):
    # The fifth eigenvalue rises into the top three; the start holds the previous top three.
    _, a, b = _crossing_pair({4: 9.5})
    previous = SOLVERS[solver](DenseOperator(a), k=3, tol=1e-8, return_eigenvectors=True)
    assert torch.allclose(previous.eigenvalues, torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64))
    result = SOLVERS[solver](DenseOperator(b), k=3, tol=1e-8, start=previous.eigenvectors)
    assert torch.allclose(
        result.eigenvalues, torch.tensor([10.0, 9.5, 9.0], dtype=torch.float64), rtol=1e-6
    )


def test_block_warm_start_for_top_k():
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.5]), torch.linspace(-2, 6, 196)])
    a = matrix_with_spectrum(spectrum, seed=7)
    cold = block_lanczos(DenseOperator(a), k=4, tol=1e-6, return_eigenvectors=True)
    warm = block_lanczos(DenseOperator(a), k=4, tol=1e-6, start=cold.eigenvectors)
    assert warm.converged.all()
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-5)
    # Each warm row carries a random part to filter out (WARM_START_MIXING): a small saving
    # on a 200 x 200 matrix, most of a cold solve on models
    # (bench/results/warm-starts-2026-11-23.md).
    assert warm.num_hvps < cold.num_hvps, (warm.num_hvps, cold.num_hvps)


class _PoisonedOperator(DenseOperator):
    def matmat(self, block):
        out = super().matmat(block)
        return out * math.nan if self.num_matvecs > 3 else out


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_non_finite_operator_gives_nan_not_garbage(solver):
    a = matrix_with_spectrum(torch.linspace(-1, 1, 30))
    result = SOLVERS[solver](_PoisonedOperator(a), k=2, tol=1e-8)
    assert torch.isnan(result.eigenvalues).all()
    assert not result.converged.any()


def test_non_finite_operator_gives_a_nan_density():
    density = slq(_PoisonedOperator(matrix_with_spectrum(torch.linspace(-1, 1, 30))), steps=8)
    for value in (density.negative_mass, density.near_zero_mass, *density.support):
        assert math.isnan(value)


def test_num_hvps_counts_every_product():
    a = matrix_with_spectrum(torch.linspace(-1, 4, 50))
    op = DenseOperator(a)
    result = lanczos(op, k=2, tol=1e-6)
    assert result.num_hvps == op.num_matvecs
    op = DenseOperator(a)
    result = block_lanczos(op, k=2, tol=1e-6, block_size=5)
    assert result.num_hvps == op.num_matvecs
    assert result.num_hvps % 5 == 0
    # Blocks of 3 leave 2 of the 50 dimensions out; the dense completion's 50 products count.
    op = DenseOperator(a)
    result = block_lanczos(op, k=2, tol=1e-6, block_size=3)
    assert result.num_hvps == op.num_matvecs
    assert result.all_converged


def test_unconverged_is_reported():
    a = matrix_with_spectrum(
        torch.cat([torch.tensor([1.0, 1.0 - 1e-9]), torch.linspace(-1, 0.99, 298)])
    )
    result = lanczos(DenseOperator(a), k=2, tol=1e-12, max_iter=10)
    assert result.num_hvps == 10
    assert not result.converged.all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 31}, "larger than the operator's dimension"),
        ({"which": "XX"}, "which must be one of"),
        ({"tol": -1.0}, "tol must be a number > 0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    a = matrix_with_spectrum(torch.linspace(-1, 1, 30))
    with pytest.raises(ValueError, match=message):
        lanczos(DenseOperator(a), **kwargs)


def test_dense_operator_rejects_asymmetric():
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_check_schedule_lands_on_the_converging_step():
    """Geometric residuals w_m = 100 · 2^-m converge (w ≤ 1) at step 7: the schedule checks
    at 1 and 2, extrapolates the rate, and checks next at 6 and 7; never past step 7."""
    from spectral_callbacks.linalg.eigsh import _CheckSchedule

    schedule, checks = _CheckSchedule(first=1, every=8, last=100), []
    for step in range(1, 100):
        if schedule.due(step):
            worst = 100 * 0.5**step
            checks.append(step)
            if worst <= 1:
                break
            schedule.checked(step, worst)
    assert checks == [1, 2, 6, 7]


def test_check_schedule_without_progress_spaces_checks_up_to_every():
    from spectral_callbacks.linalg.eigsh import _CheckSchedule

    schedule, checks = _CheckSchedule(first=2, every=3, last=30), []
    for step in range(1, 31):
        if schedule.due(step):
            checks.append(step)
            schedule.checked(step, 5.0)  # a stall: no rate to extrapolate
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    # 2, 3, 5, 7, 10, …, 28, then the last step (30) is always checked
    assert checks[0] == 2 and gaps[:4] == [1, 2, 2, 3] and set(gaps[4:-1]) == {3}
    assert checks[-1] == 30


def test_eigenpairs_picks_the_solver_by_method_and_block_size():
    spectrum = torch.cat([torch.tensor([3.0, 3.0]), torch.linspace(-1, 1, 38)])
    op = DenseOperator(matrix_with_spectrum(spectrum, seed=2))
    single = eigenpairs(op, k=2, tol=1e-10)
    blocks = eigenpairs(op, k=2, tol=1e-10, block_size=2)
    assert single.method == "lanczos" and blocks.method == "block_lanczos"
    assert blocks.num_hvps % 2 == 0
    assert torch.allclose(blocks.eigenvalues, torch.tensor([3.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size=2 applies to method='block_lanczos'"):
        eigenpairs(op, k=2, method="lanczos", block_size=2)
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'lanczos'"):
        eigenpairs(op, k=2, method="lobpcg")


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_bounded_basis_restarts_and_matches_exact_spectrum(monkeypatch, name, which):
    spy = BasisSpy(monkeypatch)
    spectrum = SPECTRA[name]
    a = matrix_with_spectrum(spectrum)
    op = DenseOperator(a)
    # The outliers converge in a few products: a small basis and a tight tolerance make these
    # solves restart too.
    k, tol = 3, 1e-12
    max_basis = 6 if name == "bulk_outliers" and which != "SA" else 12
    result = lanczos(
        op, k=k, which=which, tol=tol, max_iter=3000, max_basis=max_basis, return_eigenvectors=True
    )
    assert spy.capacities == [max_basis]
    assert spy.restarts >= 1 and result.num_hvps == op.num_matvecs > max_basis
    want = expected(spectrum, k, which)
    assert result.converged.all(), (result.eigenvalues, result.residuals)
    assert_within_stated_bounds(result, want, tol, slack=1e-13)
    vectors = result.eigenvectors
    true_residuals = (vectors @ a - result.eigenvalues.unsqueeze(1) * vectors).norm(dim=1)
    assert torch.allclose(true_residuals, result.residuals, rtol=1e-3, atol=1e-12)
    assert torch.allclose(vectors @ vectors.T, torch.eye(k, dtype=torch.float64), atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=6, max_value=40),
    k=st.integers(min_value=1, max_value=3),
    extra=st.integers(min_value=2, max_value=8),
    distinct=st.integers(min_value=2, max_value=40),
    which=st.sampled_from(["LA", "SA", "LM"]),
    seed=st.integers(min_value=0, max_value=10_000),
)
# Found by hypothesis: the negative end (-37.75) was still short of 37.25 in magnitude, with a
# bound reaching past it, when +37.25 converged (see the test after this one).
@example(n=9, k=1, extra=2, distinct=8, which="LM", seed=109)
def test_bounded_basis_on_random_spectra_with_repeats(n, k, extra, distinct, which, seed):
    # Few distinct values make Krylov spaces invariant early: breakdowns between restarts.
    # The distinct values lie on a grid (gaps >= 1 in a spread < 80, no two of equal
    # magnitude): a basis of k + 2 keeps one new direction per restart, and on random values
    # with a relative gap near 1e-3 such a solve needs more than 4000 products (found by
    # hypothesis: n=21, k=1, LA, residual 3e-7 after 4000). With the grid the worst of 300
    # random cases took 768.
    g = torch.Generator().manual_seed(seed)
    grid = torch.randperm(80, generator=g)[: min(distinct, n)] - 40
    values = grid.to(torch.float64) + 0.25
    spectrum = values[torch.arange(n) % values.numel()]
    a = matrix_with_spectrum(spectrum, seed=seed)
    k = min(k, n - 2)
    max_basis = k + extra + (which == "LM")  # LM restarts keep both ends: k + 3 at least
    result = lanczos(
        DenseOperator(a), k=k, which=which, tol=1e-9, max_iter=4000, max_basis=max_basis
    )
    assert result.all_converged
    # Single-vector Lanczos finds each distinct value once per invariant subspace it
    # exhausts, so each Ritz value must be an eigenvalue, and the first the wanted one.
    scale = spectrum.abs().max()
    gaps = (result.eigenvalues.unsqueeze(1) - spectrum.unsqueeze(0)).abs().min(dim=1).values
    assert torch.all(gaps <= 1e-7 * scale), (result.eigenvalues, spectrum)
    assert abs(float(result.eigenvalues[0] - expected(spectrum, 1, which)[0])) <= 1e-7 * scale


@pytest.mark.parametrize("solver", [lanczos, block_lanczos])
def test_largest_magnitude_waits_for_the_end_it_has_not_resolved(solver):
    # +10 stands alone and converges within a few products; -10.2 tops a cluster, so the
    # negative end converges slowly and passes -10 in magnitude late. Before the solvers
    # compared the other end's bound with the wanted value, single-vector Lanczos returned
    # +10 as converged for 3 of these 20 seeds at tol=1e-2 (1 at 1e-3).
    spectrum = torch.cat(
        [torch.tensor([10.0]), torch.linspace(-10.2, -9.0, 60), torch.linspace(-1.0, 1.0, 139)]
    ).double()
    for seed in range(20):
        a = matrix_with_spectrum(spectrum, seed=seed)
        for tol in (1e-2, 1e-3):
            result = solver(DenseOperator(a), k=1, which="LM", tol=tol, seed=seed)
            assert result.all_converged, (seed, tol)
            error = abs(float(result.eigenvalues[0]) + 10.2)
            assert error <= float(result.errors[0]), (seed, tol, result.eigenvalues)


def test_confirmation_keeps_an_outranked_pair_unconverged():
    """Fresh products re-judge claimed pairs whose residuals lie below the rounding floor;
    an ``LM`` pair that the unresolved other end may still outrank stays unconverged there,
    whatever its own residual (the pairs come back ordered by ``|θ|``, the flag with them)."""
    spectrum = torch.tensor([-10.2, -9.0, 0.5, 10.0], dtype=torch.float64)
    a = matrix_with_spectrum(spectrum, seed=4)
    eigenvectors = torch.linalg.eigh(a).eigenvectors.T  # rows, ascending eigenvalues
    rows = eigenvectors[[3, 0]]  # +10 first, -10.2 second: |θ| reorders them
    operator, outranked = DenseOperator(a), torch.tensor([True, False])
    plain = confirm_ritz_pairs(operator, rows, 1e-12, "LM", 10.2)
    kept = confirm_ritz_pairs(operator, rows, 1e-12, "LM", 10.2, outranked=outranked)
    assert plain[0].tolist() == pytest.approx([-10.2, 10.0], rel=1e-12)
    assert plain[2].tolist() == [True, True]
    assert kept[2].tolist() == [True, False]  # +10, now second, stays open


def test_default_bound_applies_when_the_basis_would_exceed_its_bytes(monkeypatch):
    spy = BasisSpy(monkeypatch)
    spectrum = SPECTRA["clustered"]
    op = DenseOperator(matrix_with_spectrum(spectrum))
    unbounded = lanczos(op, k=1, tol=1e-10, max_iter=120)
    # 120 float64 entries per vector: 10 vectors fit, so the bound is the minimum, 16.
    monkeypatch.setattr(eigsh, "KRYLOV_BASIS_BYTES", 8 * 120 * 10)
    bounded = lanczos(op, k=1, tol=1e-10, max_iter=400)
    assert spy.capacities == [32, eigsh.minimum_default_basis(1)] and spy.restarts >= 1
    assert unbounded.all_converged and bounded.all_converged
    assert float(unbounded.eigenvalues[0]) == pytest.approx(5.0, abs=1e-9)
    assert float(bounded.eigenvalues[0]) == pytest.approx(5.0, abs=1e-9)
    monkeypatch.setattr(eigsh, "KRYLOV_BASIS_BYTES", 8 * 120 * 40)
    assert eigsh.basis_bound(None, 1, op, max_steps=100) == 40
    assert eigsh.basis_bound(None, 1, op, max_steps=30) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 2, "max_basis": 3}, r"max_basis must be None or an integer of at least k \+ 2 = 4"),
        ({"max_basis": 8.0}, "max_basis must be None or an integer"),
        ({"k": 2, "which": "LM", "max_basis": 4}, r"at least k \+ 3 = 5 .*the other end"),
        ({"block_size": 2, "max_basis": 8}, "max_basis=8 bounds the basis of method='lanczos'"),
        ({"method": "block_lanczos", "max_basis": 8}, "'block_lanczos' keeps its whole basis"),
    ],
)
def test_bad_max_basis_names_the_argument(kwargs, message):
    op = DenseOperator(matrix_with_spectrum(torch.linspace(-1, 1, 30)))
    with pytest.raises(ValueError, match=message):
        eigenpairs(op, **kwargs)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y.long())


@pytest.mark.parametrize("tol", [1e-8, 1e-6, 1e-4])
def test_a_float32_solve_claims_no_residual_a_float64_product_does_not_confirm(tol):
    model, batches = make_case("mlp")  # float64
    dense = dense_hessian_func(model, _ce, batches)
    single = copy.deepcopy(model).float()
    data = [(x.float(), y) for x, y in batches]
    result = hessian_eigenvalues(
        single, _ce, data, k=3, tol=tol, return_eigenvectors=True, max_iter=60
    )
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    # Each value flagged converged within its stated bound of the float64 truth, up to the
    # float32 model's own rounding (its weights and data differ from the float64 ones).
    assert_within_stated_bounds(result, exact, tol, slack=1e-6)
    if tol == 1e-8:
        assert not bool(result.converged.any())  # float32 cannot resolve 1e-8
    if tol == 1e-4:
        assert bool(result.converged.all())
    # Rayleigh quotients of float32 vectors never exceed λ_max by more than float32 rounding.
    assert float(result.eigenvalues[0]) <= float(exact[0]) * (1 + 1e-6)


def test_a_repeated_eigenvalue_is_not_skipped_when_the_krylov_space_exhausts():
    from spectral_callbacks.linalg import DenseOperator, lanczos

    torch.manual_seed(0)
    spectrum = torch.cat([torch.zeros(4), torch.linspace(0.6, 20, 8)]).double()
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    a = q @ torch.diag(spectrum) @ q.T
    for seed in range(3):
        result = lanczos(DenseOperator(0.5 * (a + a.T)), k=5, which="SA", tol=1e-8, seed=seed)
        torch.testing.assert_close(result.eigenvalues, spectrum[:5], atol=1e-10, rtol=0)
        assert bool(result.converged.all())


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("solver", ["lanczos", "block_lanczos", "bounded"])
def test_float32_operators_of_extreme_scale_give_their_eigenvalues(scale, solver):
    """Norms are sums of squares: in float32 they overflow above about 1e19 and underflow
    below 1e-19. The recurrences run on the operator times a power of two, so the values (and
    the claim of convergence) are those of the operator at any scale."""
    spectrum = SPECTRA["indefinite"]
    op = DenseOperator((matrix_with_spectrum(spectrum, seed=1) * scale).float())
    kwargs = {"block_lanczos": {"method": "block_lanczos", "block_size": 2}}.get(solver, {})
    if solver == "bounded":
        kwargs = {"max_basis": 8}
    result = eigenpairs(op, k=3, tol=1e-4, **kwargs)
    exact = expected(spectrum, 3, "LA")
    assert bool(result.converged.all())
    assert torch.allclose(result.eigenvalues / scale, exact, rtol=1e-4)
    assert_within_stated_bounds(result, exact * scale, 1e-4, slack=1e-6)
    density = slq(op, num_probes=2, steps=30, seed=0)
    assert density.lambda_min / scale == pytest.approx(float(spectrum.min()), rel=1e-3)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("k", [1, 3])
def test_a_tolerance_below_the_products_error_stops_once_nothing_improves(solver, k):
    """``tol`` 1e-8 against products good to 1e-3: no pair can converge. The solve stops
    once every bound is the products' floor and no value moves by more, far before the
    product budget (100 before this rule), each value within its bound of the exact one."""
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(0.0, 5.0, 297)])
    exact = spectrum.double()[:k]
    operator = InexactDense(matrix_with_spectrum(spectrum.double(), seed=2), 1e-3)
    result = SOLVERS[solver](operator, k=k, tol=1e-8, seed=1)
    assert not bool(result.converged.any())
    assert result.num_hvps < 60
    floor = 1e-3 * 10.0
    assert bool((result.errors >= floor * (1 - 1e-9)).all())
    assert bool(((result.eigenvalues - exact).abs() <= result.errors).all())
